"""The one image path (image_processor.py) against diffusers' VaeImageProcessor where the two overlap, the sizes it
chooses, the training crop equal to it, and set metrics that stay finite with identical pairs (metrics.set_psnr)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as photos

from mtu_export.config import DataSpec
from mtu_export.data import open_source
from mtu_export.evaluate import summarise
from mtu_export.example import Example
from mtu_export.image_processor import (
    fit_size,
    max_pixels,
    prepare_image,
    size_multiple,
    to_model_input,
    to_uint8,
)
from mtu_export.metrics import set_psnr
from mtu_export.tasks import BUILTIN, declared

NORMALISE_ATOL = 1e-6  # x / 127.5 - 1 here, 2 * (x / 255) - 1 in diffusers: float32 rounding only
ODD_SIZES = [(150, 100), (148, 100), (37, 61), (1, 1), (4000, 30), (64, 64)]  # (width, height)


def _photo(width: int, height: int) -> Image.Image:
    """A real photograph (skimage's chelsea, 451x300) resized to (width, height)."""
    return Image.fromarray(photos.chelsea()).resize((width, height), Image.BICUBIC)


def test_size_multiple_is_the_vae_factor_times_the_unet_halvings():
    assert size_multiple(8, 3) == 64 and size_multiple(4, 2) == 16 and size_multiple(4, 0) == 4


FITTED = [((150, 100), (144, 96)), ((37, 61), (32, 64)), ((1, 1), (16, 16)), ((4000, 30), (4000, 32)),
          ((24, 8), (32, 16)), ((64, 64), (64, 64))]  # fmt: skip


@pytest.mark.parametrize(("size", "expected"), FITTED)
def test_fit_rounds_each_side_to_the_nearest_valid_multiple(size, expected):
    assert fit_size(*size, 16) == expected


def test_fit_scales_a_large_image_down_to_the_area_cap_keeping_its_aspect():
    assert max_pixels((512, 512)) == 4 * 512 * 512 and max_pixels((64, 64), scale=4) == 4 * 16 * 16
    assert fit_size(4032, 3024, 64, max_pixels((512, 512))) == (1152, 896)  # a phone photo for SD1.5
    assert fit_size(4000, 30, 16, max_pixels((64, 64))) == (1472, 16)
    prepared = prepare_image(_photo(400, 300), "fit", 16, max_pixels=max_pixels((64, 64)))
    assert prepared.size == (144, 112) and "scaled down to about 16384 pixels" in prepared.note("big.png")


@pytest.mark.parametrize("size", ODD_SIZES)
def test_fit_matches_vae_image_processor_at_the_size_it_chooses(size):
    picture = _photo(*size)
    prepared = prepare_image(picture, "fit", 16)
    width, height = prepared.size
    assert (width, height) == fit_size(*size, 16)
    assert (prepared.note("x") is None) == (size == (64, 64))
    theirs = VaeImageProcessor(vae_scale_factor=16, resample="bicubic").preprocess(picture, height=height, width=width)
    np.testing.assert_allclose(to_model_input([prepared.array]), theirs.numpy(), atol=NORMALISE_ATOL, rtol=0)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_crop_matches_vae_image_processor_crop_mode(size):
    picture = _photo(*size)
    ours = to_model_input([prepare_image(picture, "crop", size=(64, 48)).array])
    processor = VaeImageProcessor(vae_scale_factor=16, resample="bicubic")
    theirs = processor.preprocess(picture, height=48, width=64, resize_mode="crop").numpy()
    np.testing.assert_allclose(ours, theirs, atol=NORMALISE_ATOL, rtol=0)


def test_a_greyscale_photo_becomes_rgb_and_a_mask_stays_binary():
    grey = Image.fromarray(photos.camera()).resize((150, 100))
    prepared = prepare_image(grey, "fit", 16)
    assert prepared.array.shape == (96, 144, 3) and prepared.changed
    note = "note: grey.png resized from 150x100 to 144x96 (fit: nearest valid size, aspect kept)"
    assert prepared.note("grey.png") == note
    assert prepared.describe() == {"policy": "fit", "from": [150, 100], "to": [144, 96]}
    mask = prepare_image(grey.point(lambda v: 255 if v > 128 else 0), "fit", 16, size=prepared.size, mask=True)
    assert mask.array.dtype == bool and mask.array.shape == (96, 144) and 0 < mask.array.mean() < 1


def test_model_input_round_trips_to_the_same_pixels():
    pixels = np.asarray(_photo(37, 61))
    assert np.array_equal(to_uint8(to_model_input([pixels]))[0], pixels)


def test_training_crops_a_150x100_photo_as_the_crop_policy_does(tmp_path):
    """The dataset path (training, evaluation, export probes and calibration) and `--resize crop` are one crop."""
    picture = _photo(150, 100)
    picture.save(tmp_path / "cat.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cat.png", "text": "a cat"}) + "\n")
    example = open_source(BUILTIN["t2i"], DataSpec("t2i", str(tmp_path)), "train", 64, 4).example(0)
    assert np.array_equal(example.target, prepare_image(picture, "crop", size=(64, 64)).array)


# ------------------------------------------------------------------------------------------------- finite metrics
_pixels = st.integers(0, 255)


@st.composite
def _pair_sets(draw):
    """Sets of 1-6 (reference, output) 8x8 RGB pairs (SSIM's window needs 7), some identical, some differing."""
    pairs = []
    for _ in range(draw(st.integers(1, 6))):
        reference = np.array(draw(st.lists(_pixels, min_size=192, max_size=192)), np.uint8).reshape(8, 8, 3)
        if draw(st.booleans()):
            pairs.append((reference, reference.copy()))
        else:
            noise = np.array(draw(st.lists(st.integers(-255, 255), min_size=192, max_size=192))).reshape(8, 8, 3)
            pairs.append((reference, np.clip(reference.astype(int) + noise, 0, 255).astype(np.uint8)))
    return pairs


@settings(max_examples=60, deadline=None)
@given(_pair_sets())
def test_set_psnr_is_never_inf_or_nan(pairs):
    summary = set_psnr(pairs)
    json.dumps(summary, allow_nan=False)  # raises on inf or NaN
    identical = sum(np.array_equal(a, b) for a, b in pairs)
    assert summary["identical"] == identical and summary["pairs"] == len(pairs)
    assert (summary["mean_db"] is None) == (summary["set_db"] is None) == (identical == len(pairs))


@settings(max_examples=25, deadline=None)
@given(_pair_sets(), st.sampled_from(["edit", "sr", "inpaint", "colorize"]))
def test_every_metric_eval_writes_is_finite_with_identical_pairs(pairs, name):
    """Identical pairs in the output and in the floor (a grey photo in a colorize set) give finite JSON."""
    task = BUILTIN.get(name) or declared(name)
    examples, outputs = [], []
    for i, (target, output) in enumerate(pairs):
        source = target if i % 2 == 0 else output  # the floor (source handed back) is identical on every other row
        mask = np.zeros((8, 8), bool)
        mask[2:6, 2:6] = True
        roles = {"low_res": target[::2, ::2]} if task.super_resolution else {"source": source}
        if name == "inpaint":
            roles = {"mask": mask}
        examples.append(Example(name, "p", target, **roles))
        outputs.append(output)
    scores = summarise(task, examples, outputs)
    json.dumps(scores, allow_nan=False)
    assert all(v is None or math.isfinite(v) for v in scores.values())
    assert scores["psnr_identical"] == sum(np.array_equal(t, o) for t, o in pairs)
