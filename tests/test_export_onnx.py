"""`mtu-export onnx` and `generate` on a toy shapes-world MTU checkpoint (perturbed so tasks really differ):
every graph reloads in onnxruntime and matches torch, optimum's ORT pipelines load the t2i and inpaint folders and
reproduce diffusers' torch pipelines, the all-task bundle stores shared weights once, quantized modes validate,
drift fails the command, and two exports are byte-identical."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import FAST, PROMPT, assert_clean_failure, assert_valid_manifest, invoke, unet_inputs
from PIL import Image

from mtu_export.bundle import bundle_tasks
from mtu_export.config import OnnxConfig
from mtu_export.export import onnx as onnx_export
from mtu_export.fold import fold_checkpoint, fold_task
from mtu_export.metrics import psnr_db
from mtu_export.shapes.world import make_example

GRAPH_PSNR_MIN_DB = 60.0  # fp32 graphs vs torch on trajectory inputs
PIPELINE_PSNR_MIN_DB = 40.0  # optimum's ORT pipeline vs diffusers' torch pipeline, same seed, uint8 images
BUNDLE_RATIO_MAX = 1.05  # all-task bundle bytes / one single-task export
BUNDLE_ATOL = 1e-5  # bundle (task_id) vs routed model, fp32


@pytest.fixture(scope="module")
def exports(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for task in ("all", "t2i", "inpaint"):
        result = invoke("onnx", mtu_world, "--task", task, "--out", root / task, *FAST)
        assert result.exit_code == 0, result.output
        out[task] = root / task
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_bundle_with_task_id_equals_the_routed_model_for_every_task(mtu_world):

    from mtu_export.checkpoint import load_checkpoint

    mtu = load_checkpoint(mtu_world).model
    bundle = bundle_tasks(mtu)
    for spec in mtu.config.tasks:
        inputs = unet_inputs(spec.in_channels, size=16, seed=3)
        inputs["encoder_hidden_states"] = torch.randn(2, 7, mtu.unet.config.cross_attention_dim)
        with torch.no_grad():
            routed = mtu(**inputs, task=spec.name).sample
            got = bundle(
                bundle.pad(inputs["sample"]),
                inputs["timestep"],
                inputs["encoder_hidden_states"],
                bundle.task_id(spec.name),
            )
        assert (routed - got).abs().max().item() <= BUNDLE_ATOL


def test_every_graph_reloads_in_onnxruntime_and_matches_torch(exports):
    import onnxruntime as ort

    for name, folder in exports.items():
        manifest = _manifest(folder)
        rows = manifest["graph_agreement"]
        components = {r["component"] for r in rows}
        assert components == {"text_encoder", "vae_encoder", "vae_decoder", "unet"}
        assert all(r["ok"] and (r["psnr_db"] is None or r["psnr_db"] >= GRAPH_PSNR_MIN_DB) for r in rows), rows
        tasks = {r["task"] for r in rows if r["component"] == "unet"}
        assert tasks == ({"t2i", "edit", "sr", "inpaint"} if name == "all" else {name})
        for component in components:
            ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])
            assert (folder / component / "config.json").is_file()
        assert all(r["psnr_db"] is None or r["psnr_db"] >= PIPELINE_PSNR_MIN_DB for r in manifest["image_agreement"])


def test_graphs_carry_their_validation_in_onnx_metadata(exports):
    model = onnx.load(str(exports["t2i"] / "unet" / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["mtu_export.tasks"]) == ["t2i"]
    assert props["mtu_export.source_sha256"] == _manifest(exports["t2i"])["source"]["sha256"]
    agreement = json.loads(props["mtu_export.agreement"])
    assert agreement and all(r["component"] == "unet" and r["ok"] for r in agreement)
    assert "t2i" in json.loads(props["mtu_export.routing"])


def test_bundle_stores_shared_weights_once(exports):
    sizes = _manifest(exports["all"])["sizes"]
    assert sizes["tasks"] == 4
    assert sizes["ratio"] <= BUNDLE_RATIO_MAX, sizes
    unet = onnx.load(str(exports["all"] / "unet" / "model.onnx"))
    assert [i.name for i in unet.graph.input] == ["sample", "timestep", "encoder_hidden_states", "task_id"]


def test_optimum_pipelines_load_the_exports_and_match_diffusers(exports, mtu_world, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from optimum.onnxruntime import ORTStableDiffusionInpaintPipeline, ORTStableDiffusionPipeline

    example = make_example("inpaint", "heldout", 1)
    image, mask = Image.fromarray(example.target), Image.fromarray(example.mask.astype(np.uint8) * 255)
    cases = {
        "t2i": (ORTStableDiffusionPipeline, StableDiffusionPipeline, {}),
        "inpaint": (
            ORTStableDiffusionInpaintPipeline,
            StableDiffusionInpaintPipeline,
            {"image": image, "mask_image": mask},
        ),
    }
    for task, (ort_class, torch_class, extra) in cases.items():
        folded = fold_checkpoint(mtu_world, task, tmp_path / f"folded-{task}").path
        kwargs = dict(num_inference_steps=6, guidance_scale=3.0, output_type="np", height=64, width=64, **extra)
        ort_pipe = ort_class.from_pretrained(exports[task])
        torch_pipe = torch_class.from_pretrained(folded, safety_checker=None)
        got = ort_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        want = torch_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert got.shape == want.shape == (1, 64, 64, 3)
        value = psnr_db((want * 255).round(), (got * 255).round(), peak=255.0)
        assert value is None or value >= PIPELINE_PSNR_MIN_DB, (task, value)


def test_generate_runs_every_task_reproducibly(exports, tmp_path):
    example = make_example("inpaint", "heldout", 2)
    Image.fromarray(example.target).save(tmp_path / "image.png")
    Image.fromarray(example.mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    inputs = ("--image", tmp_path / "image.png", "--mask", tmp_path / "mask.png")
    for task in ("t2i", "edit", "sr", "inpaint"):
        outs = []
        for run in range(2):
            out = tmp_path / f"{task}-{run}.png"
            result = invoke(
                "generate", exports["all"], "--task", task, "--prompt", PROMPT, "--out", out, "--steps", "4", *inputs
            )
            assert result.exit_code == 0, result.output
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], task
        # sr takes the 64x64 image as its low-res input: 4x its sides, within 4x the model's area (fit's cap)
        side = 128 if task == "sr" else 64
        assert np.asarray(Image.open(tmp_path / f"{task}-0.png")).shape == (side, side, 3)


def test_generate_through_optimum_equals_the_own_sampler(exports, tmp_path):
    outs = {}
    for flag in ("--optimum", "--no-optimum"):
        out = tmp_path / f"t2i{flag}.png"
        result = invoke(
            "generate", exports["t2i"], "--task", "t2i", "--prompt", PROMPT, "--out", out, "--steps", "5", flag
        )
        assert result.exit_code == 0, result.output
        assert ("optimum ORTStableDiffusionPipeline" in result.output) == (flag == "--optimum")
        outs[flag] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(outs["--optimum"] - outs["--no-optimum"]).max() <= 1


@pytest.mark.parametrize("mode", ["dynamic-int8", "static-int8", "fp16"])
def test_quantized_exports_validate_and_keep_the_fp32_reference(mtu_world, tmp_path, mode):
    out = tmp_path / mode
    result = invoke("onnx", mtu_world, "--task", "t2i", "--quantize", mode, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    rows = [r for r in manifest["graph_agreement"] if r["component"] == f"unet[{mode}]"]
    assert len(rows) == 1 and rows[0]["ok"] and rows[0]["psnr_db"] < GRAPH_PSNR_MIN_DB * 3
    assert (out / "unet_fp32" / "model.onnx").is_file() and manifest["quantized"]["unet"] == mode
    image = manifest["image_agreement"][0]
    assert image["task"] == "t2i" and len(image["psnr_db_per_image"]) == image["images"] >= 1
    finite = [v for v in image["psnr_db_per_image"] if v is not None]  # None: that image came out identical
    assert image["psnr_db"] is None or min(finite) <= image["psnr_db"] <= max(finite)
    ops = {n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node}
    expected = {"dynamic-int8": "DynamicQuantizeLinear", "static-int8": "QuantizeLinear", "fp16": "Cast"}[mode]
    assert expected in ops
    if mode == "static-int8":
        _assert_attention_products_stay_fp32(out)
    if mode != "fp16":
        from mtu_export.quantize import saturating_int8_cpu

        # by default 7-bit weights exactly where this machine's int8 kernels would saturate 8-bit ones
        assert manifest["quantized"]["reduce_range"] == saturating_int8_cpu()
        assert _largest_int8_weight(out) == (64 if saturating_int8_cpu() else 127)


def _largest_int8_weight(out: Path) -> int:
    """The largest |q| of the quantized UNet's int8 weights (per-channel symmetric: 127 at 8 bits, 64 at 7)."""
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights
    return max(int(np.abs(w.astype(int)).max()) for w in weights)


@pytest.mark.parametrize("mode", ["dynamic-int8", "static-int8"])
def test_int8_weights_take_the_bits_asked_for(mtu_world, tmp_path, mode):
    """The other choice than this machine's default: --no-reduce-range where the default is 7 bits, else
    --reduce-range; both validate against torch, and the manifest says who chose."""
    from mtu_export.quantize import saturating_int8_cpu

    flag = "--no-reduce-range" if saturating_int8_cpu() else "--reduce-range"
    out = tmp_path / "q"
    args = ("--task", "t2i", "--quantize", mode, flag, "--image-count", "0", "--out", out, *FAST)
    result = invoke("onnx", mtu_world, *args)
    assert result.exit_code == 0, result.output
    quantized = _manifest(out)["quantized"]
    assert quantized["reduce_range"] == (flag == "--reduce-range")
    assert quantized["reduce_range_by"] == "--reduce-range / --no-reduce-range"
    assert _largest_int8_weight(out) == (64 if flag == "--reduce-range" else 127)


def test_reduce_range_is_refused_outside_int8(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--quantize", "fp16", "--reduce-range", "--out", tmp_path / "o")
    assert_clean_failure(result, "applies to --quantize dynamic-int8 or static-int8 only", exit_code=3)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", {"avx2", "fma"}, True),  # AVX2 without VNNI: vpmaddubsw sums pairs in 16 bits
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
        ("x86_64", {"avx2", "avx_vnni"}, False),
        ("aarch64", {"asimd", "asimddp"}, False),
        ("x86_64", set(), False),  # flags unknown (no /proc/cpuinfo): not assumed
    ],
)
def test_which_cpus_get_7_bit_static_int8_weights(monkeypatch, machine, flags, saturates):
    import platform

    from mtu_export import machine as machine_facts
    from mtu_export import quantize

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(machine_facts, "cpu_flags", lambda: set(flags))
    assert quantize.saturating_int8_cpu() is saturates


def _assert_attention_products_stay_fp32(out):
    """Static int8 quantizes weight products and leaves Q·Kᵀ and softmax·V (both operands activations) in fp32."""
    from mtu_export.quantize import static_exclusions

    kept = set(static_exclusions(onnx.load(str(out / "unet_fp32" / "model.onnx")).graph))
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    products = [n for n in matmuls if n.name in kept]
    assert len(products) >= 4 and all(n.name.split("/")[-2] in ("attn1", "attn2") for n in products)
    assert not any(i in dequantized for n in products for i in n.input)
    assert all(any(i in dequantized for i in n.input) for n in matmuls if n.name not in kept)


def test_a_drifting_graph_fails_the_export_and_writes_nothing(mtu_world, tmp_path, monkeypatch):
    original = onnx_export.write_graph

    def tampered(spec, module, example, folder, *args, **kwargs):
        path = original(spec, module, example, folder, *args, **kwargs)
        if spec.component == "unet" and folder.name == "unet":
            model = onnx.load(str(path))
            weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            array = onnx.numpy_helper.to_array(weight).copy()
            array.flat[: array.size // 4] += 0.5
            weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
            onnx.save_model(model, str(path))
        return path

    monkeypatch.setattr(onnx_export, "write_graph", tampered)
    result = invoke("onnx", mtu_world, "--task", "t2i", "--out", tmp_path / "bad", "--image-count", "0")
    assert_clean_failure(result, "drift from torch", exit_code=6)
    assert "unet[t2i].out_sample" in result.stderr
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    kept = invoke("onnx", mtu_world, "--task", "t2i", "--out", tmp_path / "kept", "--image-count", "0", "--allow-drift")
    assert kept.exit_code == 0, kept.output
    assert not all(r["ok"] for r in _manifest(tmp_path / "kept")["graph_agreement"])


def test_two_exports_are_byte_identical(mtu_world, tmp_path):
    for name in ("a", "b"):
        result = invoke("onnx", mtu_world, "--task", "sr", "--out", tmp_path / name, "--image-count", "0")
        assert result.exit_code == 0, result.output
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 8
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_fixed_shapes_and_external_data(mtu_world, tmp_path):
    out = tmp_path / "fixed"
    result = invoke(
        "onnx", mtu_world, "--task", "edit", "--fixed-shapes", "--external-data", "--out", out, "--image-count", "0"
    )
    assert result.exit_code == 0, result.output
    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    dims = [d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 8, 16, 16]  # InstructPix2Pix guidance batch, 4 + 4 channels, 16x16 latents
    data = out / "unet" / "model.onnx_data"
    size = data.stat().st_size
    # saved again over itself (a re-export into a kept folder): onnx would append the weights to the old data file
    onnx_export._save(onnx.load(str(out / "unet" / "model.onnx")), out / "unet" / "model.onnx", external=True)
    assert data.stat().st_size == size


def test_dynamo_exporter_round_trips_with_fixed_shapes(mtu_world, tmp_path):
    args = ("--task", "t2i", "--dynamo", "--fixed-shapes", "--image-count", "0")
    result = invoke("onnx", mtu_world, *args, "--out", tmp_path / "dyn")
    assert result.exit_code == 0, result.output
    assert all(r["ok"] for r in _manifest(tmp_path / "dyn")["graph_agreement"])


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("--task", "inpait"), "did you mean 'inpaint'", 3),
        (("--task", "t2i,edit"), "one task or all", 3),
        (("--dynamo", "--opset", "17"), "dynamo exporter needs opset >= 18", 3),
        (("--opset", "9"), "--opset 9 is not supported", 3),
        (("--quantize", "int3"), "is not a mode", 3),
        (("--height", "60"), "multiple of 8", 3),
    ],
)
def test_bad_export_options_are_one_line_errors(mtu_world, tmp_path, args, message, code):
    result = invoke("onnx", mtu_world, "--out", tmp_path / "x", *args)
    assert_clean_failure(result, message, exit_code=code)
    assert not (tmp_path / "x").exists()


def test_export_refuses_non_mtu_input_and_existing_output(world_pipeline, mtu_world, tmp_path):
    assert_clean_failure(invoke("onnx", world_pipeline, "--out", tmp_path / "x"), "run `mtu-export upcycle`", 2)
    (tmp_path / "taken").mkdir()
    assert_clean_failure(invoke("onnx", mtu_world, "--out", tmp_path / "taken"), "already exists", 5)


def test_generate_refuses_bad_requests(exports, tmp_path):
    assert_clean_failure(
        invoke("generate", exports["t2i"], "--task", "edit", "--prompt", "x", "--out", tmp_path / "o.png"),
        "not 'edit'",
        3,
    )
    assert_clean_failure(
        invoke("generate", exports["all"], "--task", "inpaint", "--prompt", "x", "--out", tmp_path / "o.png"),
        "needs --image",
        3,
    )
    assert_clean_failure(
        invoke("generate", tmp_path, "--task", "t2i", "--prompt", "x", "--out", tmp_path / "o.png"),
        "no manifest.json",
        2,
    )
    assert not (tmp_path / "o.png").exists()


def test_exported_unet_equals_the_folded_unet_of_the_same_task(mtu_world, exports):
    from mtu_export.checkpoint import load_checkpoint
    from mtu_export.export.runtime import OrtUNet

    folded = fold_task(load_checkpoint(mtu_world).model, "t2i")
    g = torch.Generator().manual_seed(5)
    sample, hidden = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 40, folded.config.cross_attention_dim, generator=g),
    )
    t = torch.tensor([321, 321])
    with torch.no_grad():
        want = folded(sample, t, hidden).sample
    for folder, ids in ((exports["t2i"], {}), (exports["all"], {"task_id": 0, "channels": 9})):
        got = OrtUNet(folder / "unet" / "model.onnx", **ids)(sample, t, hidden)
        assert (want - got).abs().max().item() <= BUNDLE_ATOL * 10


def test_layer_sensitivity_ranks_the_layer_int8_hurts_most_first(tmp_path):
    """Two convolutions; the first reads an input with one huge channel that it ignores (zero weights), so its
    uint8 input scale is coarse for the channels that matter, and quantizing it alone costs far more than quantizing
    the second, whose input has an ordinary range."""
    from onnx import TensorProto, helper, numpy_helper

    from mtu_export.quantize import layer_sensitivity

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.2
    w1[:, 0] = 0.0
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="first"),
        helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1], name="second"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, 8, 8]) for n, c in (("x", 4), ("y", 4))]
    weights = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    src = tmp_path / "two.onnx"
    model = helper.make_model(
        helper.make_graph(nodes, "two", io[:1], io[1:], weights), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, str(src))
    feeds = []
    for _ in range(4):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        x[:, 0] *= 200.0
        feeds.append({"x": x})
    errors = layer_sensitivity(src, feeds[:2], feeds[2:], tmp_path)
    assert set(errors) == {"(all)", "first", "second"}
    assert all(0 < e < 1 for e in errors.values())
    assert errors["first"] > 10 * errors["second"]


def test_manifests_validate_against_the_schema(exports) -> None:
    for folder in exports.values():  # a task, the all-task bundle
        export = assert_valid_manifest(folder)["export"]
        assert set(export) == {f.name for f in fields(OnnxConfig)} and export["opset"] == 18  # no Core ML options


def test_the_schema_refuses_what_readers_could_not_use(exports) -> None:
    """The check can fail: a Core ML-style task list, a missing agreement, a row without its PSNR."""
    import jsonschema
    from helpers import MANIFEST_SCHEMA

    validator = jsonschema.Draft202012Validator(json.loads(MANIFEST_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(validator.schema)
    good = _manifest(exports["all"])
    assert validator.is_valid(good) and good["kind"] == "bundle"
    broken = [
        good | {"tasks": list(good["tasks"])},
        {k: v for k, v in good.items() if k != "graph_agreement"},
        good | {"graph_agreement": [{k: v for k, v in good["graph_agreement"][0].items() if k != "psnr_db"}]},
        good | {"format": "mtu-export-onnx/0"},
        good | {"kind": "multifunction"},
    ]
    assert not any(validator.is_valid(m) for m in broken)
