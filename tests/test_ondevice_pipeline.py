"""The torch-free pipeline against `mtu-export generate`: for every task of an fp32 all-task bundle and for single-task
t2i and inpaint exports (optimum's ORT pipelines in `generate`), the same request gives the same image within a grey
level, with the on-device side run in a child interpreter that cannot import torch, diffusers or transformers. Also:
its numpy noise against torch's CPU randn, its torch-style resampling against F.interpolate, the low-res-latent
condition (which the world model's factor-4 VAE does not use) against conditioning.py, and the command's refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPT, invoke
from PIL import Image

from mtu_export.conditioning import encode_batch, task_condition
from mtu_export.example import Example
from mtu_export.export.runtime import OrtVae
from mtu_export.ondevice.__main__ import main
from mtu_export.ondevice.noise import TorchCompatibleGenerator
from mtu_export.ondevice.pipeline import Inputs, OnDevicePipeline, TaskPlan, resize_bicubic, resize_nearest
from mtu_export.tasks import TaskSpec, resolve

GREY_LEVELS_MAX = 1  # |on-device - generate| on uint8 images: float32 rounding may flip a pixel by one level
NOISE_ATOL = 1e-6  # numpy vs torch randn: the same uniforms, transcendental functions a few ulps apart
RESAMPLE_ATOL = 2e-6  # numpy vs F.interpolate: same weights, another summation order
CONDITION_ATOL = 1e-5  # the low-res latent through the same VAE graph: resampling differences carried through
STEPS = "2"
CHILD_TIMEOUT_S = 300
WIDE = (150, 100)  # a non-square input (width, height) for the image-conditioned tasks
ROOT = Path(__file__).resolve().parents[1]

# The child: block the heavy libraries before anything imports them, then run every job and save its image.
CHILD = """
import json, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of them now fails
import numpy as np
from PIL import Image
from mtu_export.ondevice.pipeline import OnDevicePipeline

pipelines = {}
for job in json.loads(open(sys.argv[1]).read()):
    folder = job["folder"]
    pipelines.setdefault(folder, OnDevicePipeline.from_folder(folder, threads=1))
    opened = {key: Image.open(job[key]) if job.get(key) else None for key in ("image", "mask")}
    picture = pipelines[folder](
        job["prompt"], task=job["task"], steps=job["steps"], guidance=job["guidance"], seed=job["seed"],
        resize=job["resize"], optimum=job["optimum"], **opened,
    )
    np.save(job["npy"], picture)
heavy = sorted(name for name in ("torch", "diffusers", "transformers") if sys.modules.get(name) is not None)
assert not heavy, heavy
"""


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 4-task world model as an fp32 all-task bundle and as single-task t2i and inpaint exports."""
    root = tmp_path_factory.mktemp("ondevice-folders")
    for name, task in (("bundle", "all"), ("t2i", "t2i"), ("inpaint", "inpaint")):
        result = invoke("onnx", mtu_world, "--task", task, "--image-count", "0", "--out", root / name)
        assert result.exit_code == 0, result.output
    return {name: root / name for name in ("bundle", "t2i", "inpaint")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A square 64x64 and a wide 150x100 input image, each with a mask of its size (white = hole)."""
    root = tmp_path_factory.mktemp("ondevice-inputs")
    rng = np.random.default_rng(0)
    files = {}
    for name, (width, height) in (("square", (64, 64)), ("wide", WIDE)):
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        noise = rng.integers(0, 60, (height, width, 3))
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(root / f"{name}.png")
        hole = np.zeros((height, width), np.uint8)
        hole[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = 255
        Image.fromarray(hole).save(root / f"{name}-mask.png")
        files[name], files[f"{name}-mask"] = root / f"{name}.png", root / f"{name}-mask.png"
    return files


# name: (folder, task, input picture, options): every bundle task (square and wide inputs, fit and crop) and the
# optimum-run single-task folders (with and without text guidance, and inpaint through our sampler as --no-optimum)
JOBS: dict[str, tuple[str, str, str | None, dict]] = {
    "bundle-t2i": ("bundle", "t2i", None, {}),
    "bundle-edit-square": ("bundle", "edit", "square", {}),
    "bundle-edit-wide": ("bundle", "edit", "wide", {}),
    "bundle-edit-wide-crop": ("bundle", "edit", "wide", {"resize": "crop"}),
    "bundle-sr-square": ("bundle", "sr", "square", {}),
    "bundle-sr-wide": ("bundle", "sr", "wide", {}),
    "bundle-inpaint-wide": ("bundle", "inpaint", "wide", {"seed": 11}),
    "bundle-inpaint-square-crop": ("bundle", "inpaint", "square", {"resize": "crop"}),
    "t2i-optimum": ("t2i", "t2i", None, {}),
    "t2i-optimum-unguided": ("t2i", "t2i", None, {"guidance": 1.0}),
    "inpaint-optimum-wide": ("inpaint", "inpaint", "wide", {"seed": 5}),
    "inpaint-optimum-square": ("inpaint", "inpaint", "square", {}),
    "inpaint-own-wide": ("inpaint", "inpaint", "wide", {"optimum": False}),
}


def _job(folders: dict[str, Path], pictures: dict[str, Path], name: str) -> dict:
    folder, task, picture, options = JOBS[name]
    image = None if picture is None else str(pictures[picture])
    mask = str(pictures[f"{picture}-mask"]) if task == "inpaint" else None
    return dict(folder=str(folders[folder]), task=task, image=image, mask=mask, prompt=PROMPT, steps=int(STEPS),
                guidance=3.0, seed=3, resize="fit", optimum=True) | options  # fmt: skip


def _generate(job: dict, out: Path) -> np.ndarray:
    args = [arg for key in ("image", "mask") if job[key] for arg in (f"--{key}", job[key])]
    result = invoke(
        "generate", job["folder"], "--task", job["task"], "--prompt", job["prompt"], *args, "--steps", job["steps"],
        "--guidance", job["guidance"], "--seed", job["seed"], "--resize", job["resize"],
        "--optimum" if job["optimum"] else "--no-optimum", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.fixture(scope="module")
def images(folders, pictures, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{job: (generate's image, the on-device image)}; the on-device side in one torch-free child process."""
    root = tmp_path_factory.mktemp("ondevice-images")
    jobs = {name: _job(folders, pictures, name) for name in JOBS}
    for name, job in jobs.items():
        job["npy"] = str(root / f"{name}.npy")
    (root / "jobs.json").write_text(json.dumps(list(jobs.values())))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root / "jobs.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    return {name: (_generate(job, root / f"{name}.png"), np.load(job["npy"])) for name, job in jobs.items()}


# ------------------------------------------------------------------------------------------------ end-to-end parity
@pytest.mark.parametrize("job", list(JOBS))
def test_ondevice_image_matches_generate(images, job: str) -> None:
    reference, ours = images[job]
    assert ours.dtype == np.uint8 and ours.shape == reference.shape, (ours.shape, reference.shape)
    diff = int(np.abs(ours.astype(np.int16) - reference.astype(np.int16)).max())
    assert diff <= GREY_LEVELS_MAX, f"{job}: max |diff| {diff} grey levels"


def test_wide_inputs_keep_their_aspect(images) -> None:
    """150x100 in: edit and inpaint keep the aspect (fit), sr gives 4x the fitted low-res size; crop is square."""
    height, width = images["bundle-edit-wide"][0].shape[:2]
    assert width > height and images["inpaint-optimum-wide"][0].shape == images["bundle-inpaint-wide"][0].shape
    assert images["bundle-edit-wide-crop"][0].shape[:2] == (64, 64)
    sr_height, sr_width = images["bundle-sr-wide"][0].shape[:2]
    assert sr_width > sr_height and sr_width % 4 == 0


def test_tasks_resolve_as_the_registry(folders) -> None:
    pipeline = OnDevicePipeline.from_folder(folders["bundle"])
    for name, plan in pipeline.tasks.items():
        task = resolve(TaskSpec(name, pipeline.manifest["tasks"][name]["in_channels"]), 4)
        assert (plan.condition, plan.image_guidance, plan.needs) == (task.condition, task.image_guidance, task.needs)
    assert set(pipeline.tasks) == {"t2i", "edit", "sr", "inpaint"}  # the bundle's


# ----------------------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1])
def test_noise_matches_torch_randn_over_consecutive_calls(seed: int) -> None:
    shapes = [(1, 4, 16, 16), (1, 4, 25, 37), (16,), (17,), (2, 3, 5, 7), (1, 4, 8, 8), (1, 4, 36, 24)]
    reference, ours = torch.Generator().manual_seed(seed), TorchCompatibleGenerator(seed)
    for shape in shapes:  # one stream, as optimum's inpainting draws the latents and then the posterior sample
        expected = torch.randn(shape, generator=reference, dtype=torch.float32).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= NOISE_ATOL, (seed, shape)


def test_noise_refuses_what_it_does_not_reproduce() -> None:
    with pytest.raises(ValueError, match="15 elements"):
        TorchCompatibleGenerator(0).randn((3, 5))
    with pytest.raises(ValueError, match="32-bit"):
        TorchCompatibleGenerator(-1)


# ------------------------------------------------------------------------------------------------------ resampling
@pytest.mark.parametrize("size", [(28, 40), (64, 64), (7, 10), (13, 17)])
def test_resampling_matches_torch_interpolate(size: tuple[int, int]) -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (1, 3, 7, 10)).astype(np.float32)
    tensor = torch.from_numpy(images)
    bicubic = F.interpolate(tensor, size=size, mode="bicubic", align_corners=False).numpy()
    assert np.abs(resize_bicubic(images, size) - bicubic).max() <= RESAMPLE_ATOL
    assert np.array_equal(resize_nearest(images, size), F.interpolate(tensor, size=size).numpy())


def test_low_res_latent_condition_matches_conditioning(folders) -> None:
    """sr with the latent convention (2L channels, SD1.5-style factor-8 VAEs): the bicubic 4x upsample's latent."""
    pipeline = OnDevicePipeline.from_folder(folders["bundle"])
    low_res = (np.random.default_rng(1).integers(0, 256, (9, 13, 3))).astype(np.uint8)
    inputs = Inputs((36, 52), low_res)
    task = resolve(TaskSpec("sr", 8), 4)  # the latent convention
    ours = pipeline._condition(TaskPlan(task, None), inputs, TorchCompatibleGenerator(0))
    folder = folders["bundle"]
    config = json.loads((folder / "vae_decoder" / "config.json").read_text())
    vae = OrtVae(folder / "vae_encoder" / "model.onnx", folder / "vae_decoder" / "model.onnx", config)
    example = Example("sr", PROMPT, np.zeros((36, 52, 3), np.uint8), low_res=low_res)
    expected = task_condition(task, encode_batch(task, vae, [example]), config["scaling_factor"]).numpy()
    assert task.condition.name == "low_res_latent" and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= CONDITION_ATOL


# ----------------------------------------------------------------------------------------------------- the command
def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def test_command_refuses_a_missing_image_in_one_line(folders, tmp_path, capsys) -> None:
    out = tmp_path / "edit.png"
    code = main([str(folders["bundle"]), "--task", "edit", "--prompt", PROMPT, "--out", str(out)])
    assert code == 2 and "needs --image" in _one_error_line(capsys) and not out.exists()


def test_command_refuses_bad_requests_in_one_line(folders, pictures, tmp_path, capsys) -> None:
    bundle, existing = str(folders["bundle"]), tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    cases = [
        ([bundle, "--task", "edti", "--prompt", PROMPT, "--out", str(tmp_path / "a.png")], "did you mean 'edit'"),
        ([bundle, "--task", "t2i", "--prompt", PROMPT, "--out", str(existing)], "--overwrite"),
        ([bundle, "--task", "t2i", "--prompt", PROMPT, "--out", str(tmp_path / "a.gif")], "must end in"),
        ([str(tmp_path), "--task", "t2i", "--prompt", PROMPT, "--out", str(tmp_path / "a.png")], "no manifest.json"),
        ([bundle, "--task", "inpaint", "--prompt", PROMPT, "--image", str(pictures["wide"]), "--mask",
          str(pictures["square-mask"]), "--out", str(tmp_path / "a.png")], "mask of its image's size"),
    ]  # fmt: skip
    for argv, pattern in cases:
        assert main(argv) == 2, argv
        assert pattern in _one_error_line(capsys), argv
    assert existing.read_bytes() == b"keep"
    with pytest.raises(SystemExit) as stop:  # argparse's own refusals: the same one line, exit code 2
        main([bundle, "--task", "t2i", "--prompt", PROMPT, "--resize", "stretch", "--out", str(tmp_path / "a.png")])
    assert stop.value.code == 2 and "invalid choice" in _one_error_line(capsys)


def test_command_writes_the_image_atomically(folders, tmp_path, capsys) -> None:
    out = tmp_path / "t2i.png"
    argv = [str(folders["t2i"]), "--task", "t2i", "--prompt", PROMPT, "--steps", "1", "--out", str(out)]
    assert main(argv) == 0 and np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i.png"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------------ low memory
@pytest.mark.parametrize("folder, task, optimum", [("bundle", "inpaint", True), ("inpaint", "inpaint", True),
                                                   ("bundle", "edit", True)])  # fmt: skip
def test_low_memory_gives_the_same_image_and_closes_every_graph(folders, pictures, folder, task, optimum) -> None:
    """--low-memory changes where tensors live, not what is computed: the same bytes, and after the request no
    session is left open (each stage closed its graph, the VAE encoder included)."""
    image = Image.open(pictures["wide"])
    mask = Image.open(pictures["wide-mask"]) if task == "inpaint" else None
    request = dict(task=task, image=image, mask=mask, steps=2, guidance=3.0, seed=3, optimum=optimum)
    default = OnDevicePipeline.from_folder(folders[folder], threads=1)
    low = OnDevicePipeline.from_folder(folders[folder], threads=1, low_memory=True)
    expected, got = default(PROMPT, **request), low(PROMPT, **request)
    assert np.array_equal(expected, got)
    assert set(default._graphs) >= {"text_encoder", "unet", "vae_encoder", "vae_decoder"} and low._graphs == {}


def test_command_takes_low_memory(folders, tmp_path) -> None:
    plain, low = tmp_path / "plain.png", tmp_path / "low.png"
    argv = [str(folders["bundle"]), "--task", "t2i", "--prompt", PROMPT, "--steps", "1", "--threads", "1"]
    assert main([*argv, "--out", str(plain)]) == 0 and main([*argv, "--low-memory", "--out", str(low)]) == 0
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(low)))
