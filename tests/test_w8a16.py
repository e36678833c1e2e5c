"""`mtu-export onnx --quantize w8a16` on the toy shapes-world MTU checkpoint: QDQ with uint16 activations and uint8
weights written by onnxruntime's quantizer, calibrated as static int8 is, loaded by plain onnxruntime in a child
process that cannot import mtu_export, validated against torch, and closer to fp32 than static int8 on the same
model and probes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FAST, PROMPT, assert_clean_failure, invoke
from onnx import TensorProto
from transformers import CLIPTokenizer

from mtu_export.config import CoreMLConfig
from mtu_export.errors import ConfigError
from mtu_export.export.onnx import GRAPH_PSNR_FLOOR
from mtu_export.metrics import psnr_db
from mtu_export.quantize import static_exclusions

W8A16_GAIN_MIN_DB = 10.0  # per-call PSNR of w8a16 over static int8's, same model and probes (toy model: +21 dB)
CHILD_PSNR_MIN_DB = 40.0  # w8a16 UNet vs its fp32 reference in plain onnxruntime, one guided call (toy: 48 dB)
CHILD_TIMEOUT_S = 60

# Runs in a child process: plain onnxruntime, mtu_export made unimportable. argv: export folder, feeds .npz (token
# ids, latents, timestep), outputs .npz. The prompt goes through the exported text encoder, as a pipeline's would.
RUNNER = """
import sys
sys.modules["mtu_export"] = None  # an import of our package now raises ImportError
import numpy as np
import onnxruntime as ort

folder, feeds = sys.argv[1], dict(np.load(sys.argv[2]))
def session(name):
    return ort.InferenceSession(f"{folder}/{name}/model.onnx", providers=["CPUExecutionProvider"])
hidden = session("text_encoder").run(None, {"input_ids": feeds.pop("input_ids")})[0]
feeds["encoder_hidden_states"] = hidden
np.savez(sys.argv[3], **{name: session(name).run(None, feeds)[0] for name in ("unet", "unet_fp32")})
"""


@pytest.fixture(scope="module")
def exports(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The t2i export of the toy checkpoint in w8a16 and in static int8 (same validation probes)."""
    root = tmp_path_factory.mktemp("w8a16")
    for mode in ("w8a16", "static-int8"):
        result = invoke("onnx", mtu_world, "--task", "t2i", "--quantize", mode, "--out", root / mode, *FAST)
        assert result.exit_code == 0, result.output
    return {mode: root / mode for mode in ("w8a16", "static-int8")}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _unet_row(folder: Path, mode: str) -> dict:
    rows = [r for r in _manifest(folder)["graph_agreement"] if r["component"] == f"unet[{mode}]"]
    assert len(rows) == 1
    return rows[0]


def test_w8a16_graph_has_uint16_activations_and_uint8_weights(exports):
    model = onnx.load(str(exports["w8a16"] / "unet" / "model.onnx"))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert quantize and dequantize
    # every activation is quantized to uint16 (the zero point's type is the quantized type)
    assert {constants[n.input[2]].data_type for n in quantize} == {TensorProto.UINT16}
    # every quantized weight is uint8 (biases int32), nothing int8 anywhere; QNN's layout: Conv weights per channel,
    # MatMul / Gemm weights per tensor
    weights = [constants[n.input[0]] for n in dequantize if n.input[0] in constants]
    assert {w.data_type for w in weights} == {TensorProto.UINT8, TensorProto.INT32}
    assert not any(t.data_type == TensorProto.INT8 for t in graph.initializer)
    scales = {n.output[0]: onnx.numpy_helper.to_array(constants[n.input[1]]).size for n in dequantize}
    conv = [scales[n.input[1]] for n in graph.node if n.op_type == "Conv" and n.input[1] in scales]
    linear = [scales[i] for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input if i in scales]
    assert conv and min(conv) > 1 and linear and max(linear) == 1
    # 16-bit Q/DQ are ONNX operators from opset 21; below it onnxruntime's com.microsoft ones
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert all(n.domain == "com.microsoft" or (n.domain == "" and opset["ai.onnx"] >= 21) for n in quantize)
    stamped = {p.key: p.value for p in model.metadata_props}["mtu_export.opset"]
    assert stamped == str(opset["ai.onnx"])  # the metadata names the graph's own opset, not the one asked for
    # conv_in, conv_out and the timestep embedding stay fp32; every other Conv, MatMul and Gemm takes dequantized
    # inputs, the attention products (Q·Kᵀ, softmax·V: both operands activations) included
    kept = set(static_exclusions(onnx.load(str(exports["w8a16"] / "unet_fp32" / "model.onnx")).graph, False))
    dequantized = {o for n in dequantize for o in n.output}
    computing = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    products = [n for n in computing if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    assert kept and len(products) >= 4 and not kept & {n.name for n in products}
    assert all(all(i in dequantized for i in n.input[:2]) for n in computing if n.name not in kept)
    assert not any(i in dequantized for n in computing if n.name in kept for i in n.input)


def test_w8a16_runs_in_plain_onnxruntime_in_a_child_process(exports, tmp_path):
    """One guided UNet call of the t2i pipeline (unconditional and prompt rows) on a fresh latent, w8a16 vs fp32."""
    folder = exports["w8a16"]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(["", PROMPT], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="np")
    size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    latents = np.random.default_rng(0).standard_normal((2, 4, size, size)).astype(np.float32)
    feeds = {"input_ids": ids.input_ids.astype(np.int64), "sample": latents, "timestep": np.array(500.0, np.float32)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    command = [sys.executable, "-I", "-c", RUNNER, str(folder), str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = np.load(tmp_path / "out.npz")
    assert out["unet"].shape == out["unet_fp32"].shape == latents.shape
    assert psnr_db(out["unet_fp32"], out["unet"]) >= CHILD_PSNR_MIN_DB


def test_w8a16_validates_and_beats_static_int8_per_call(exports):
    manifest = _manifest(exports["w8a16"])
    assert manifest["quantized"] == {
        "unet": "w8a16",
        "reference": "unet_fp32",
        "reduce_range": False,
        "reduce_range_by": None,
    }
    assert manifest["calibration"] == _manifest(exports["static-int8"])["calibration"]
    assert manifest["calibration"]["t2i"]["examples"] >= 1
    assert all(r["ok"] for r in manifest["graph_agreement"])
    w8a16, int8 = _unet_row(exports["w8a16"], "w8a16"), _unet_row(exports["static-int8"], "static-int8")
    assert w8a16["floor_db"] == GRAPH_PSNR_FLOOR["w8a16"] > GRAPH_PSNR_FLOOR["static-int8"]
    assert w8a16["feeds"] == int8["feeds"]
    assert w8a16["psnr_db"] >= int8["psnr_db"] + W8A16_GAIN_MIN_DB, (w8a16, int8)
    image = manifest["image_agreement"][0]
    assert image["task"] == "t2i" and image["images"] >= 1


def test_w8a16_refuses_reduce_range_and_core_ml(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--quantize", "w8a16", "--reduce-range", "--out", tmp_path / "o")
    assert_clean_failure(result, "applies to --quantize dynamic-int8 or static-int8 only", exit_code=3)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="is not a mode"):
        CoreMLConfig(tasks="t2i", quantize="w8a16")


def test_w8a16_of_a_graph_with_external_weights_keeps_them_external(mtu_world, tmp_path):
    """An SD1.5 UNet passes protobuf's 2 GB: its weights live in external data, and the opset-21 conversion that
    16-bit Q/DQ needs must not serialize the graph whole (onnxruntime's own conversion does)."""
    out = tmp_path / "w8a16"
    result = invoke("onnx", mtu_world, "--task", "t2i", "--quantize", "w8a16", "--external-data", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    quantized = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in quantized.graph.initializer)
    assert {o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert not [p.name for p in (out / "unet_fp32").iterdir() if "opset" in p.name]  # the converted copy is gone
    assert all(row["ok"] for row in _manifest(out)["graph_agreement"])
