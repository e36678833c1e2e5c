"""Atomic outputs: replaced as a whole, links never followed into what they point to, clean errors on unwritable
paths, and the permissions of a plain mkdir."""

from __future__ import annotations

import os

import pytest
from test_cli import assert_clean_failure, invoke

from mtu_export.errors import InputError
from mtu_export.storage import atomic_output_dir, write_json


def test_failure_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_replacing_a_folder_leaves_no_trash(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]


def test_output_gets_plain_mkdir_permissions(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert not tmp.exists()


def test_a_symlinked_output_is_replaced_without_touching_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "precious.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_output_dir(tmp_path / "link", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "new.txt").is_file()
    assert (tmp_path / "real" / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_parent_that_is_a_file_is_a_clean_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot write .*choose a writable --out"):
        with atomic_output_dir(tmp_path / "file" / "out"):
            pass


def test_cli_reports_an_unwritable_output_in_one_line(unet_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", tmp_path / "file" / "out"), "cannot write", 2)


def test_json_outputs_create_their_folder(tmp_path):
    write_json(tmp_path / "new" / "deeper" / "result.json", {"ok": True})
    assert (tmp_path / "new" / "deeper" / "result.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["result.json"]
