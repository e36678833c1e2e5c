"""A task added as registry entries only: `sr2` (x2 super-resolution through the latent of the bicubic-upsampled
input) is a condition and a task in tasks.py, nothing else. Every sampler builds it from the registry: it trains on
the shapes world, exports to ONNX with validation, and `generate`, the torch-free on-device pipeline and the folded
pipeline plain diffusers loads give the same 2x image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import PROMPT, invoke, perturb_
from PIL import Image

from mtu_export.checkpoint import save_checkpoint
from mtu_export.config import MoEConfig
from mtu_export.data import open_source
from mtu_export.ondevice.pipeline import OnDevicePipeline
from mtu_export.tasks import BUILTIN, CONDITIONS, parse_tasks, resolve
from mtu_export.upcycle import load_unet, upcycle_unet

STEPS, SEED, GUIDANCE = 3, 4, 3.0
LOW_RES = 24  # the request's input; sr2's output has twice its sides
GREY_LEVELS_MAX = 1  # on-device vs generate (float32 rounding)
FOLD_GREY_LEVELS_MAX = 2  # folded torch pipeline vs generate's ONNX graphs


def test_sr2_is_defined_by_its_entries():
    (spec,) = parse_tasks("sr2")
    task = resolve(spec)
    assert spec.in_channels == 8 and task.condition is CONDITIONS["low_res_latent_x2"]
    assert task.input_scale(vae_factor=4) == 2 and task.needs == ("image",) and task.super_resolution
    example = open_source(BUILTIN["sr2"], None, "train", 64, 4).example(0)
    assert example.low_res.shape == (32, 32, 3) and example.target.shape == (64, 64, 3)  # the world's sr scenes, x2


@pytest.fixture(scope="module")
def sr2(world_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sr2")
    mtu = perturb_(upcycle_unet(load_unet(world_pipeline), MoEConfig(tasks=parse_tasks("t2i,sr2"))), scale=0.1)
    ckpt = save_checkpoint(mtu, root / "ckpt", pipeline_dir=world_pipeline)
    picture = np.random.default_rng(0).integers(0, 256, (LOW_RES, LOW_RES, 3)).astype(np.uint8)
    Image.fromarray(picture).save(root / "low.png")
    for command in (("onnx", "--image-count", "1"), ("fold",)):
        result = invoke(command[0], ckpt, "--task", "sr2", *command[1:], "--out", root / command[0])
        assert result.exit_code == 0, result.output
    return {"ckpt": ckpt, "onnx": root / "onnx", "fold": root / "fold", "low": root / "low.png", "root": root}


def _generate(sr2: dict[str, Path]) -> np.ndarray:
    out = sr2["root"] / "generate.png"
    result = invoke(
        "generate", sr2["onnx"], "--task", "sr2", "--prompt", PROMPT, "--image", sr2["low"], "--steps", STEPS,
        "--guidance", GUIDANCE, "--seed", SEED, "--out", out, "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def test_sr2_trains_on_the_shapes_world(world_pipeline, tmp_path):
    result = invoke(
        "train", world_pipeline, "--tasks", "t2i,sr2", "--steps", "1", "--batch-size", "4",
        "--out", tmp_path / "trained", "--work", tmp_path / "work",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "loss_sr2" in json.loads((tmp_path / "work" / "train-log.jsonl").read_text().splitlines()[-1])


def test_sr2_export_records_its_condition_and_validates(sr2):
    index = json.loads((sr2["onnx"] / "model_index.json").read_text())
    assert index["tasks"]["sr2"] | CONDITIONS["low_res_latent_x2"].describe() == index["tasks"]["sr2"]
    manifest = json.loads((sr2["onnx"] / "manifest.json").read_text())
    assert manifest["tasks"]["sr2"]["in_channels"] == 8 and manifest["graph_agreement"]


def test_sr2_runs_alike_in_generate_on_device_and_folded_diffusers(sr2):
    reference = _generate(sr2)
    assert reference.shape == (2 * LOW_RES, 2 * LOW_RES, 3)
    low = Image.open(sr2["low"]).convert("RGB")
    ondevice = OnDevicePipeline.from_folder(sr2["onnx"])(
        PROMPT, task="sr2", image=low, steps=STEPS, guidance=GUIDANCE, seed=SEED
    )
    assert np.abs(ondevice.astype(np.int16) - reference).max() <= GREY_LEVELS_MAX
    index = json.loads((sr2["fold"] / "model_index.json").read_text())
    assert index["condition"] == CONDITIONS["low_res_latent_x2"].describe()
    pipe = DiffusionPipeline.from_pretrained(sr2["fold"], trust_remote_code=True)
    generator = torch.Generator().manual_seed(SEED)
    image = pipe(PROMPT, image=low, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator).images[0]
    folded = np.asarray(image.convert("RGB")).astype(np.int16)
    assert folded.shape == reference.shape
    assert np.abs(folded - reference).max() <= FOLD_GREY_LEVELS_MAX
