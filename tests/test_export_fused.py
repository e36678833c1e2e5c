"""Fused attention export: every UNet attention layer becomes one onnxruntime `MultiHeadAttention` node, the torch
model is unchanged, the graph matches torch on trajectory inputs, and optimum's ORT pipeline still runs the folder."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from helpers import FAST, PROMPT, assert_clean_failure, invoke, unet_inputs

from mtu_export.checkpoint import load_checkpoint
from mtu_export.export.attention import fuse_attention_
from mtu_export.tiny import tiny_unet

GRAPH_PSNR_MIN_DB = 60.0
PIPELINE_PSNR_MIN_DB = 40.0


def test_fused_processor_computes_exactly_what_diffusers_does():
    unet = tiny_unet().eval()
    fused = copy.deepcopy(unet)
    assert fuse_attention_(fused) > 0
    with torch.no_grad():
        inputs = unet_inputs()
        assert torch.equal(unet(**inputs).sample, fused(**inputs).sample)


@pytest.mark.parametrize("task", ["t2i", "all"])
def test_fused_export_has_one_attention_node_per_layer_and_validates(task, mtu_world, tmp_path):
    out = tmp_path / task
    result = invoke("onnx", mtu_world, "--task", task, "--attention", "fused", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    unet = load_checkpoint(mtu_world).model.unet
    layers = sum(1 for m in unet.modules() if type(m).__name__ == "Attention")
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
    manifest = json.loads((out / "manifest.json").read_text())
    unet_rows = [r for r in manifest["graph_agreement"] if r["component"] == "unet"]
    assert unet_rows and all(r["psnr_db"] is None or r["psnr_db"] >= GRAPH_PSNR_MIN_DB for r in unet_rows)
    assert manifest["export"]["attention"] == "fused"


def test_optimum_runs_the_fused_t2i_folder(mtu_world, tmp_path):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    images = {}
    for attention in ("default", "fused"):
        out = tmp_path / attention
        assert invoke("onnx", mtu_world, "--task", "t2i", "--attention", attention, "--out", out, *FAST).exit_code == 0
        pipe = ORTStableDiffusionPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        images[attention] = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                                 height=64, width=64, output_type="np").images[0]  # fmt: skip
    mse = float(np.mean((images["default"] - images["fused"]) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= PIPELINE_PSNR_MIN_DB


def test_fused_attention_refuses_the_dynamo_exporter(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--attention", "fused", "--dynamo", "--out", tmp_path / "o")
    assert_clean_failure(result, "needs the TorchScript exporter", exit_code=3)
    assert not (tmp_path / "o").exists()


def test_static_int8_of_the_fused_graph_runs_its_convolutions_and_matmuls_in_int8(mtu_world, tmp_path):
    """What onnxruntime runs, not what the file holds: after its QDQ fusions every quantized Conv and weight MatMul of
    the fused graph is an int8 kernel, and only the layers static int8 keeps (conv_in, conv_out, the timestep
    embedding) run in float."""
    from mtu_export.export.runtime import ops_run
    from mtu_export.quantize import static_exclusions

    out = tmp_path / "s8"
    args = ("--task", "t2i", "--attention", "fused", "--quantize", "static-int8", "--out", out, *FAST)
    result = invoke("onnx", mtu_world, *args)
    assert result.exit_code == 0, result.output
    fp32 = onnx.load(str(out / "unet_fp32" / "model.onnx")).graph
    kept = set(static_exclusions(fp32))
    weights = {i.name for i in fp32.initializer}
    quantizable = [n for n in fp32.node if n.op_type in ("Conv", "MatMul") and n.name not in kept]
    assert all(n.op_type == "Conv" or any(i in weights for i in n.input) for n in quantizable)
    ran = ops_run(out / "unet" / "model.onnx", threads=1)
    int8 = ran.get("QLinearConv", 0) + ran.get("QLinearMatMul", 0) + ran.get("MatMulIntegerToFloat", 0)
    assert int8 == len(quantizable) and ran.get("QLinearConv", 0) > 0
    float_convs = [n for n in fp32.node if n.op_type == "Conv" and n.name in kept]
    assert ran.get("Conv", 0) + ran.get("FusedConv", 0) == len(float_convs) == 2
    assert ran["MultiHeadAttention"] == sum(1 for n in fp32.node if n.op_type == "MultiHeadAttention")
