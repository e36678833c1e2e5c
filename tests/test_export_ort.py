"""`mtu-export onnx --format ort|both`: ONNX Runtime Mobile's `.ort` graphs and `required_operators.config` written
from the validated export, each checked against its .onnx on the trajectory probes; `generate` runs the folder; the
files load in a plain onnxruntime process that cannot import mtu_export; the runtime-only bench
(`python -m mtu_export.bench.device`) times an `.ort` folder against an `.onnx` one in a process without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PROMPT, assert_clean_failure, assert_valid_manifest, invoke
from PIL import Image

from mtu_export.shapes.world import make_example

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
IMAGE_MAX_DIFF = 1  # uint8 levels: the .ort folder's image against the .onnx folder's (onnxruntime's fusions only)

# Runs where `import mtu_export` fails: the .ort graphs as a phone app's onnxruntime loads them.
LOADER = r"""
import json, sys
sys.modules["mtu_export"] = None
import numpy as np, onnxruntime as ort
folder = sys.argv[1]
sess = ort.InferenceSession(folder + "/unet/model.ort", providers=["CPUExecutionProvider"])
feeds = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) else {"batch_size": 2, "height": 9, "width": 7}.get(d, 5) for d in i.shape]
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds[i.name] = np.ones(shape, np.int64) if "int64" in i.type else noise
out = sess.run(None, feeds)[0]
print(json.dumps({"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}))
"""
# `python -m mtu_export.bench.device ...` where torch, diffusers and transformers cannot be imported.
NO_TORCH = r"""
import runpy, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None
sys.argv = ["mtu_export.bench.device", *sys.argv[1:]]
runpy.run_module("mtu_export.bench.device", run_name="__main__")
"""
QUICK = ["--rounds", "1", "--pairs", "3", "--warmup", "0", "--steps", "1", "--repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def exports(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort")
    jobs = {
        "onnx": ("--task", "edit"),
        "ort": ("--task", "edit", "--format", "ort"),
        # t2i: its quantized UNet is where x86's NCHWc layout at level 'all' flips a rounding of the .onnx run
        "both-int8": ("--task", "t2i", "--format", "both", "--quantize", "static-int8"),
    }
    for name, options in jobs.items():
        result = invoke("onnx", mtu_world, *options, "--image-count", "0", "--out", root / name)
        assert result.exit_code == 0, result.output
    return {name: root / name for name in jobs}


def test_ort_folders_hold_ort_graphs_checked_against_their_onnx(exports):
    for name, kept in (("ort", False), ("both-int8", True)):
        folder = exports[name]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["ort"]["graphs"]) == set(COMPONENTS) and manifest["ort"]["onnx_kept"] == kept
        for component in COMPONENTS:
            assert (folder / component / "model.ort").is_file()
            assert (folder / component / "model.onnx").is_file() == kept
            rows = manifest["ort"]["graphs"][component]["agreement"]
            assert rows and all(r["psnr_db"] is None and r["max_abs_diff"] == 0.0 for r in rows), rows  # identical
        config = (folder / "required_operators.config").read_text()
        assert "Conv" in config and "MatMul" in config
    assert "QLinearConv" in (exports["both-int8"] / "required_operators.config").read_text()


def test_ort_graphs_load_in_a_process_without_mtu_export(exports, tmp_path):
    for name in ("ort", "both-int8"):
        (tmp_path / "loader.py").write_text(LOADER)
        done = subprocess.run([sys.executable, tmp_path / "loader.py", exports[name]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["finite"] and report["shape"][2:] == [9, 7]  # an odd latent size, too


def test_generate_runs_an_ort_folder_as_its_onnx_twin(exports, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(make_example("edit", "heldout", 1).source).resize((96, 64)).save(source)
    images = {}
    for name in ("onnx", "ort"):
        out = tmp_path / f"{name}.png"
        result = invoke("generate", exports[name], "--task", "edit", "--prompt", PROMPT, "--image", source,
                        "--steps", "2", "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert images["ort"].shape == images["onnx"].shape == (64, 96, 3)
    assert np.abs(images["ort"] - images["onnx"]).max() <= IMAGE_MAX_DIFF


def test_format_is_refused_where_it_does_not_apply(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--task", "edit", "--format", "tflite", "--out", tmp_path / "x")
    assert_clean_failure(result, "--format 'tflite' is not a format; choose onnx, ort, both")
    result = invoke("coreml", mtu_world, "--task", "edit", "--format", "ort", "--out", tmp_path / "y")
    assert result.exit_code != 0 and not (tmp_path / "y").exists()


def _bench_device(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True)


def test_runtime_only_bench_times_an_ort_folder_against_its_onnx_twin(exports, tmp_path):
    done = _bench_device(exports["onnx"], exports["ort"], "--out", tmp_path / "bench", *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / "device.json").read_text())
    assert result["kinds"] == {str(exports["onnx"]): "onnx fp32", str(exports["ort"]): "ort fp32"}
    row = result["tasks"]["edit"]
    assert row["control"]["rounds"] == 1 and row["control"]["ratio"] > 0
    timed = row["folders"][str(exports["ort"])]
    assert timed["unet_per_call"]["a_median_ms"] > 0 and timed["end_to_end"]["a_median_ms"] > 0
    assert "| edit | `" in (tmp_path / "bench" / "device.md").read_text()


def test_runtime_only_bench_refuses_folders_without_a_shared_task(exports, tmp_path):
    done = _bench_device(exports["onnx"], exports["both-int8"], "--out", tmp_path / "bench", *QUICK)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "share no task" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "bench").exists()


def test_manifests_validate_against_the_schema(exports) -> None:
    for folder in exports.values():  # .ort folders
        assert_valid_manifest(folder)
