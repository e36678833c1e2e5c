"""`.ort` conversion (export/ort_format.py) of tiny real diffusers / transformers graphs exported to ONNX: each .ort
is written by onnxruntime's own converter and proved by loading it with plain onnxruntime in a child process that
cannot import mtu_export; its outputs are compared with the .onnx graph's on onnxruntime."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from mtu_export.errors import ConfigError, InputError, OutputExistsError
from mtu_export.export import ort_format
from mtu_export.export.graphs import TEXT_ENCODER, UNET, GraphSpec, TextEncoderGraph, UNetGraph
from mtu_export.export.ort_format import OPERATORS_CONFIG, compare, convert_folder, describe_graph
from mtu_export.metrics import psnr_db
from mtu_export.quantize import quantize_onnx
from mtu_export.shapes.tiny import CROSS_DIM, tiny_unet

ORT_PSNR_MIN_DB = 60.0  # .ort against its .onnx, both on onnxruntime's CPU EP (tiny UNet: 130 dB)
LOWERED_LIMIT = 2_000_000  # bytes: under the tiny fp32 UNet (3.4 MB), over its static-int8 estimate (1.1 MB)
FP16_LIMIT = 2_500_000  # bytes: over the tiny fp16 UNet (2.0 MB), under its fp32 copies in a 'fixed' .ort (3.5 MB)
CHILD_TIMEOUT_S = 60

# Runs in a child process: plain onnxruntime, mtu_export made unimportable. argv: model, feeds .npz, outputs .npz.
LOADER = """
import sys
sys.modules["mtu_export"] = None  # an import of our package now raises ImportError
import numpy as np
import onnxruntime as ort

feeds = np.load(sys.argv[2])
count = len({key.split("/")[0] for key in feeds.files})
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
outputs = {}
for i in range(count):
    feed = {key.split("/", 1)[1]: feeds[key] for key in feeds.files if key.startswith(f"{i}/")}
    for output, value in zip(session.get_outputs(), session.run(None, feed)):
        outputs[f"{i}/{output.name}"] = value
assert not any(name.startswith("mtu_export") and sys.modules[name] is not None for name in sys.modules)
np.savez(sys.argv[3], **outputs)
"""


# ----------------------------------------------------------------------------------------------------- graphs
def export(module: torch.nn.Module, spec: GraphSpec, feed: dict[str, np.ndarray], folder: Path) -> Path:
    folder.mkdir(parents=True)
    args = tuple(torch.from_numpy(feed[name]) for name in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape asserts
        torch.onnx.export(
            module.eval(),
            args,
            str(folder / "model.onnx"),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(),
            opset_version=18,
            dynamo=False,
        )
    return folder / "model.onnx"


def unet_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            "sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),  # (B, C, h, w)
            "timestep": np.array(t, dtype=np.float32),  # a scalar, as optimum exports it
            "encoder_hidden_states": rng.standard_normal((batch, 5, CROSS_DIM)).astype(np.float32),  # (B, L, D)
        }
        for batch, t in ((1, 10.0), (2, 700.0))
    ]


def text_feeds() -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.array([[0, 5, 9, 33, 1, 1, 1, 1]], dtype=np.int64)}]  # (B, L)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny UNet (diffusers' test sizes) and CLIP text encoder, each exported once: component -> model.onnx."""
    root = tmp_path_factory.mktemp("graphs")
    unet = tiny_unet(
        sample_size=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        hidden_size=CROSS_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return {
        "unet": export(UNetGraph(unet), UNET, unet_feeds()[0], root / "unet"),
        "text_encoder": export(TextEncoderGraph(CLIPTextModel(clip)), TEXT_ENCODER, text_feeds()[0], root / "te"),
    }


def place(graph: Path, folder: Path, external: bool = False) -> Path:
    """Copy `graph` to `folder/model.onnx`, its weights in `model.onnx_data` when `external`."""
    folder.mkdir(parents=True)
    if not external:
        return Path(shutil.copy(graph, folder / "model.onnx"))
    onnx.save_model(
        onnx.load(str(graph)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=1024,
    )
    return folder / "model.onnx"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------- checks
def run_in_plain_onnxruntime(model: Path, feeds: list[dict[str, np.ndarray]], scratch: Path) -> list[list[np.ndarray]]:
    """Outputs of `model` per feed, computed by a child process that cannot import mtu_export."""
    np.savez(scratch / "feeds.npz", **{f"{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    command = [sys.executable, "-I", "-c", LOADER, str(model), str(scratch / "feeds.npz"), str(scratch / "out.npz")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=scratch)
    assert done.returncode == 0, done.stderr
    outputs = np.load(scratch / "out.npz")
    return [[outputs[k] for k in outputs.files if k.startswith(f"{i}/")] for i in range(len(feeds))]


def assert_agrees(reference: Path, outputs: list[list[np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> None:
    session = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    for feed, got in zip(feeds, outputs, strict=True):
        for want, value in zip(session.run(None, feed), got, strict=True):
            assert want.shape == value.shape
            psnr = psnr_db(want, value)
            assert psnr is None or psnr > ORT_PSNR_MIN_DB, psnr


def config_operators(folder: Path) -> set[str]:
    lines = (folder / OPERATORS_CONFIG).read_text().splitlines()
    return {op for line in lines if not line.startswith("#") for op in line.split(";")[2].split(",")}


# ------------------------------------------------------------------------------------------------------ tests
def test_unet_ort_loads_in_plain_onnxruntime_and_matches_its_onnx(graphs, tmp_path: Path):
    folder = tmp_path / "export"
    place(graphs["unet"], folder / "unet")
    feeds = unet_feeds()

    manifest = convert_folder(folder, feeds={"unet": feeds})

    ort_path = folder / "unet" / "model.ort"
    assert (folder / "unet" / "model.onnx").exists()  # keep_onnx defaults to True
    assert listing(folder) == ["required_operators.config", "unet", "unet/model.onnx", "unet/model.ort"]
    assert manifest["graphs"]["unet"]["bytes"] == ort_path.stat().st_size
    assert manifest["optimization_style"] == "Fixed" and manifest["onnxruntime"] == ort.__version__
    assert manifest["required_operators"] == {"path": OPERATORS_CONFIG, "operators": len(config_operators(folder))}
    assert {"Conv", "MatMul", "Softmax"} <= config_operators(folder)
    assert "# - unet/model.ort" in (folder / OPERATORS_CONFIG).read_text()  # not the scratch path converted
    for row in manifest["graphs"]["unet"]["agreement"]:
        assert row["feeds"] == len(feeds) and row["psnr_db"] is None and row["max_abs_diff"] == 0.0, row

    outputs = run_in_plain_onnxruntime(ort_path, feeds, tmp_path)
    assert_agrees(folder / "unet" / "model.onnx", outputs, feeds)


def test_folder_config_covers_every_graph_and_onnx_can_go(graphs, tmp_path: Path):
    """Two graphs (the UNet's weights external), a unet_fp32 reference that is skipped and kept, keep_onnx=False."""
    folder = tmp_path / "export"
    place(graphs["unet"], folder / "unet", external=True)
    place(graphs["text_encoder"], folder / "text_encoder")
    place(graphs["unet"], folder / "unet_fp32")

    manifest = convert_folder(folder, keep_onnx=False)

    assert listing(folder) == [
        "required_operators.config",
        "text_encoder",
        "text_encoder/model.ort",
        "unet",
        "unet/model.ort",
        "unet_fp32",
        "unet_fp32/model.onnx",
    ]
    assert sorted(manifest["graphs"]) == ["text_encoder", "unet"] and manifest["skipped"] == ["unet_fp32"]
    assert {"Conv", "InstanceNormalization"} <= config_operators(folder)  # the UNet's (GroupNorm)
    assert "ArgMax" in config_operators(folder)  # the text encoder's (pooled output at the end-of-text token)
    outputs = run_in_plain_onnxruntime(folder / "unet" / "model.ort", unet_feeds(), tmp_path)
    assert_agrees(folder / "unet_fp32" / "model.onnx", outputs, unet_feeds())  # same graph, weights inline
    rows = compare(graphs["text_encoder"], folder / "text_encoder" / "model.ort", text_feeds())
    assert [r["output"] for r in rows] == list(TEXT_ENCODER.outputs)
    assert all(r["psnr_db"] is None and r["max_abs_diff"] == 0.0 for r in rows), rows  # the 'extended' .onnx


def test_graph_over_the_flatbuffer_limit_is_refused_before_anything_is_written(graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(ort_format, "ORT_LIMIT", LOWERED_LIMIT)
    folder = tmp_path / "export"
    place(graphs["unet"], folder / "unet")
    place(graphs["text_encoder"], folder / "text_encoder")  # under the limit: not listed
    before = listing(folder)

    with pytest.raises(ConfigError) as error:
        convert_folder(folder)

    message = str(error.value)
    assert "\n" not in message and message.startswith("1 graph(s) too large for an .ort FlatBuffer (at most 2.00 MB")
    assert "unet/model.onnx is 3." in message and "--quantize static-int8" in message, message
    assert "text_encoder" not in message and "fp16" not in message  # 'fixed' keeps no fp16 weights: no gain
    assert listing(folder) == before


def test_fp16_graph_counts_its_fp32_copies_under_fixed(graphs, tmp_path, monkeypatch):
    """'fixed' stores fp16 weights as fp32 (a CPU without fp16 kernels converts): refused, 'runtime' named."""
    monkeypatch.setattr(ort_format, "ORT_LIMIT", FP16_LIMIT)
    folder = tmp_path / "export"
    (folder / "unet").mkdir(parents=True)
    quantize_onnx("fp16", graphs["unet"], folder / "unet" / "model.onnx")

    with pytest.raises(ConfigError, match=r"stored as fp32\): export with optimization 'runtime'"):
        convert_folder(folder)
    ort_format.check_sizes([describe_graph(folder / "unet" / "model.onnx")], "runtime")  # fits: no error
    assert listing(folder) == ["unet", "unet/model.onnx"]


def test_bad_inputs_are_refused(graphs, tmp_path: Path):
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(InputError, match="no \\*/model.onnx graphs"):
        convert_folder(folder)
    place(graphs["text_encoder"], folder / "text_encoder")
    with pytest.raises(ConfigError, match="unknown .ort optimization style 'Fixed'; choose fixed or runtime"):
        convert_folder(folder, optimization="Fixed")
    (folder / "text_encoder" / "model.ort").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="text_encoder/model.ort"):
        convert_folder(folder)
