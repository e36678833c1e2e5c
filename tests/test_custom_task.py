"""A fifth task declared by a user (`colorize`: grey image in, colour image out), with its data written to disk as
a user dataset: trained alongside the four built-in tasks from `--data` folders, evaluated, exported to ONNX with
calibration and validation on that data, and folded into a pipeline plain diffusers runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionInstructPix2PixPipeline
from helpers import invoke
from PIL import Image

from mtu_export.data import export_world_dataset
from mtu_export.shapes.world import make_example

TASKS = ("t2i", "edit", "sr", "inpaint")
ROWS = 8


def write_colorize_dataset(folder: Path, split: str, count: int) -> Path:
    """World scenes as InstructPix2Pix-style rows: `input_image` grey, `edited_image` in colour."""
    (folder / "images").mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(count):
            colour = Image.fromarray(make_example("t2i", split, i).target)
            colour.save(folder / "images" / f"{i}.png")
            colour.convert("L").convert("RGB").save(folder / "images" / f"{i}-grey.png")
            row = {"input_image_file_name": f"images/{i}-grey.png", "edited_image_file_name": f"images/{i}.png"}
            meta.write(json.dumps(row | {"edit_prompt": "colorize the picture"}) + "\n")
    return folder


@pytest.mark.slow  # end to end: train, eval, export, fold
def test_a_declared_task_trains_evaluates_exports_and_folds(world_pipeline, tmp_path):
    data = []
    for task in TASKS:
        data += ["--data", f"{task}={export_world_dataset(tmp_path / 'data' / task, task, 'train', ROWS)}"]
    colorize_train = write_colorize_dataset(tmp_path / "data" / "colorize", "train", ROWS)
    colorize_heldout = write_colorize_dataset(tmp_path / "data" / "colorize-heldout", "heldout", 3)
    ckpt = tmp_path / "mtu"
    result = invoke(
        "train", world_pipeline, "--tasks", "t2i,edit,sr,inpaint,colorize:8", *data,
        "--data", f"colorize={colorize_train}", "--steps", "2", "--batch-size", "10", "--out", ckpt,
        "--work", tmp_path / "work",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {"loss_colorize", "loss_t2i"} <= json.loads(
        (tmp_path / "work" / "train-log.jsonl").read_text().splitlines()[-1]
    ).keys()

    held = f"colorize={colorize_heldout}"
    args = ["eval", ckpt, "--task", "colorize", "--data", held, "--count", "2", "--steps", "2"]
    assert invoke(*args, "--json", tmp_path / "eval.json").exit_code == 0
    scores = json.loads((tmp_path / "eval.json").read_text())["tasks"]["colorize"]
    assert {"psnr", "ssim", "source_psnr", "source_ssim"} <= scores.keys()

    onnx = tmp_path / "onnx"
    result = invoke(
        "onnx", ckpt, "--task", "colorize", "--data", held, "--quantize", "static-int8", "--image-count", "1",
        "--out", onnx,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["data"] == {"colorize": str(colorize_heldout)}
    assert manifest["calibration"] == {"colorize": {"source": "dataset", "examples": 4}}
    assert all(row["ok"] for row in manifest["graph_agreement"])
    assert json.loads((onnx / "model_index.json").read_text())["_class_name"] == ["pipeline_mtu", "MTUOnnxPipeline"]
    grey = Image.open(colorize_heldout / "images" / "0-grey.png")
    ort_pipe = DiffusionPipeline.from_pretrained(onnx, trust_remote_code=True, provider_options={})
    coloured = ort_pipe("colorize the picture", task="colorize", image=grey, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip
    assert coloured.shape == (64, 64, 3) and np.isfinite(coloured).all()

    folded = tmp_path / "folded"
    assert invoke("fold", ckpt, "--task", "colorize", "--out", folded).exit_code == 0
    pipe = DiffusionPipeline.from_pretrained(folded, local_files_only=True)
    assert isinstance(pipe, StableDiffusionInstructPix2PixPipeline) and pipe.unet.config.in_channels == 8
    image = pipe("colorize the picture", image=grey, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]  # fmt: skip
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
