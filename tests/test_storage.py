"""Atomic outputs: replaced as a whole, links never followed into what they point to, clean errors on unwritable
paths and a full disk, the permissions of a plain mkdir, and no `.partial` folder left by SIGTERM or SIGKILL.
Pickle weights: refused before anything unpickles them, never copied. An output overlapping anything a command reads
(a checkpoint's shared pipeline included) is refused; a malformed sharded-weights index is one error line."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from helpers import assert_clean_failure, invoke, runner

from mtu_export.checkpoint import load_components
from mtu_export.errors import CheckpointError, ConfigError, DiskFullError, InputError, OutputExistsError
from mtu_export.storage import (
    UNET_WEIGHTS,
    UNET_WEIGHTS_INDEX,
    atomic_output,
    check_separate,
    link_or_copy_tree,
    unet_weights,
    write_json,
)

VAE_PICKLE = "diffusion_pytorch_model.bin"
KILL_TIMEOUT_S = 60  # a killed writer must be gone (and a SIGTERMed one cleaned up) well within this


def test_failure_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_file_output_is_written_beside_and_renamed_into_place(tmp_path):
    out = tmp_path / "sub" / "result.json"
    with atomic_output(out, file=True) as tmp:
        assert tmp.suffix == ".json" and tmp.parent.parent == out.parent and not out.exists()
        write_json(tmp, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and sorted(p.name for p in out.parent.iterdir()) == ["result.json"]
    with pytest.raises(OutputExistsError, match="already exists; choose another --out or pass --overwrite"):
        with atomic_output(out, file=True):
            pass
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True, file=True) as tmp:
        write_json(tmp, {"a": 2})
        raise RuntimeError("boom")
    assert json.loads(out.read_text()) == {"a": 1} and sorted(p.name for p in out.parent.iterdir()) == ["result.json"]


def test_members_replace_their_files_and_keep_the_folders_other_files(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    (out / "a.json").write_text("old")
    with pytest.raises(OutputExistsError, match="a.json already exists"):
        with atomic_output(out, members=("a.json", "b.md")):
            pass
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True, members=("a.json", "b.md")) as staging:
        (staging / "a.json").write_text("new")
        raise RuntimeError("boom")  # neither replaced
    assert (out / "a.json").read_text() == "old" and not (out / "b.md").exists()
    with atomic_output(out, overwrite=True, members=("a.json", "b.md")) as staging:
        (staging / "a.json").write_text("new")
        (staging / "b.md").write_text("table")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"notes.md": "mine", "a.json": "new", "b.md": "table"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_an_output_over_what_the_command_reads_is_refused_on_entry(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for out in (data, data / "out", tmp_path):
        with pytest.raises(ConfigError, match=r"--json .* overlaps the input"):
            with atomic_output(out, [None, data], overwrite=True, option="--json"):
                raise AssertionError("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and list(data.iterdir()) == []


def test_no_module_checks_outputs_by_hand():
    """Output safety lives in storage.atomic_output (and refuse_output, the trainers' early check): no other module
    calls the checks it is built from."""
    package = Path(__file__).resolve().parents[1] / "mtu_export"
    found = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        if path.name != "storage.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\b(check_output|check_separate|atomic_output_dir)\(", line)
    ]
    assert found == []


def test_replacing_a_folder_leaves_no_trash(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_output(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]


def test_output_gets_plain_mkdir_permissions(tmp_path):
    with atomic_output(tmp_path / "out") as tmp:
        pass
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert not tmp.exists()


def test_a_symlinked_output_is_replaced_without_touching_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "precious.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_output(tmp_path / "link", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "new.txt").is_file()
    assert (tmp_path / "real" / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_parent_that_is_a_file_is_a_clean_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot write .*choose a writable --out"):
        with atomic_output(tmp_path / "file" / "out"):
            pass


def test_cli_reports_an_unwritable_output_in_one_line(unet_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", tmp_path / "file" / "out"), "cannot write", 2)


def test_json_outputs_create_their_folder(tmp_path):
    write_json(tmp_path / "new" / "deeper" / "result.json", {"ok": True})
    assert (tmp_path / "new" / "deeper" / "result.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["result.json"]


# ------------------------------------------------------------------------------------------------- killed writers
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mtu_export.storage import atomic_output

    with atomic_output(Path(sys.argv[1]), overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
        (tmp / "new.txt").write_text("new")
    """
)


def write_in_subprocess(out: Path, sleep_s: float) -> subprocess.Popen:
    """A writer that has its temp folder open (it printed `writing`) and sleeps inside it."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(sleep_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_writer_leaves_no_partial_folder_after_the_next_run(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = write_in_subprocess(out, sleep_s=KILL_TIMEOUT_S)
    assert len(partials(tmp_path)) == 1
    proc.send_signal(sig)
    assert proc.wait(timeout=KILL_TIMEOUT_S) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -sig)
    # SIGTERM: the writer cleans up itself; SIGKILL cannot be caught, so the next write to `out` removes it
    assert len(partials(tmp_path)) == (0 if sig == signal.SIGTERM else 1)
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in out.iterdir()) == ["old.txt"]
    next_run = write_in_subprocess(out, sleep_s=0)
    assert next_run.wait(timeout=KILL_TIMEOUT_S) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["half.txt", "new.txt"]


def test_sigterm_handler_is_restored_after_writing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_output(tmp_path / "out") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM raises: the temp folder is removed
        (tmp / "a.txt").write_text("a")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_live_writers_partial_folder_is_kept(tmp_path):
    with atomic_output(tmp_path / "out", overwrite=True) as first:
        (first / "a.txt").write_text("a")
        with atomic_output(tmp_path / "out", overwrite=True) as second:  # same output, this process alive
            assert first.is_dir() and second.is_dir() and first != second
        assert (first / "a.txt").is_file()
    assert partials(tmp_path) == []


def test_a_full_disk_is_one_clean_error_and_leaves_nothing(tmp_path):
    with pytest.raises(DiskFullError, match="no space left on the device while writing .*out.*free space"):
        with atomic_output(tmp_path / "out") as tmp, open("/dev/full", "wb") as full:
            (tmp / "half.txt").write_text("half")
            full.write(b"x" * 8192)
            full.flush()  # ENOSPC, a real one: /dev/full
    assert list(tmp_path.iterdir()) == []


def test_cli_maps_a_full_disk_to_its_exit_code(tmp_path):
    from mtu_export.display import handles_errors

    app = typer.Typer()

    @app.command()
    @handles_errors
    def write(out: Path) -> None:
        with atomic_output(out) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"w")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "weights.safetensors"))

    result = runner.invoke(app, [str(tmp_path / "out")])
    assert_clean_failure(result, "weights.safetensors); nothing was written — free space", DiskFullError.exit_code)
    assert DiskFullError.exit_code == 8 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- pickles
class Payload:
    """Unpickling this creates `marker`: what a malicious .bin could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_payload(path: Path, marker: Path) -> Path:
    torch.save({"decoder.conv_out.weight": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: loading it without care runs code ...
    assert marker.exists()
    marker.unlink()  # ... so the marker must not come back
    return path


@pytest.fixture
def pickled_pipeline(pipeline_dir: Path, tmp_path: Path) -> Path:
    """The tiny pipeline with its VAE weights in a pickle instead of safetensors."""
    pipeline = tmp_path / "pickled"
    shutil.copytree(pipeline_dir, pipeline)
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    write_payload(pipeline / "vae" / VAE_PICKLE, tmp_path / "pwned")
    return pipeline


def assert_pickle_refused(result, marker: Path) -> None:
    assert_clean_failure(result, f"vae/{VAE_PICKLE}", InputError.exit_code)
    assert "safe_serialization=True" in result.stderr and "loads safetensors only" in result.stderr
    assert not marker.exists()


def test_upcycle_refuses_a_pipeline_with_pickle_weights(pickled_pipeline, tmp_path):
    assert_pickle_refused(invoke("upcycle", pickled_pipeline, "--out", tmp_path / "mtu"), tmp_path / "pwned")
    assert not (tmp_path / "mtu").exists()


def test_loading_components_refuses_pickle_weights(pickled_pipeline, tmp_path):
    for call in (
        lambda: load_components(pickled_pipeline),
        lambda: link_or_copy_tree(pickled_pipeline, tmp_path / "c"),
    ):
        with pytest.raises(InputError, match=f"pickle file.*vae/{VAE_PICKLE}.*safe_serialization=True"):
            call()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "c").exists()


def test_fold_and_export_refuse_a_checkpoint_whose_pipeline_holds_a_pickle(pipeline_dir, tmp_path):
    assert invoke("upcycle", pipeline_dir, "--out", tmp_path / "mtu").exit_code == 0
    vae = tmp_path / "mtu" / "pipeline" / "vae"
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    write_payload(vae / VAE_PICKLE, tmp_path / "pwned")
    fold = invoke("fold", tmp_path / "mtu", "--task", "t2i", "--out", tmp_path / "folded")
    assert_pickle_refused(fold, tmp_path / "pwned")
    export = invoke("onnx", tmp_path / "mtu", "--task", "t2i", "--out", tmp_path / "onnx", "--image-count", "0")
    assert_pickle_refused(export, tmp_path / "pwned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtu"]


def test_pickles_beside_safetensors_are_neither_loaded_nor_copied(pipeline_dir, tmp_path):
    pipeline = tmp_path / "both"
    shutil.copytree(pipeline_dir, pipeline)
    write_payload(pipeline / "vae" / VAE_PICKLE, tmp_path / "pwned")  # as Hub snapshots often hold both
    assert invoke("upcycle", pipeline, "--out", tmp_path / "mtu").exit_code == 0
    load_components(pipeline)
    fold = invoke("fold", tmp_path / "mtu", "--task", "t2i", "--out", tmp_path / "folded")
    assert fold.exit_code == 0, fold.output
    assert not (tmp_path / "pwned").exists()
    copied = [p for p in (tmp_path / "mtu").rglob("*")] + [p for p in (tmp_path / "folded").rglob("*")]
    assert [p for p in copied if p.suffix == ".bin"] == []


# ------------------------------------------------------------------------------- outputs vs what a command reads
def _checkpoint_sharing(base: Path, folder: Path) -> Path:
    """A stand-in checkpoint folder whose mtu_config.json points at `base`, as `pack --pipeline-ref` writes it."""
    folder.mkdir(parents=True)
    write_json(folder / "mtu_config.json", {"pipeline": os.path.relpath(base, folder)})
    return folder


def test_check_separate_covers_the_pipeline_a_checkpoint_shares(pipeline_dir, tmp_path):
    base = tmp_path / "models" / "base"
    shutil.copytree(pipeline_dir, base)
    ckpt = _checkpoint_sharing(base, tmp_path / "models" / "mtu")
    for out in (base, base / "unet", base / "vae" / "x", tmp_path / "models", ckpt, ckpt / "sub"):
        with pytest.raises(ConfigError, match="overlaps the input"):
            check_separate(out, ckpt)
    check_separate(tmp_path / "models" / "folded", ckpt)
    check_separate(base / "eval" / "heldout.json", ckpt)  # a pipeline's eval/ or model card is not read
    check_separate(tmp_path / "models" / "folded", None, ckpt)  # options not given are skipped


def test_check_separate_names_the_option_and_every_kind_of_input(tmp_path):
    data = tmp_path / "data" / "edits.jsonl"
    with pytest.raises(ConfigError, match=r"^--json .* overlaps the input .*edits\.jsonl"):
        check_separate(data, tmp_path / "elsewhere", data, option="--json")
    with pytest.raises(ConfigError, match="overlaps the input"):
        check_separate(tmp_path / "data", data)  # replacing the folder would delete the dataset in it


SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"
BAD_INDEXES = {  # index text -> (error class, what the one line names)
    "not json": ("{weight_map", CheckpointError, "is not readable JSON"),
    "a list": ("[1, 2]", CheckpointError, "found a JSON list instead of an object"),
    "no weight_map": ('{"metadata": {}}', CheckpointError, "found no 'weight_map'"),
    "weight_map a list": ('{"weight_map": ["a"]}', CheckpointError, "found list ['a']"),
    "a number as shard": ('{"weight_map": {"conv_in.weight": 3}}', CheckpointError, "found 'conv_in.weight': 3"),
    "a path outside": ('{"weight_map": {"w": "../x.safetensors"}}', CheckpointError, "'../x.safetensors'"),
    "a missing shard": ('{"weight_map": {"w": "gone.safetensors"}}', InputError, "names shard(s) gone.safetensors"),
}


@pytest.mark.parametrize(("text", "error", "message"), BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_a_malformed_sharded_weights_index_is_one_error_line(unet_dir, tmp_path, text, error, message):
    (unet_dir / UNET_WEIGHTS).rename(unet_dir / SHARD)
    (unet_dir / UNET_WEIGHTS_INDEX).write_text(text)
    with pytest.raises(error, match=re.escape(message)):
        unet_weights(unet_dir)
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", tmp_path / "mtu"), message, error.exit_code)
    assert not (tmp_path / "mtu").exists()


def test_a_well_formed_sharded_unet_still_upcycles(unet_dir, tmp_path):
    (unet_dir / UNET_WEIGHTS).rename(unet_dir / SHARD)
    names = safe_open_keys(unet_dir / SHARD)
    write_json(unet_dir / UNET_WEIGHTS_INDEX, {"metadata": {}, "weight_map": dict.fromkeys(names, SHARD)})
    assert unet_weights(unet_dir) == [unet_dir / SHARD]
    result = invoke("upcycle", unet_dir, "--out", tmp_path / "mtu")
    assert result.exit_code == 0, result.output


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())
