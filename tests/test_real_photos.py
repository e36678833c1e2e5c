"""Real photographs of any size through every entry point (issue 31). scikit-image ships real photos in its wheel
(no download); crops of them at odd sizes, one of them greyscale, make small user datasets in the three formats users
have (image folder, JSON lines, parquet). They train (a few steps), evaluate, calibrate a static-int8 export and run
in `generate`; then a battery of odd sizes runs through `generate`, the shipped `MTUOnnxPipeline`, the `sr` torch
pipeline and optimum's ORT pipelines, each giving an image or a one-line refusal, never a crash inside onnxruntime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import PROMPT, assert_clean_failure, invoke
from PIL import Image
from skimage import data as photos

from mtu_export import display
from mtu_export.image_processor import fit_size, max_pixels

STEPS = "1"
MODEL_SIZE = 64  # pixels of the world model's images
IMAGE_MAX_DIFF = 1  # uint8 levels: generate vs the shipped ONNX pipeline on the same photo and seed
# (width, height): the battery; 4000x30 becomes a 4000-pixel-wide strip, 1x1 one valid block
ODD_SIZES = [(150, 100), (148, 100), (37, 61), (1, 1), (4000, 30)]
PHOTOS = {"astronaut": photos.astronaut, "coffee": photos.coffee, "rocket": photos.rocket, "chelsea": photos.chelsea}
TRAIN_CROPS = [("astronaut", (150, 100)), ("coffee", (97, 131)), ("rocket", (61, 37)), ("camera", (120, 120))]
HELD_CROPS = [("chelsea", (150, 100)), ("coffee", (64, 80)), ("camera", (70, 50))]


def _crop(name: str, size: tuple[int, int], grey: bool = False) -> Image.Image:
    """A `size` (width, height) crop from the middle of a skimage photo; `camera` is a greyscale photo."""
    if name == "camera":
        picture = Image.fromarray(photos.camera()).convert("RGB")
    else:
        picture = Image.fromarray(PHOTOS[name]())
    width, height = size
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    return picture.convert("L").convert("RGB") if grey else picture


def _write_sr_folder(folder: Path, crops) -> Path:
    """An image folder with metadata.jsonl (`file_name`, `text`): diffusers' text-to-image columns."""
    folder.mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i, (name, size) in enumerate(crops):
            _crop(name, size).save(folder / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo of {name}"}) + "\n")
    return folder


def _write_colorize_jsonl(folder: Path, crops) -> Path:
    """JSON lines with InstructPix2Pix's columns: grey `input_image`, colour `edited_image`; the `camera` photo is
    grey already, so its pair is identical (the floor's infinite-PSNR case)."""
    folder.mkdir(parents=True)
    rows = []
    for i, (name, size) in enumerate(crops):
        _crop(name, size).save(folder / f"{i}.png")
        _crop(name, size, grey=True).save(folder / f"{i}-grey.png")
        rows.append({"input_image": f"{i}-grey.png", "edit_prompt": "colorize", "edited_image": f"{i}.png"})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "rows.jsonl"


def _write_colorize_parquet(folder: Path, crops) -> Path:
    import datasets

    jsonl = _write_colorize_jsonl(folder, crops)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = datasets.Dataset.from_dict(
        {k: [str(folder / r[k]) if k != "edit_prompt" else r[k] for r in rows] for k in rows[0]}
    )
    for column in ("input_image", "edited_image"):
        table = table.cast_column(column, datasets.Image())
    table.to_parquet(str(folder / "rows.parquet"))
    return folder / "rows.parquet"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def photo_run(world_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`sr` and a declared `colorize:8` trained 2 steps on photo datasets, and its colorize export in static int8
    calibrated on held-out photos (parquet)."""
    root = tmp_path_factory.mktemp("photos")
    paths = {
        "sr": _write_sr_folder(root / "sr", TRAIN_CROPS),
        "colorize": _write_colorize_jsonl(root / "colorize", TRAIN_CROPS),
        "held": _write_colorize_parquet(root / "held", HELD_CROPS),
        "held_sr": _write_sr_folder(root / "held_sr", HELD_CROPS),
        "ckpt": root / "ckpt",
        "onnx": root / "onnx",
    }
    result = invoke(
        "train", world_pipeline, "--tasks", "sr,colorize:8", "--data", f"sr={paths['sr']}",
        "--data", f"colorize={paths['colorize']}", "--steps", "2", "--batch-size", "4", "--cache-size", "8",
        "--out", paths["ckpt"], "--work", root / "work",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(
        "onnx", paths["ckpt"], "--task", "colorize", "--data", f"colorize={paths['held']}", "--quantize",
        "static-int8", "--image-count", "1", "--out", paths["onnx"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return paths


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict[str, Path]]:
    """Per odd size, a photo and an inpainting mask (white box in the middle) of that size."""
    root = tmp_path_factory.mktemp("odd")
    files = {}
    for width, height in ODD_SIZES:
        photo = Image.fromarray(photos.astronaut()).resize((width, height), Image.BICUBIC)
        mask = np.zeros((height, width), np.uint8)
        top, left = height // 4, width // 4
        mask[top : max(top + 1, 3 * top), left : max(left + 1, 3 * left)] = 255  # never empty, even at 1x1
        names = {"image": root / f"{width}x{height}.png", "mask": root / f"{width}x{height}-mask.png"}
        photo.save(names["image"])
        Image.fromarray(mask).save(names["mask"])
        files[(width, height)] = names
    return files


@pytest.fixture(scope="module")
def odd_folders(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 4-task world model as an all-task static-int8 bundle, single-task t2i and inpaint exports (optimum's
    pipelines run them) and a folded `sr` pipeline (the shipped torch pipeline)."""
    root = tmp_path_factory.mktemp("odd-folders")
    jobs = {
        "bundle": ("onnx", "--task", "all", "--quantize", "static-int8", "--image-count", "0"),
        "t2i": ("onnx", "--task", "t2i", "--image-count", "0"),
        "inpaint": ("onnx", "--task", "inpaint", "--image-count", "0"),
        "sr": ("fold", "--task", "sr"),
    }
    for name, (command, *options) in jobs.items():
        result = invoke(command, mtu_world, *options, "--out", root / name)
        assert result.exit_code == 0, result.output
    return {name: root / name for name in jobs}


def _multiple(folder: Path) -> int:
    return json.loads((folder / "model_index.json").read_text())["size_multiple"]


# --------------------------------------------------------------------------------------------------- photo datasets
def test_photo_datasets_train_evaluate_and_calibrate_with_finite_metrics(photo_run, tmp_path):
    manifest = json.loads((photo_run["onnx"] / "manifest.json").read_text())
    assert manifest["calibration"] == {"colorize": {"source": "dataset", "examples": 4}}
    assert all(row["ok"] for row in manifest["graph_agreement"])
    out = tmp_path / "eval.json"
    result = invoke(
        "eval", photo_run["ckpt"], "--data", f"sr={photo_run['held_sr']}", "--data", f"colorize={photo_run['held']}",
        "--count", "3", "--steps", STEPS, "--json", out, "--grid", tmp_path / "grid.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval's JSON"))["tasks"]
    assert scores["colorize"]["source_psnr_identical"] == 1  # the grey camera photo is its own floor
    assert all(v is None or math.isfinite(v) for task in scores.values() for v in task.values())
    shown = display.eval_columns(scores)  # only the metrics of the tasks shown, and identical counts when not 0
    assert shown == ["psnr", "psnr_set", "ssim", "bicubic_psnr", "source_psnr", "gain_over_floor_db",
                     "source_psnr_identical"]  # fmt: skip
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] == 3 * (64 + 2) * 2  # input | output | target, zoomed 2x with 2-pixel gutters


def test_generate_keeps_a_photo_s_aspect_and_notes_the_resize(photo_run, tmp_path):
    photo = tmp_path / "grey.png"
    _crop("chelsea", (150, 100), grey=True).save(photo)
    out = tmp_path / "colour.png"
    result = invoke(
        "generate", photo_run["onnx"], "--task", "colorize", "--prompt", "colorize", "--image", photo,
        "--steps", STEPS, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    width, height = fit_size(150, 100, _multiple(photo_run["onnx"]))
    assert Image.open(out).size == (width, height)
    assert f"resized from 150x100 to {width}x{height} (fit" in result.stderr
    cropped = tmp_path / "cropped.png"
    result = invoke(
        "generate", photo_run["onnx"], "--task", "colorize", "--prompt", "colorize", "--image", photo,
        "--steps", STEPS, "--out", cropped, "--resize", "crop",
    )  # fmt: skip
    assert result.exit_code == 0 and Image.open(cropped).size == (64, 64), result.output


def test_dataset_paths_outside_the_folder_are_refused(world_pipeline, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _crop("coffee", (64, 64)).save(tmp_path / "outside.png")
    (folder / "rows.jsonl").write_text(json.dumps({"image": "../outside.png", "text": "x"}) + "\n")
    result = invoke(
        "train", world_pipeline, "--tasks", "sr", "--data", f"sr={folder / 'rows.jsonl'}", "--steps", "1",
        "--out", tmp_path / "o", "--work", tmp_path / "w",
    )  # fmt: skip
    assert_clean_failure(result, "'../outside.png' leads outside the dataset folder")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- the odd-size battery
@pytest.mark.parametrize("size", ODD_SIZES)
def test_generate_runs_every_odd_size_on_a_static_int8_bundle(odd_folders, odd_inputs, size, tmp_path):
    multiple = _multiple(odd_folders["bundle"])
    for task in ("edit", "sr", "inpaint"):
        files = odd_inputs[size]
        extra = ("--mask", files["mask"]) if task == "inpaint" else ()
        out = tmp_path / f"{task}.png"
        result = invoke(
            "generate", odd_folders["bundle"], "--task", task, "--prompt", PROMPT, "--image", files["image"], *extra,
            "--steps", STEPS, "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, (task, result.output)
        scale = 4 if task == "sr" else 1  # the world model's sr: low-res RGB at latent size, factor-4 VAE
        width, height = fit_size(*size, multiple // scale, max_pixels((MODEL_SIZE, MODEL_SIZE), scale))
        assert Image.open(out).size == (width * scale, height * scale), task


@pytest.mark.parametrize("size", ODD_SIZES)
def test_shipped_pipelines_run_every_odd_size(odd_folders, odd_inputs, size):
    """MTUOnnxPipeline (static-int8 bundle) and MTUSuperResolutionPipeline, loaded as diffusers users load them."""
    files = odd_inputs[size]
    image, mask = Image.open(files["image"]), Image.open(files["mask"])
    onnx = DiffusionPipeline.from_pretrained(odd_folders["bundle"], trust_remote_code=True, provider_options={})
    multiple = _multiple(odd_folders["bundle"])
    for task, extra in (("edit", {}), ("inpaint", {"mask_image": mask}), ("sr", {})):
        out = onnx(PROMPT, task=task, image=image, num_inference_steps=1, output_type="np", **extra).images[0]
        scale = 4 if task == "sr" else 1
        width, height = fit_size(*size, multiple // scale, max_pixels((MODEL_SIZE, MODEL_SIZE), scale))
        assert out.shape == (height * scale, width * scale, 3) and np.isfinite(out).all(), task
    sr = DiffusionPipeline.from_pretrained(odd_folders["sr"], trust_remote_code=True)
    out = sr(PROMPT, image=image, num_inference_steps=1, output_type="np").images[0]
    width, height = fit_size(*size, multiple // 4, max_pixels((MODEL_SIZE, MODEL_SIZE), 4))
    assert out.shape == (height * 4, width * 4, 3) and np.isfinite(out).all()


def test_generate_and_the_onnx_pipeline_resize_a_photo_alike(odd_folders, odd_inputs, tmp_path):
    """Same 150x100 photo, same seed: `generate` and MTUOnnxPipeline prepare it alike, so their images agree."""
    files = odd_inputs[(150, 100)]
    out = tmp_path / "edit.png"
    result = invoke("generate", odd_folders["bundle"], "--task", "edit", "--prompt", PROMPT, "--image", files["image"],
                    "--steps", "2", "--guidance", "3", "--seed", "5", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = DiffusionPipeline.from_pretrained(odd_folders["bundle"], trust_remote_code=True, provider_options={})
    theirs = pipe(PROMPT, task="edit", image=Image.open(files["image"]), num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    ours = np.asarray(Image.open(out)).astype(int)
    assert ours.shape == np.asarray(theirs).shape and np.abs(ours - np.asarray(theirs)).max() <= IMAGE_MAX_DIFF


@pytest.mark.parametrize("size", ODD_SIZES)
def test_optimum_pipelines_give_an_image_or_a_one_line_refusal(odd_folders, odd_inputs, size):
    """optimum's own preprocessing rounds to the VAE factor only: the exported UNet must take any latent size."""
    from optimum.onnxruntime import ORTStableDiffusionInpaintPipeline, ORTStableDiffusionPipeline

    files = odd_inputs[size]
    width, height = size
    generator = torch.Generator().manual_seed(0)
    inpaint = ORTStableDiffusionInpaintPipeline.from_pretrained(odd_folders["inpaint"])
    call = dict(image=Image.open(files["image"]), mask_image=Image.open(files["mask"]), num_inference_steps=1)
    _image_or_refusal(lambda: inpaint(PROMPT, **call, generator=generator, output_type="np").images[0])
    t2i = ORTStableDiffusionPipeline.from_pretrained(odd_folders["t2i"])
    call = dict(height=height, width=width, num_inference_steps=1, generator=generator, output_type="np")
    _image_or_refusal(lambda: t2i(PROMPT, **call).images[0])


def _image_or_refusal(run) -> None:
    try:
        image = run()
    except ValueError as exc:  # diffusers' own argument checks: one line naming the problem
        assert "\n" not in str(exc).strip() and "onnxruntime" not in str(exc).lower(), str(exc)
        return
    assert image.ndim == 3 and np.isfinite(image).all()


def test_generate_refuses_a_mask_of_another_size_or_unreadable(odd_folders, odd_inputs, tmp_path):
    photo, other = odd_inputs[(150, 100)]["image"], odd_inputs[(37, 61)]["mask"]
    args = ("generate", odd_folders["bundle"], "--task", "inpaint", "--prompt", PROMPT, "--image", photo, "--steps",
            STEPS, "--out", tmp_path / "out.png")  # fmt: skip
    assert_clean_failure(invoke(*args, "--mask", other), "is 37x61, --image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert_clean_failure(invoke(*args, "--mask", broken), "cannot read image")
    assert not (tmp_path / "out.png").exists()
