"""Property-based: the CLI driven with generated bad inputs (paths, option values, corrupted configs and weight files,
images of random sizes and modes). For every case: the exit code is in the documented table, a failure is one line
on stderr with no traceback, nothing is written at `--out`, and no input file changes."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mtu_export.errors import MtuError

DOCUMENTED_EXIT_CODES = {0} | {cls.exit_code for cls in MtuError.__subclasses__()} | {MtuError.exit_code}
EXAMPLES = 15
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tree_hashes(*roots: Path) -> dict[str, str]:
    hashes = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if path.is_file():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def check(result, out: Path | None, before: dict[str, str], *inputs: Path) -> None:
    assert result.exit_code in DOCUMENTED_EXIT_CODES, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()  # progress lines, then the one error line
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
        assert out is None or not out.exists(), f"{out} written by a failing command"
        if out is not None:
            assert not list(out.parent.glob(f".{out.name}.*")), "a partial output was left behind"
    assert tree_hashes(*inputs) == before, "an input file changed"


@pytest.fixture(scope="module")
def checkpoint(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prop") / "ckpt"
    assert invoke("upcycle", pipeline_dir, "--out", out, "--tasks", "t2i,edit").exit_code == 0
    return out


@pytest.fixture(scope="module")
def export(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prop") / "onnx"
    result = invoke("onnx", checkpoint, "--task", "edit", "--out", out, "--image-count", "0")
    assert result.exit_code == 0, result.output
    return out


CORRUPTIONS = st.one_of(
    st.tuples(st.just("mtu_config.json"), st.binary(max_size=48)),
    st.tuples(st.just("mtu_config.json"), st.sampled_from([b"[]", b"{}", b'{"format": 3}', b'{"moe": null}'])),
    st.tuples(st.just("mtu_unet.safetensors"), st.binary(max_size=48)),
    st.tuples(st.just("mtu_unet.safetensors"), st.integers(min_value=0, max_value=4096)),  # truncate to N bytes
)


@SETTINGS
@given(corruption=CORRUPTIONS, command=st.sampled_from(["info", "fold", "onnx"]))
def test_corrupted_checkpoints(checkpoint, corruption, command):
    name, payload = corruption
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = Path(scratch) / "ckpt"
        shutil.copytree(checkpoint, ckpt)
        target = ckpt / name
        data = payload if isinstance(payload, bytes) else target.read_bytes()[:payload]
        target.write_bytes(data)
        out = Path(scratch) / "out"
        before = tree_hashes(ckpt)
        args = {"info": ["info", ckpt], "fold": ["fold", ckpt, "--task", "t2i", "--out", out]}.get(command)
        args = args or ["onnx", ckpt, "--task", "t2i", "--out", out, "--image-count", "0"]
        result = invoke(*args)
        check(result, None if command == "info" else out, before, ckpt)
        assert result.exit_code != 0


@SETTINGS
@given(
    tasks=st.text(alphabet="t2iedsrnpa:,0123456789 x_", max_size=20),
    experts=st.integers(min_value=-3, max_value=40),
    embed=st.integers(min_value=-2, max_value=8),
)
def test_upcycle_option_values(pipeline_dir, tasks, experts, embed):
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        before = tree_hashes(pipeline_dir)
        result = invoke(
            "upcycle", pipeline_dir, "--out", out, "--tasks", tasks, "--experts", experts, "--task-embed-dim", embed
        )
        check(result, out, before, pipeline_dir)


@SETTINGS
@given(
    path=st.sampled_from(["missing", "file", "empty-dir", "out-exists"]),
    option=st.sampled_from(
        [
            ["--opset", "99"],
            ["--quantize", "int3"],
            ["--height", "30"],
            ["--task", "nope"],
            ["--task", "t2i,edit"],
            ["--image-count", "-1"],
            ["--data", "t2i"],
            ["--attention", "flash"],
        ]
    ),
)
def test_onnx_paths_and_options(checkpoint, path, option):
    with tempfile.TemporaryDirectory() as scratch:
        source = {"missing": Path(scratch) / "missing", "file": Path(scratch) / "file", "empty-dir": Path(scratch)}
        (Path(scratch) / "file").write_text("x")
        ckpt = source.get(path, checkpoint)
        out = Path(scratch) / "out"
        if path == "out-exists":
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        before = tree_hashes(checkpoint)
        result = invoke("onnx", ckpt, "--out", out, *option)
        assert result.exit_code != 0
        check(result, None if path == "out-exists" else out, before, checkpoint)
        if path == "out-exists":
            assert (out / "keep.txt").read_text() == "mine"


IMAGE_MODES = st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16", "CMYK"])


@SETTINGS
@given(
    mode=IMAGE_MODES,
    width=st.integers(min_value=1, max_value=96),
    height=st.integers(min_value=1, max_value=96),
    suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tiff"]),
    broken=st.booleans(),
)
def test_generate_with_images_of_any_size_and_mode(export, mode, width, height, suffix, broken):
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / f"in{suffix}"
        picture = Image.new(mode, (width, height))
        try:
            picture.save(image)
        except (OSError, KeyError, ValueError):  # a mode this format cannot hold: write garbage bytes instead
            broken = True
        if broken:
            image.write_bytes(b"\x89PNG not really" * 3)
        out = Path(scratch) / "out.png"
        before = tree_hashes(export, image)
        args = ["generate", export, "--task", "edit", "--prompt", "x", "--image", image, "--out", out, "--steps", "1"]
        result = invoke(*args)
        check(result, out, before, export, image)
        assert (result.exit_code == 0) == out.is_file()
