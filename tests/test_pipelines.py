"""Every folder runs in the client its label names (issue 18, item 6): a folded `sr` pipeline and the ONNX folders no
optimum pipeline runs (the all-task bundle, a single-task `sr` export) ship mtu-export's pipeline classes
(pipelines.py) and load with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process that
cannot import mtu-export, giving the images mtu-export's own samplers give; clients that cannot run them refuse."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import diffusers
import numpy as np
import pytest
from diffusers import DiffusionPipeline, OnnxRuntimeModel
from helpers import PROMPT, invoke
from PIL import Image
from transformers import CLIPTokenizer

from mtu_export import pipelines
from mtu_export.checkpoint import load_checkpoint, load_components
from mtu_export.config import OnnxConfig
from mtu_export.export.onnx import export_onnx
from mtu_export.fold import fold_task
from mtu_export.sample import SamplerConfig, denoiser_for, sample_examples
from mtu_export.shapes.world import make_example
from mtu_export.tasks import BUILTIN, SR_SCALE, model_tasks, pipeline_class

STEPS, GUIDANCE, IMAGE_GUIDANCE, SEED = 2, 3.0, 1.5, 3
IMAGE_MAX_DIFF = 1  # uint8 levels: plain diffusers vs mtu-export's sampler, same weights, inputs and seed
CONDITION_MIN_DIFF = 8  # uint8 levels: another low-res image must change the output by more than this
LABEL = {"sr": ["pipeline_mtu", "MTUSuperResolutionPipeline"], "onnx": ["pipeline_mtu", "MTUOnnxPipeline"]}

# Runs in a fresh interpreter in which `import mtu_export` fails: what a user with only diffusers has.
RUNNER = r"""
import contextlib, io, json, sys
sys.modules["mtu_export"] = None
import numpy as np, torch
from diffusers import DiffusionPipeline
from PIL import Image

report = {}
for job in json.loads(open(sys.argv[1]).read()):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True, **job["load"])
    images = {k: Image.open(v) for k, v in job["images"].items()}
    generator = torch.Generator().manual_seed(job["seed"])
    image = pipe(job["prompt"], **job["call"], **images, generator=generator).images[0]
    np.save(job["out"], np.asarray(image))
    cls = type(pipe)
    report[job["out"]] = {"class": [cls.__module__, cls.__name__], "ep_error": "EP Error" in printed.getvalue()}
print(json.dumps(report))
"""


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(world_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 2-step runs on the world pipeline: `sr` with the RGB convention (7 channels) and the latent one (sr:8)."""
    root = tmp_path_factory.mktemp("trained")
    runs = {"low_res_rgb": "t2i,edit,sr,inpaint", "low_res_latent": "t2i,sr:8"}
    for name, tasks in runs.items():
        result = invoke(
            "train", world_pipeline, "--tasks", tasks, "--steps", "2", "--batch-size", "8", "--cache-size", "16",
            "--lr", "1e-2", "--input-lr-scale", "300", "--out", root / name, "--work", root / f"{name}-work",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def folders(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`fold --task sr` of both runs; the all-task ONNX bundle and a single-task `sr` ONNX export of the first."""
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for name, ckpt in trained.items():
        out[f"fold-{name}"] = root / f"fold-{name}"
        result = invoke("fold", ckpt, "--task", "sr", "--out", out[f"fold-{name}"])
        assert result.exit_code == 0, result.output
    for name, tasks in (("onnx-all", ()), ("onnx-sr", ("sr",))):
        config = OnnxConfig(tasks=tasks, probe_steps=1, image_count=0)
        export_onnx(trained["low_res_rgb"], config, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Held-out world inputs as files, per task: what `--image` / `--mask` and the pipelines' images read."""
    root = tmp_path_factory.mktemp("inputs")
    inpaint, sr, edit = (make_example(t, "heldout", 2) for t in ("inpaint", "sr", "edit"))
    files = {
        "image.png": inpaint.target,
        "mask.png": inpaint.mask.astype(np.uint8) * 255,
        "low_res.png": sr.low_res,
        "other_low_res.png": make_example("sr", "heldout", 5).low_res,
        "source.png": edit.source,
    }
    for name, array in files.items():
        Image.fromarray(array).save(root / name)
    return {
        "t2i": {},
        "edit": {"image": root / "source.png"},
        "sr": {"image": root / "low_res.png"},
        "inpaint": {"image": root / "image.png", "mask_image": root / "mask.png"},
        "other": {"image": root / "other_low_res.png"},
    }


@pytest.fixture(scope="module")
def plain_diffusers(folders, inputs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run every folder in a diffusers-only interpreter; job name -> {"image", "class", "ep_error"}."""
    root = tmp_path_factory.mktemp("plain")
    call = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, image_guidance_scale=IMAGE_GUIDANCE)
    jobs = {f"fold-{n}": (f"fold-{n}", {}, {}, "sr") for n in ("low_res_rgb", "low_res_latent")}
    quiet = {"provider_options": {}}  # see README: diffusers' ONNX loader otherwise passes onnxruntime an empty list
    jobs |= {f"onnx-all-{t}": ("onnx-all", quiet, {"task": t}, t) for t in ("t2i", "edit", "sr", "inpaint")}
    jobs["onnx-sr"] = ("onnx-sr", {}, {}, "sr")  # the minimal call
    spec = [
        {
            "folder": str(folders[folder]),
            "load": load,
            "call": {**call, **extra},
            "images": {k: str(v) for k, v in inputs[task].items()},
            "prompt": PROMPT,
            "seed": SEED,
            "out": str(root / f"{name}.npy"),
        }
        for name, (folder, load, extra, task) in jobs.items()
    ]
    (root / "jobs.json").write_text(json.dumps(spec))
    (root / "runner.py").write_text(RUNNER)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, root / "runner.py", root / "jobs.json"], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: {**report[str(root / f"{name}.npy")], "image": np.load(root / f"{name}.npy")} for name in jobs}


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@functools.cache
def _folded_sr(checkpoint: Path) -> tuple:
    ckpt = load_checkpoint(checkpoint)
    denoise = denoiser_for(fold_task(ckpt.model, "sr"))
    return denoise, model_tasks(ckpt.model)["sr"], load_components(ckpt.pipeline_dir)


def _own_sr_sample(checkpoint: Path, low_res: Path) -> np.ndarray:
    """mtu-export's torch sampler on the folded sr UNet, for the prompt and `low_res` image the pipelines got."""
    denoise, task, components = _folded_sr(checkpoint)
    example = replace(make_example("sr", "heldout", 2), prompt=PROMPT, low_res=np.asarray(Image.open(low_res)))
    config = SamplerConfig(STEPS, GUIDANCE, IMAGE_GUIDANCE, SEED)
    return sample_examples(denoise, task, [example], components, config)[0]


# --------------------------------------------------------------------------------------------------------- tests
def test_shipped_file_restates_the_task_conventions():
    assert pipelines.SR_SCALE == SR_SCALE
    assert set(pipelines.SHIPPED) == {LABEL["sr"][1], LABEL["onnx"][1]}


def test_only_tasks_without_a_stock_class_ship_one():
    import optimum.onnxruntime

    labels = {name: pipeline_class(task, "StableDiffusionPipeline") for name, task in BUILTIN.items()}
    shipping = {name for name, label in labels.items() if label in pipelines.SHIPPED}
    assert "sr" in shipping and shipping == {name for name, task in BUILTIN.items() if task.super_resolution}
    assert all(hasattr(diffusers, label) for name, label in labels.items() if name not in shipping)
    # a folded edit keeps InstructPix2Pix's name (diffusers runs it); its ONNX export ships MTUOnnxPipeline instead,
    # as optimum has no ORT pipeline of that name
    assert labels["edit"] == "StableDiffusionInstructPix2PixPipeline"
    assert not hasattr(optimum.onnxruntime, "ORT" + labels["edit"])


@pytest.mark.parametrize("convention", ["low_res_rgb", "low_res_latent"])
def test_folded_sr_is_labelled_with_the_class_shipped_beside_it(folders, trained, convention):
    folder = folders[f"fold-{convention}"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == LABEL["sr"]
    assert (folder / "pipeline_mtu.py").read_bytes() == Path(pipelines.__file__).read_bytes()
    # only the components the class takes: no stale `safety_checker` / `feature_extractor` entries to warn about
    components = {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    assert {k for k in index if not k.startswith("_")} == components | {"condition"}
    task = model_tasks(load_checkpoint(trained[convention]).model)["sr"]
    assert task.condition.name == convention and index["condition"] == task.condition.describe()


@pytest.mark.parametrize("convention", ["low_res_rgb", "low_res_latent"])
def test_folded_sr_runs_in_plain_diffusers_as_mtu_export_samples_it(plain_diffusers, trained, inputs, convention):
    run = plain_diffusers[f"fold-{convention}"]
    assert run["class"] == ["diffusers_modules.local.pipeline_mtu", "MTUSuperResolutionPipeline"]
    want = _own_sr_sample(trained[convention], inputs["sr"]["image"])
    assert run["image"].shape == want.shape == (64, 64, 3)  # 4 x the 16-pixel low-res image
    assert _max_diff(run["image"], want) <= IMAGE_MAX_DIFF
    # control: the comparison would see a conditioning mistake (another low-res image changes the output)
    assert _max_diff(_own_sr_sample(trained[convention], inputs["other"]["image"]), want) > CONDITION_MIN_DIFF


def test_onnx_bundle_and_sr_export_run_in_plain_diffusers_as_generate_does(folders, plain_diffusers, inputs, tmp_path):
    assert json.loads((folders["onnx-all"] / "model_index.json").read_text())["_class_name"] == LABEL["onnx"]
    assert json.loads((folders["onnx-sr"] / "model_index.json").read_text())["_class_name"] == LABEL["onnx"]
    cases = {f"onnx-all-{t}": ("onnx-all", t) for t in ("t2i", "edit", "sr", "inpaint")} | {
        "onnx-sr": ("onnx-sr", "sr")
    }
    for name, (folder, task) in cases.items():
        out = tmp_path / f"{name}.png"
        files = [("--mask" if k == "mask_image" else "--image", v) for k, v in inputs[task].items()]
        result = invoke(
            "generate", folders[folder], "--task", task, "--prompt", PROMPT, "--out", out, "--steps", STEPS,
            "--guidance", GUIDANCE, "--image-guidance", IMAGE_GUIDANCE, "--seed", SEED, *[a for f in files for a in f],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        run = plain_diffusers[name]
        assert run["class"] == ["diffusers_modules.local.pipeline_mtu", "MTUOnnxPipeline"], name
        assert _max_diff(run["image"], np.asarray(Image.open(out))) <= IMAGE_MAX_DIFF, name
    assert plain_diffusers["onnx-sr"]["ep_error"] and not plain_diffusers["onnx-all-t2i"]["ep_error"]


def test_clients_that_cannot_run_a_folder_refuse_it(folders):
    from optimum.onnxruntime import ORTDiffusionPipeline

    for name in ("fold-low_res_rgb", "onnx-all", "onnx-sr"):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            DiffusionPipeline.from_pretrained(folders[name])
    for name in ("onnx-all", "onnx-sr"):
        with pytest.raises(ValueError, match="can't find a pipeline linked to"):
            ORTDiffusionPipeline.from_pretrained(folders[name])


def _onnx_pipeline(folder: Path) -> pipelines.MTUOnnxPipeline:
    """The class as the folder's model_index.json builds it, constructed here (no dynamic-module cache)."""
    from diffusers import DPMSolverMultistepScheduler

    index = json.loads((folder / "model_index.json").read_text())
    graphs = {c: OnnxRuntimeModel.from_pretrained(folder / c, provider_options={}) for c in pipelines.ONNX_COMPONENTS}
    config = {k: index[k] for k in ("tasks", "scaling_factor", "vae_scale_factor", "sample_size", "size_multiple")}
    return pipelines.MTUOnnxPipeline(
        **graphs,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
        **config,
    )


def test_onnx_pipeline_text_to_image_takes_height_and_width(folders):
    images = _onnx_pipeline(folders["onnx-all"])(
        PROMPT, task="t2i", height=32, width=48, num_inference_steps=1, output_type="np"
    ).images
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({}, "this folder runs the tasks"),
        ({"task": "colorize"}, "got task 'colorize'"),
        ({"task": "sr"}, "task 'sr' needs `image`"),
        ({"task": "t2i", "image": "sr"}, "task 't2i' takes no `image`"),
        ({"task": "inpaint", "image": "sr"}, "task 'inpaint' needs `mask_image`"),
        ({"task": "edit", "image": "sr", "height": 64}, "takes its size from `image`"),
        ({"task": "t2i", "height": 30}, "must be multiples of 8 .* the nearest are height=32, width=64"),
        ({"task": "t2i", "output_type": "jpeg"}, "output_type 'jpeg'"),
    ],
)
def test_onnx_pipeline_refuses_bad_calls_in_one_line(folders, inputs, call, message):
    pipe = _onnx_pipeline(folders["onnx-all"])
    call = {k: Image.open(inputs[v]["image"]) if k == "image" else v for k, v in call.items()}
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, num_inference_steps=1, **call)


def test_sr_pipeline_refuses_a_missing_image_and_a_unet_of_another_task(trained):
    ckpt = load_checkpoint(trained["low_res_rgb"])
    components = load_components(ckpt.pipeline_dir)
    frozen = components.vae, components.text_encoder, components.tokenizer
    pipe = pipelines.MTUSuperResolutionPipeline(*frozen, fold_task(ckpt.model, "sr"), components.scheduler)
    with pytest.raises(ValueError, match="sr needs `image`"):
        pipe(PROMPT, image=None)
    pipe = pipelines.MTUSuperResolutionPipeline(*frozen, fold_task(ckpt.model, "inpaint"), components.scheduler)
    with pytest.raises(ValueError, match="this UNet takes 9 input channels; an sr UNet takes 7 or 8"):
        pipe(PROMPT, image=Image.new("RGB", (16, 16)))
