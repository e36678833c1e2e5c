"""Fused attention export: every UNet attention layer becomes one onnxruntime `MultiHeadAttention` node, the torch
model is unchanged, the graph matches torch on trajectory inputs, and optimum's ORT pipeline still runs the folder.
`--optimize`: every graph saved as onnxruntime optimizes it, validated as any export, still run by optimum."""

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
from mtu_export.shapes.tiny import tiny_unet

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


def test_optimum_runs_the_fused_and_the_optimized_t2i_folders(mtu_world, tmp_path):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    images = {}
    variants = {"default": (), "fused": ("--attention", "fused"), "optimized": ("--attention", "fused", "--optimize")}
    for name, options in variants.items():
        out = tmp_path / name
        assert invoke("onnx", mtu_world, "--task", "t2i", *options, "--out", out, *FAST).exit_code == 0
        pipe = ORTStableDiffusionPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                            height=64, width=64, output_type="np").images[0]  # fmt: skip
    for name in ("fused", "optimized"):
        mse = float(np.mean((images["default"] - images[name]) ** 2))
        assert mse == 0 or 10 * np.log10(1 / mse) >= PIPELINE_PSNR_MIN_DB, name


def test_optimized_export_saves_the_graphs_onnxruntime_runs(mtu_world, tmp_path):
    """--optimize writes each graph as a CPU session at level "extended" optimizes it: a session loading it finds
    nothing left to do at that level, its nodes differ from the plain export's, and it meets the fp32 floor."""
    from mtu_export.export.onnx import OPTIMIZE_LEVEL
    from mtu_export.export.runtime import op_census, save_optimized

    plain, optimized = tmp_path / "plain", tmp_path / "optimized"
    for out, options in ((plain, ()), (optimized, ("--optimize",))):
        result = invoke("onnx", mtu_world, "--task", "t2i", "--attention", "fused", *options, "--out", out, *FAST)
        assert result.exit_code == 0, result.output
    manifest = json.loads((optimized / "manifest.json").read_text())
    graphs = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert manifest["optimized"]["graphs"] == graphs and manifest["optimized"]["level"] == OPTIMIZE_LEVEL
    assert json.loads((plain / "manifest.json").read_text())["optimized"] is None
    for graph in graphs:
        saved = optimized / graph / "model.onnx"
        again = save_optimized(saved, tmp_path / f"{graph}-again.onnx", OPTIMIZE_LEVEL, threads=1, external=False)
        assert op_census(again) == op_census(saved), graph
    assert op_census(optimized / "unet" / "model.onnx") != op_census(plain / "unet" / "model.onnx")
    rows = manifest["graph_agreement"]
    assert {r["component"] for r in rows} >= set(graphs)
    assert all(r["psnr_db"] is None or r["psnr_db"] >= GRAPH_PSNR_MIN_DB for r in rows)


def test_optimize_is_an_onnx_option_only():
    from mtu_export.config import CoreMLConfig, OnnxConfig

    assert OnnxConfig(optimize=True).optimize
    with pytest.raises(TypeError, match="optimize"):
        CoreMLConfig(optimize=True)


def test_fused_attention_refuses_the_dynamo_exporter(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--attention", "fused", "--dynamo", "--out", tmp_path / "o")
    assert_clean_failure(result, "needs the TorchScript exporter", exit_code=3)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("optimize", [False, True])
def test_static_int8_of_the_fused_graph_runs_its_convolutions_and_matmuls_in_int8(optimize, mtu_world, tmp_path):
    """What onnxruntime runs, not what the file holds: after its QDQ fusions every quantized Conv and weight MatMul of
    the fused graph is an int8 kernel, and only the layers static int8 keeps (conv_in, conv_out, the timestep
    embedding) run in float. With --optimize the file holds those int8 kernels itself; the fp32 reference stays
    as exported."""
    from mtu_export.export.runtime import op_census, ops_run
    from mtu_export.quantize import static_exclusions

    out = tmp_path / "s8"
    args = ("--task", "t2i", "--attention", "fused", "--quantize", "static-int8", "--out", out, *FAST)
    result = invoke("onnx", mtu_world, *args, *(("--optimize",) if optimize else ()))
    assert result.exit_code == 0, result.output
    fp32 = onnx.load(str(out / "unet_fp32" / "model.onnx")).graph
    kept = set(static_exclusions(fp32))
    weights = {i.name for i in fp32.initializer}
    quantizable = [n for n in fp32.node if n.op_type in ("Conv", "MatMul") and n.name not in kept]
    assert all(n.op_type == "Conv" or any(i in weights for i in n.input) for n in quantizable)
    saved = out / "unet" / "model.onnx"
    ran = op_census(saved) if optimize else ops_run(saved, threads=1)
    int8 = ran.get("QLinearConv", 0) + ran.get("QLinearMatMul", 0) + ran.get("MatMulIntegerToFloat", 0)
    assert int8 == len(quantizable) and ran.get("QLinearConv", 0) > 0
    float_convs = [n for n in fp32.node if n.op_type == "Conv" and n.name in kept]
    assert ran.get("Conv", 0) + ran.get("FusedConv", 0) == len(float_convs) == 2
    assert ran["MultiHeadAttention"] == sum(1 for n in fp32.node if n.op_type == "MultiHeadAttention")
