"""The shipped base model (`models/shapes-base`): plain diffusers loads and runs it offline, it fits its size
budget, it draws what captions say, and its model card quotes the measured evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from mtu_export.shapes.reader import accuracy, score
from mtu_export.shapes.world import make_example

MODEL = Path(__file__).parents[1] / "models" / "shapes-base"
SIZE_BUDGET_MB = 30
# 16 held-out captions, 10 steps (measured: 75.0 % of attributes, 89 % of positions; card: 81.4 % at 25 steps). The
# position floor catches a model that ignores position words, as the first shipped weights did (9 %, chance).
QUICK_ACCURACY_FLOOR = 0.65
QUICK_POSITION_FLOOR = 0.6


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_plain_diffusers_generates_an_image(pipe):
    caption = make_example("t2i", "heldout", 0).prompt
    image = pipe(caption, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0.05


@pytest.mark.slow  # quality: 16 images of 10 steps from the shipped model
def test_it_draws_what_captions_say(pipe):
    captions = [make_example("t2i", "heldout", i).prompt for i in range(16)]
    images = pipe(captions, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np").images
    acc = accuracy([score((im * 255).round().astype(np.uint8), c) for im, c in zip(images, captions, strict=True)])
    print(f"quick scene-reader accuracy: {acc}")
    assert acc["all"] >= QUICK_ACCURACY_FLOOR and acc["position"] >= QUICK_POSITION_FLOOR


def test_weights_are_safetensors_within_budget():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) / 2**20 < SIZE_BUDGET_MB


def test_model_card_quotes_the_measured_figures():
    card = (MODEL / "README.md").read_text()
    for split in ("heldout", "unseen"):
        result = json.loads((MODEL / "eval" / f"{split}.json").read_text())
        assert f"{100 * result['t2i_accuracy']['all']:.1f} %" in card, split
        assert f"{result['vae']['psnr_mean_db']:.2f} dB" in card, split
