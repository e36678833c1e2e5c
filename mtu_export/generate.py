"""`mtu-export generate`: run one task of an ONNX export end to end on onnxruntime, seeded and reproducible.

A single-task `t2i` or `inpaint` export runs in optimum's `ORTStableDiffusionPipeline` /
`ORTStableDiffusionInpaintPipeline`, as users of optimum would run it. `edit` and `sr` (no optimum pipeline takes
an 8- or 7-channel UNet) and every task of an all-task bundle (its UNet takes a `task_id`) run in this project's
own sampler (`sample.sample_examples`) over the exported graphs, with text and image guidance as in training.

The output follows every command's rule: an existing `out` is refused unless `overwrite`, as is one that overlaps
an input (the export folder, --image, --mask); it is written in the format its suffix names. An input image of
another size is resized to the model's, with a note to `log` (stderr by default), never silently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtu_export.config import TaskSpec
from mtu_export.data import low_res_size
from mtu_export.errors import ConfigError, InputError
from mtu_export.export.runtime import OrtTextEncoder, OrtUNet, OrtVae
from mtu_export.sample import Components, SamplerConfig, sample_examples
from mtu_export.storage import check_output, check_separate, read_json
from mtu_export.tasks import TaskDef, resolve
from mtu_export.world import Example
from mtu_export.world_grid import image_format, save_image

Progress = Callable[[int, int], None]
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class GenerateRequest:
    task: str
    prompt: str
    image: Path | None = None
    mask: Path | None = None
    steps: int = 25
    guidance: float = 3.0
    image_guidance: float = 1.5
    seed: int = 0
    threads: int | None = None
    use_optimum: bool = True  # t2i / inpaint single-task exports: optimum's pipelines

    def __post_init__(self) -> None:
        for path in (self.image, self.mask):
            if path is not None and not Path(path).is_file():
                raise InputError(f"{path} is not a file; pass an existing PNG")
        if self.steps < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"--steps and --threads must be >= 1, got {self.steps} and {self.threads}")


def generate(
    export_dir: Path,
    request: GenerateRequest,
    out: Path,
    progress: Progress | None = None,
    overwrite: bool = False,
    log: Log = _stderr,
) -> str:
    """Write the generated image to `out` (PNG, JPEG or WebP by its suffix); returns which runner made it."""
    export_dir, out = Path(export_dir), Path(out)
    manifest = _manifest(export_dir)
    _check_out(out, export_dir, request, overwrite)
    if request.task not in manifest["tasks"]:
        known = ", ".join(manifest["tasks"])
        raise ConfigError(f"{export_dir} was exported for {known}, not {request.task!r}; pass --task one of those")
    unet_config = read_json(export_dir / "unet" / "config.json")
    task = resolve(TaskSpec(request.task, manifest["tasks"][request.task]["in_channels"]), unet_config["out_channels"])
    for needed in task.needs:
        if getattr(request, needed) is None:
            raise ConfigError(f"task {request.task!r} needs --{needed} PNG")
    size = unet_config.get("sample_size") or 64
    vae_config = read_json(export_dir / "vae_decoder" / "config.json")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    pixels = (size[0] if isinstance(size, list) else size) * factor
    if manifest["kind"] == "task" and task.optimum_pipeline and request.use_optimum:
        image = _optimum(export_dir, task, request, pixels, progress, log)
        runner = f"optimum {task.optimum_pipeline}"
    else:
        image = _own(export_dir, manifest, task, request, pixels, factor, vae_config, progress, log)
        runner = "mtu-export ORT sampler"
    check_output(out, overwrite)  # again: something may have appeared there while sampling
    save_image(out, image)
    return runner


def _check_out(out: Path, export_dir: Path, request: GenerateRequest, overwrite: bool) -> None:
    """Refuse, before any work, an `out` that is a folder, has no image suffix, overlaps an input or exists."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass an image file to write, such as {out / 'image.png'}")
    image_format(out)
    check_separate(out, export_dir / "manifest.json", export_dir, request.image, request.mask)
    check_output(out, overwrite)


def _manifest(export_dir: Path) -> dict:
    if not (export_dir / "manifest.json").is_file():
        raise InputError(f"{export_dir} is not an `mtu-export onnx` folder (no manifest.json); export it first")
    return read_json(export_dir / "manifest.json")


def _read_image(path: Path, size: int, mode: str = "RGB", log: Log = _stderr) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            picture = picture.convert(mode)
            if picture.size != (size, size):
                width, height = picture.size
                log(f"note: resized {path} from {width}x{height} to {size}x{size}, the size this export takes")
                picture = picture.resize((size, size), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
            return np.asarray(picture)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {path}: {exc}; pass a PNG or JPEG file") from None


def _inputs(task: TaskDef, request: GenerateRequest, pixels: int, factor: int, log: Log) -> Example:
    """The request as an Example, so the training code builds the conditioning. `target` only sets the shape
    (inpainting: the image whose hole is repainted)."""
    source = mask = None
    target = np.zeros((pixels, pixels, 3), np.uint8)
    if task.super_resolution:
        source = _read_image(request.image, low_res_size(task, pixels, factor), log=log)
    elif task.condition == "source_latent":
        source = _read_image(request.image, pixels, log=log)
    elif task.condition == "masked_latent":
        target = _read_image(request.image, pixels, log=log)
        mask = _read_image(request.mask, pixels, "L", log) > 127  # white = repaint
    return Example(request.task, request.prompt, target, None, source, mask)


@torch.no_grad()
def _own(export_dir, manifest, task: TaskDef, request, pixels, factor, vae_config, progress, log) -> np.ndarray:
    import diffusers
    from transformers import CLIPTokenizer

    scheduler_config = read_json(export_dir / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    tokenizer = CLIPTokenizer.from_pretrained(export_dir / "tokenizer")
    text_encoder = OrtTextEncoder(export_dir / "text_encoder" / "model.onnx", request.threads)
    vae = OrtVae(
        export_dir / "vae_encoder" / "model.onnx",
        export_dir / "vae_decoder" / "model.onnx",
        vae_config,
        request.threads,
    )
    task_info = manifest["tasks"][request.task]
    bundle = (
        {}
        if task_info["task_id"] is None
        else {"task_id": task_info["task_id"], "channels": manifest["unet_input_channels"]}
    )
    unet = OrtUNet(export_dir / "unet" / "model.onnx", request.threads, **bundle)
    example = _inputs(task, request, pixels, factor, log)
    sampler = SamplerConfig(request.steps, request.guidance, request.image_guidance, request.seed)
    calls = [0]

    def denoise(x, t, h):
        calls[0] += 1
        if progress:
            progress(calls[0], request.steps)
        return unet(x, t, h)

    return sample_examples(denoise, task, [example], Components(vae, text_encoder, tokenizer, scheduler), sampler)[0]


def _optimum(export_dir, task: TaskDef, request, pixels, progress, log) -> np.ndarray:
    import optimum.onnxruntime as ort_pipelines
    from PIL import Image

    pipeline_class = getattr(ort_pipelines, task.optimum_pipeline)
    options = None
    if request.threads:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = request.threads
    pipe = pipeline_class.from_pretrained(export_dir, session_options=options)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=torch.Generator().manual_seed(request.seed),
        height=pixels,
        width=pixels,
        output_type="np",
    )
    if progress:
        kwargs["callback_on_step_end"] = lambda p, i, t, kw: (progress(i + 1, request.steps), kw)[1]
    if task.condition == "masked_latent":
        kwargs["image"] = Image.fromarray(_read_image(request.image, pixels, log=log))
        mask = _read_image(request.mask, pixels, "L", log) > 127
        kwargs["mask_image"] = Image.fromarray(mask.astype(np.uint8) * 255)
    images = pipe(request.prompt, **kwargs).images  # (1, H, W, 3) floats in [0, 1]
    return (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)
