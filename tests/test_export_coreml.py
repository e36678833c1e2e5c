"""`mtu-export coreml` on the toy shapes-world MTU checkpoint. Linux cannot run Core ML models, so these tests
convert, reload and read the packages' specs (inputs, outputs, MIL op census); numeric parity runs on macOS."""

from __future__ import annotations

import builtins
import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, assert_valid_manifest, invoke

from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import CoreMLConfig, ExportConfig, OnnxConfig
from mtu_export.errors import ConfigError
from mtu_export.export.coreml import convert_module, describe_package, require_coremltools
from mtu_export.export.graphs import UNetGraph
from mtu_export.export.split_einsum import split_einsum_attention_
from mtu_export.fold import fold_task
from mtu_export.metrics import psnr_db
from mtu_export.shapes.tiny import tiny_unet
from mtu_export.upcycle import load_unet

MULTIFUNCTION_MAX_RATIO = 0.5  # four tasks in one package vs four separate packages
COREML_PSNR_MIN_DB = 35.0
SPLIT_EINSUM_PSNR_MIN_DB = 60.0  # the split-einsum UNet against the original, both torch fp32
SHIPPED = Path(__file__).parents[1] / "models" / "shapes-mtu"


@pytest.fixture(scope="module")
def coreml_t2i(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coreml") / "t2i"
    result = invoke("coreml", mtu_world, "--task", "t2i", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_every_component_converts_and_reloads_with_the_expected_interface(coreml_t2i):
    packages = _manifest(coreml_t2i)["packages"]
    assert set(packages) == {"text_encoder", "vae_encoder", "vae_decoder", "unet"}
    assert packages["text_encoder"]["outputs"] == ["last_hidden_state", "pooler_output"]
    assert packages["vae_decoder"]["inputs"] == ["latent_sample"]
    unet = packages["unet"]
    assert unet["inputs"] == ["sample", "timestep", "encoder_hidden_states"] and unet["outputs"] == ["out_sample"]
    assert unet["functions"]["main"]["inputs"]["sample"] == [2, 4, 16, 16]  # fixed CFG batch of 2
    for info in packages.values():
        assert (coreml_t2i / info["path"]).is_dir() and info["bytes"] > 0


def test_folded_task_has_the_op_census_of_a_stock_unet(coreml_t2i, world_pipeline, tmp_path):
    """No routing op survives: the t2i package has exactly the ops of the base UNet converted the same way."""
    ct = require_coremltools()
    base = load_unet(world_pipeline).eval()
    feed = {
        "sample": torch.randn(2, 4, 16, 16),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 40, base.config.cross_attention_dim),
    }
    model = convert_module(ct, UNetGraph(base), feed, ["out_sample"], CoreMLConfig(), "iOS17")
    model.save(str(tmp_path / "base.mlpackage"))
    want = describe_package(ct, tmp_path / "base.mlpackage")["functions"]["main"]["ops"]
    got = _manifest(coreml_t2i)["packages"]["unet"]["functions"]["main"]["ops"]
    assert got == want
    assert "softmax" in got  # attention is there; nothing was lost on the way


def test_all_tasks_make_one_multifunction_unet_that_stores_shared_weights_once(mtu_world, tmp_path):
    out = tmp_path / "all"
    result = invoke("coreml", mtu_world, "--task", "all", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = assert_valid_manifest(out)
    assert manifest["kind"] == "multifunction" and manifest["tasks"]["edit"] == {"in_channels": 8, "function": "edit"}
    unet = manifest["packages"]["unet"]
    assert set(unet["functions"]) == {"t2i", "edit", "sr", "inpaint"}
    assert unet["functions"]["edit"]["inputs"]["sample"] == [3, 8, 16, 16]  # two-scale guidance batch, 8 channels
    assert manifest["export"]["target"] == "iOS18"
    fields_of = {f.name for f in fields(CoreMLConfig)}
    assert set(manifest["export"]) == fields_of  # the options Core ML reads, none of ONNX's
    sizes = manifest["sizes"]
    assert sizes["ratio_to_separate"] <= MULTIFUNCTION_MAX_RATIO, sizes


def test_int8_weights_shrink_the_unet(mtu_world, coreml_t2i, tmp_path):
    out = tmp_path / "int8"
    result = invoke("coreml", mtu_world, "--task", "t2i", "--quantize", "int8", "--out", out)
    assert result.exit_code == 0, result.output
    fp16 = _manifest(coreml_t2i)["packages"]["unet"]["bytes"]
    int8 = _manifest(out)["packages"]["unet"]["bytes"]
    assert int8 < 0.7 * fp16
    assert "constexpr_affine_dequantize" in json.dumps(_manifest(out)["packages"]["unet"]["functions"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--task", "all", "--target", "iOS17"), "needs Core ML's iOS18 target"),
        (("--task", "t2i", "--quantize", "int4-block"), "int4-block needs Core ML's iOS18 target"),
        (("--task", "t2i", "--quantize", "dynamic-int8"), "is not a mode"),
        (("--task", "t2i", "--target", "iOS16"), "--target 'iOS16' is not supported"),
        (("--task", "t2i", "--attention", "fused"), "`mtu-export coreml --attention fused` is not offered"),
    ],
)
def test_bad_coreml_options_are_one_line_errors(mtu_world, tmp_path, args, message):
    result = invoke("coreml", mtu_world, "--out", tmp_path / "x", *args)
    assert_clean_failure(result, message, exit_code=3)
    assert not (tmp_path / "x").exists()


def test_missing_coremltools_is_a_one_line_error(mtu_world, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_coremltools(name, *args, **kwargs):
        if name == "coremltools" or name.startswith("coremltools."):
            raise ImportError("No module named 'coremltools'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    result = invoke("coreml", mtu_world, "--task", "t2i", "--out", tmp_path / "x")
    assert_clean_failure(result, "pip install coremltools", exit_code=3)
    assert not (tmp_path / "x").exists()


def test_linux_records_why_numbers_were_not_compared(coreml_t2i):
    manifest = _manifest(coreml_t2i)
    if sys.platform == "darwin":
        assert manifest["graph_agreement"] and manifest["graph_agreement_skipped"] is None
    else:
        assert manifest["graph_agreement"] == [] and "needs macOS" in manifest["graph_agreement_skipped"]


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction exists only on macOS")
def test_coreml_packages_match_torch_on_macos(coreml_t2i):
    rows = _manifest(coreml_t2i)["graph_agreement"]
    assert {r["component"] for r in rows} >= {"text_encoder", "vae_encoder", "vae_decoder", "unet[t2i]"}
    assert all(r["psnr_db"] is None or r["psnr_db"] >= COREML_PSNR_MIN_DB for r in rows), rows


# ------------------------------------------------------------------------------------------ split-einsum attention
def _attention_inputs(unet, batch: int = 2, tokens: int = 7, seed: int = 1) -> dict:
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500.0] * batch),
        "encoder_hidden_states": torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g),
    }


def _split_einsum_psnr(unet) -> tuple[int, float | None]:
    inputs = _attention_inputs(unet)
    with torch.no_grad():
        before = unet(**inputs).sample.numpy()
        layers = split_einsum_attention_(unet)
        after = unet(**inputs).sample.numpy()
    return layers, psnr_db(before, after)


def test_split_einsum_attention_equals_the_original_unet_in_torch():
    """A tiny real diffusers UNet, and the shipped model's folded t2i UNet: the same numbers, >= 60 dB."""
    layers, value = _split_einsum_psnr(tiny_unet().eval())
    assert layers > 0 and (value is None or value >= SPLIT_EINSUM_PSNR_MIN_DB), value
    shipped = fold_task(load_checkpoint(SHIPPED, dtype=torch.float32).model, "t2i").eval()
    layers, value = _split_einsum_psnr(shipped)
    assert layers > 0 and (value is None or value >= SPLIT_EINSUM_PSNR_MIN_DB), value


@pytest.fixture(scope="module")
def coreml_split_einsum(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("coreml") / "t2i-split-einsum"
    result = invoke("coreml", mtu_world, "--task", "t2i", "--attention", "split-einsum", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_split_einsum_export_records_its_torch_check_and_its_mil_op_census(coreml_split_einsum):
    attention = _manifest(coreml_split_einsum)["attention"]
    assert attention["layout"] == "split-einsum" and attention["layers"] > 0
    (row,) = attention["torch_agreement"]
    assert row["ok"] and (row["psnr_db"] is None or row["psnr_db"] >= SPLIT_EINSUM_PSNR_MIN_DB), row
    census = attention["ops"]["main"]
    # One softmax and two einsums per head of every layer; no batched matmul is left for attention.
    assert census["einsum"] == 2 * census["softmax"] > 0 and census["matmul"] == 0, census
    ops = _manifest(coreml_split_einsum)["packages"]["unet"]["functions"]["main"]["ops"]
    assert {op: ops.get(op, 0) for op in census} == census


def test_default_attention_keeps_the_exported_matmuls(coreml_t2i):
    attention = _manifest(coreml_t2i)["attention"]
    assert attention["layout"] == "default" and attention["torch_agreement"] == []
    assert attention["ops"]["main"]["einsum"] == 0 and attention["ops"]["main"]["matmul"] > 0


def test_split_einsum_is_a_core_ml_option_only():
    with pytest.raises(ConfigError, match="`mtu-export onnx --attention split-einsum` is not offered"):
        OnnxConfig(attention="split-einsum")
    assert CoreMLConfig(attention="split-einsum").attention == "split-einsum"
    with pytest.raises(ConfigError, match="`mtu-export coreml --attention fused` is not offered"):
        CoreMLConfig(attention="fused")
    assert "split-einsum" not in ExportConfig.attention_modes


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction exists only on macOS")
def test_split_einsum_unet_matches_torch_on_macos(coreml_split_einsum):
    rows = _manifest(coreml_split_einsum)["graph_agreement"]
    unet = [r for r in rows if r["component"] == "unet[t2i]"]
    assert unet and all(r["psnr_db"] is None or r["psnr_db"] >= COREML_PSNR_MIN_DB for r in unet), unet


def test_manifests_validate_against_the_schema(coreml_t2i, coreml_split_einsum) -> None:
    for folder in (coreml_t2i, coreml_split_einsum):
        manifest = assert_valid_manifest(folder)
        assert manifest["tasks"] == {"t2i": {"in_channels": 4, "function": None}}
