"""Quality of a shapes-world pipeline on a held-out split: VAE reconstruction PSNR and text-to-image attribute
accuracy by the scene reader (the way CLIP score is used for Stable Diffusion).

Loads pipelines with plain diffusers, exactly as a user would. Checkpoints are evaluated on the shapes world or on a
task's `--data` dataset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtu_export.config import SparseFold
from mtu_export.errors import ConfigError, InputError
from mtu_export.metrics import UINT8_PEAK, psnr_db, set_psnr, ssim
from mtu_export.sample import SamplerConfig, sample_examples
from mtu_export.shapes.reader import accuracy, score
from mtu_export.shapes.world import SPLITS, make_example
from mtu_export.tasks import TaskDef, model_tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Which examples to score (split, range, batch size) and how to sample them."""

    split: str = "heldout"
    count: int = 200
    first: int = 0  # index of the first example: tune guidance on other indices than the ones reported
    batch_size: int = 50
    sampler: SamplerConfig = SamplerConfig()
    sparse: SparseFold | None = None  # sample each task as its sparse fold would (the routed model dropping experts)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if self.count < 1 or self.sampler.steps < 1 or self.batch_size < 1 or self.first < 0:
            raise ConfigError("count, steps and batch size must be positive, and the first index >= 0")

    def batches(self) -> Iterator[range]:
        """Example indices in batches of `batch_size`, from `first`."""
        end = self.first + self.count
        for start in range(self.first, end, self.batch_size):
            yield range(start, min(start + self.batch_size, end))

    def base_record(self) -> dict:
        """The settings a base pipeline's evaluation reports (text guidance only: t2i has no image input)."""
        sampler = self.sampler
        return {
            "split": self.split,
            "count": self.count,
            "first": self.first,
            "steps": sampler.steps,
            "guidance": sampler.text_guidance,
            "seed": sampler.seed,
            "batch_size": self.batch_size,
        }


def load_sd_pipeline(path: Path):
    """A StableDiffusionPipeline from a local folder, in fp32 (CPU), without progress bars."""
    from diffusers import StableDiffusionPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise InputError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder")
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def vae_psnr(vae, config: EvalConfig) -> dict:
    """Mean and worst PSNR of encode (posterior mean) -> decode on the split's t2i scenes, and the scene reader's
    accuracy on those reconstructions against their captions: the ceiling of any UNet sampling through this VAE."""
    from mtu_export.conditioning import image_tensor, to_uint8

    pairs, scores = [], []
    for indices in config.batches():
        examples = [make_example("t2i", config.split, i) for i in indices]
        targets = [e.target for e in examples]
        latents = vae.encode(image_tensor(targets)).latent_dist.mean
        recon = to_uint8(vae.decode(latents).sample)
        pairs += list(zip(targets, recon, strict=True))
        scores += [score(r, e.prompt) for e, r in zip(examples, recon, strict=True)]
    summary = set_psnr(pairs)
    values = [psnr_db(t, r, UINT8_PEAK) for t, r in pairs]
    finite = [v for v in values if v is not None]
    return {
        "psnr_mean_db": summary["mean_db"],  # over the reconstructions that differ from their image
        "psnr_set_db": summary["set_db"],
        "psnr_min_db": min(finite) if finite else None,
        "identical": summary["identical"],
        "images": len(values),
        "reader_accuracy_on_reconstructions": accuracy(scores),
    }


@torch.no_grad()
def t2i_accuracy(pipe, config: EvalConfig, grid_count: int = 0) -> tuple[dict[str, float], list[np.ndarray]]:
    """Scene-reader attribute accuracy of images sampled from the split's captions (fixed seed per batch), and the
    first `grid_count` images for a picture."""
    scores, shown = [], []
    for indices in config.batches():
        prompts = [make_example("t2i", config.split, i).prompt for i in indices]
        images = pipe(
            prompts,
            height=64,
            width=64,
            num_inference_steps=config.sampler.steps,
            guidance_scale=config.sampler.text_guidance,
            generator=torch.Generator().manual_seed(config.sampler.seed + indices.start),
            output_type="np",
        ).images  # (B, 64, 64, 3) float in [0, 1]
        images = (images * 255).round().astype(np.uint8)
        scores += [score(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
        shown += list(images[: max(0, grid_count - len(shown))])
    return accuracy(scores), shown


def evaluate_base(path: Path, config: EvalConfig, grid_count: int = 0) -> tuple[dict, list[np.ndarray]]:
    """VAE PSNR and t2i accuracy of the pipeline at `path` on `config.split`."""
    pipe = load_sd_pipeline(path)
    vae = vae_psnr(pipe.vae, config)
    t2i, images = t2i_accuracy(pipe, config, grid_count)
    return {"pipeline": str(path), "config": config.base_record(), "vae": vae, "t2i_accuracy": t2i}, images


# ------------------------------------------------------------------------------------------------ task evaluation
def bicubic(low_res: np.ndarray, size: int | tuple[int, int] = 64) -> np.ndarray:
    """`low_res` upsampled bicubic to `size` pixels, square or (height, width): sr's do-nothing floor."""
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(low_res).resize((width, height), Image.BICUBIC))


def task_input(example) -> np.ndarray:
    """What the task was given, as a picture for grids: the low-res image upsampled, the source, the image with its
    hole greyed, or white for t2i."""
    if example.mask is not None:
        shown = example.target.copy()
        shown[example.mask] = 127
        return shown
    if example.input is None:
        return np.full_like(example.target, 255)  # t2i has no image input
    if example.input.shape != example.target.shape:
        return bicubic(example.input, example.target.shape[:2])
    return example.input


SSIM_OF = {"psnr": "ssim", "bicubic_psnr": "bicubic_ssim", "source_psnr": "source_ssim"}  # PSNR pair -> its SSIM


def example_pairs(task: TaskDef, example, image: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (reference, output) pixels behind each PSNR of a generated `image` (uint8 (H, W, 3)) for `task`: to
    ground truth, inside the inpainting hole, and its do-nothing floor's (sr: the bicubic upsample; edit: the source
    handed back)."""
    if not task.has_image_input:
        return {}
    pairs = {"psnr": (example.target, image)}
    if example.mask is not None:
        pairs["psnr_mask"] = (example.target[example.mask], image[example.mask])
    if task.floor == "bicubic":
        pairs["bicubic_psnr"] = (example.target, bicubic(example.input, example.target.shape[:2]))
    elif task.floor == "source":
        pairs["source_psnr"] = (example.target, example.input)
    return pairs


def example_metrics(task: TaskDef, example, image: np.ndarray) -> dict[str, float | None]:
    """Per-example metrics of a generated `image` for `task`, with its do-nothing floor; a PSNR is None where the
    images are identical (metrics.psnr_db)."""
    pairs = example_pairs(task, example, image)
    out = {key: psnr_db(reference, output, UINT8_PEAK) for key, (reference, output) in pairs.items()}
    return out | {SSIM_OF[key]: ssim(*pair) for key, pair in pairs.items() if key in SSIM_OF}


def summarise(task: TaskDef, examples: list, images: list[np.ndarray]) -> dict[str, float | int | None]:
    """Metrics of a set, never inf or NaN (metrics.set_psnr): each PSNR as the mean over the pairs that differ
    (`psnr`), the set's PSNR from its mean squared error (`psnr_set`) and the identical pairs (`psnr_identical`);
    SSIM means; the gain of the output over the task's do-nothing floor in set PSNR (`gain_over_floor_db`); on the
    shapes world, scene-reader accuracy against the target scene's caption (t2i: is the caption drawn; edit: did
    the edit happen)."""
    pairs = [example_pairs(task, e, im) for e, im in zip(examples, images, strict=True)]
    out: dict[str, float | int | None] = {}
    for key in pairs[0] if pairs else {}:
        summary = set_psnr([p[key] for p in pairs])
        out[key], out[f"{key}_set"] = summary["mean_db"], summary["set_db"]
        out[f"{key}_identical"] = summary["identical"]
        if key in SSIM_OF:
            out[SSIM_OF[key]] = float(np.mean([ssim(*p[key]) for p in pairs]))
    floor = f"{task.floor}_psnr_set" if task.floor else None
    if floor in out:
        value, base = out["psnr_set"], out[floor]
        out["gain_over_floor_db"] = value - base if value is not None and base is not None else None
    if task.reader_scored and all(e.scene is not None for e in examples):
        out["reader_accuracy"] = accuracy(
            [score(im, e.scene.caption()) for e, im in zip(examples, images, strict=True)]
        )["all"]
    return out


def evaluation_source(task: TaskDef, spec, config: EvalConfig, pipeline_dir: Path, unet_config: dict):
    """Where `task` is evaluated: its `--data` dataset (image-conditioned tasks) or the shapes world's split; the
    ranges `config` asks for must lie inside a dataset."""
    from mtu_export.data import open_source, pipeline_geometry

    if spec is not None and not task.has_image_input:
        raise ConfigError(
            f"--data for {task.name}: text-to-image has no reference metric on your own images here (FID and CLIP "
            "score need hub models); evaluate it on the shapes world, or score exported images with your own tools"
        )
    _, factor, size = pipeline_geometry(pipeline_dir, unet_config)
    source = open_source(task, spec, config.split, size, factor)
    if spec is not None and config.first + config.count > len(source):
        raise ConfigError(
            f"{spec.path} has {len(source)} rows; --first {config.first} --count {config.count} runs past them"
        )
    return source


def evaluation_sources(
    model, pipeline_dir: Path, config: EvalConfig, tasks: tuple[str, ...], data: dict | None, where: str
) -> dict:
    """Each of `tasks`' evaluation source (`evaluation_source`) for an MTU UNet whose pipeline is `pipeline_dir`;
    a clear error for a task the model lacks or a `--data` for one (`where` names the model in it)."""
    from mtu_export.data import check_data_tasks

    defs = model_tasks(model)
    for task in tasks:
        model.config.task(task)  # a clear error for a task the model lacks
    data = data or {}
    check_data_tasks(data, tuple(tasks), where)
    unet_config = dict(model.unet.config)
    return {t: evaluation_source(defs[t], data.get(t), config, pipeline_dir, unet_config) for t in tasks}


def _denoiser_on_cpu(model, task: str, sparse: SparseFold | None = None):
    """The routed denoiser of `task` (dropping the experts `sparse` drops), fed and read on the CPU (where sampling
    keeps its latents) wherever `model` lives (a training run's model may sit on a GPU)."""
    device = next(model.parameters()).device
    return lambda x, t, h: model(x.to(device), t.to(device), h.to(device), task=task, sparse=sparse).sample.cpu()


def evaluate_model(model, sources: dict, components, config: EvalConfig, label: str = "") -> tuple:
    """Sample every task of `sources` (task -> Source) with the MTU UNet `model` and measure it, logging a line per
    batch (`label` opens it). Returns results, generated images and the examples, each per task."""
    defs = model_tasks(model)
    results, generated, inputs = {}, {}, {}
    for task, source in sources.items():
        examples, images = [], []
        denoise = _denoiser_on_cpu(model, task, config.sparse)
        start = time.perf_counter()
        for indices in config.batches():
            batch = [source.example(i) for i in indices]
            images += list(sample_examples(denoise, defs[task], batch, components, config.sampler))
            examples += batch
            logger.info(f"{label} {task}: {len(examples)}/{config.count} sampled ({time.perf_counter() - start:.0f} s)")
        results[task] = summarise(defs[task], examples, images)
        generated[task], inputs[task] = images, examples
    return results, generated, inputs


def evaluate_checkpoint(
    path: Path,
    config: EvalConfig,
    tasks: tuple[str, ...] | None = None,
    data: dict | None = None,
) -> tuple:
    """Sample every task of an MTU (or single-task baseline) checkpoint on `config.split` (or a task's `--data`
    dataset) and measure it, logging a line per batch. Returns results, generated images and the examples, each
    per task."""
    from mtu_export.checkpoint import load_checkpoint, load_components

    ckpt = load_checkpoint(path, dtype=torch.float32)
    if ckpt.pipeline_dir is None:
        raise InputError(f"{path} was upcycled from a UNet folder; evaluation needs its pipeline (VAE, text encoder)")
    chosen = tuple(tasks or ckpt.model.config.task_names)
    sources = evaluation_sources(ckpt.model, ckpt.pipeline_dir, config, chosen, data, str(path))
    return evaluate_model(ckpt.model, sources, load_components(ckpt.pipeline_dir), config, label=str(path))


# --------------------------------------------------------------------------------------------------------- outputs
@contextmanager
def eval_outputs(
    path: Path, json_out: Path | None, grid: Path | None, overwrite: bool = False, data: dict | None = None
) -> Iterator[Callable[[dict, list[np.ndarray], int], list[Path]]]:
    """The --json and --grid files of one evaluation (either may be None). On entry, before any sampling: refuse a
    grid that is not a .png, both naming one file, or either existing (unless `overwrite`) or overlapping what
    evaluating `path` reads (its pipeline, a shared one, `--data` datasets). Yields `write(result, images, columns)`,
    which writes both (the grid: `images` in rows of `columns`) and returns their paths; each is renamed into place
    when the block ends without an error (storage.atomic_output)."""
    from mtu_export.shapes.world_grid import write_images
    from mtu_export.storage import atomic_output, write_json

    reads = [path, *(spec.path for spec in (data or {}).values())]
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise ConfigError(f"--grid must name a .png file, got {Path(grid).name!r}")
    if json_out is not None and grid is not None and Path(json_out).resolve() == Path(grid).resolve():
        raise ConfigError(f"--json and --grid both name {json_out}; give each its own file")
    with ExitStack() as stack:
        tmp = {
            option: stack.enter_context(atomic_output(Path(out), reads, overwrite, option=option, file=True))
            for option, out in (("--json", json_out), ("--grid", grid))
            if out is not None
        }

        def write(result: dict, images: list[np.ndarray], columns: int = 8) -> list[Path]:
            if "--json" in tmp:
                write_json(tmp["--json"], result)
            if "--grid" in tmp:
                write_images(tmp["--grid"], images, columns=columns)
            return [Path(p) for p in (json_out, grid) if p is not None]

        yield write


GRID_ROWS = 8  # examples per task in an evaluation grid


def grid_rows(images: dict[str, list[np.ndarray]], examples: dict[str, list]) -> list[np.ndarray]:
    """The first GRID_ROWS examples of every task as rows of input | output | target (task_input shows the input)."""
    cells = []
    for task, outputs in images.items():
        for example, output in list(zip(examples[task], outputs, strict=True))[:GRID_ROWS]:
            cells += [task_input(example), output, example.target]
    return cells
