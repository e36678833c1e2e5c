"""`mtu-export generate`: run one task of an ONNX export end to end on onnxruntime, seeded and reproducible.

A single-task `t2i` or `inpaint` export (with .onnx graphs) runs in optimum's `ORTStableDiffusionPipeline` /
`ORTStableDiffusionInpaintPipeline`, as users of optimum would run it. `edit` and `sr` (no optimum pipeline takes
an 8- or 7-channel UNet) and every task of an all-task bundle (its UNet takes a `task_id`) run in this project's
own sampler (`sample.sample_examples`) over the exported graphs (`model.onnx`, or `model.ort` in a folder written with
`--format ort`), with text and image guidance as in training.

The output follows every command's rule: an existing `out` is refused unless `overwrite`, as is one that overlaps
an input (the export folder, --image, --mask); it is written in the format its suffix names.

Input images go through the image processor (image_processor.py) with the request's `resize` policy: `fit`
(default) keeps the image's size and aspect, each side rounded to the nearest size the UNet takes (a multiple of the
VAE factor x 2 ** down-samplings), so the output has the input's shape (sr: 4x its sides); `crop` resizes the shorter
side and centre-crops to the export's square size, as training does. A mask is prepared as its image. Any change to
an image is noted in a log line (logs.py: `mtu-export generate` shows it on stderr).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from mtu_export.config import TaskSpec
from mtu_export.errors import ConfigError, InputError
from mtu_export.example import Example
from mtu_export.export.runtime import OrtTextEncoder, OrtUNet, OrtVae
from mtu_export.image_processor import POLICIES, max_pixels, prepare_image, save_image, size_multiple, vae_factor
from mtu_export.ondevice.graphs import graph_path
from mtu_export.sample import Components, SamplerConfig, sample_examples
from mtu_export.storage import atomic_output, image_format, read_json
from mtu_export.tasks import TaskDef, resolve

Progress = Callable[[int, int], None]
logger = logging.getLogger(__name__)


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
    resize: str = "fit"  # image_processor policy for --image / --mask: fit (keep the aspect) or crop (as training)

    def __post_init__(self) -> None:
        if self.resize not in POLICIES:
            raise ConfigError(f"--resize {self.resize!r} is not a policy; choose one of {', '.join(POLICIES)}")
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
) -> str:
    """Write the generated image to `out` (PNG, JPEG or WebP by its suffix); returns which runner made it."""
    export_dir, out = Path(export_dir), Path(out)
    manifest = _manifest(export_dir)
    _check_out(out)
    reads = [export_dir / "manifest.json", export_dir, request.image, request.mask]
    with atomic_output(out, reads, overwrite, file=True) as tmp:  # refused before any sampling
        runner = _generate(export_dir, manifest, request, progress, tmp)
    return runner


def _generate(export_dir: Path, manifest: dict, request: GenerateRequest, progress: Progress | None, tmp: Path) -> str:
    """generate's work: the image written to `tmp`, the temporary file that becomes `out`."""
    if request.task not in manifest["tasks"]:
        known = ", ".join(manifest["tasks"])
        raise ConfigError(f"{export_dir} was exported for {known}, not {request.task!r}; pass --task one of those")
    unet_config = read_json(export_dir / "unet" / "config.json")
    task = resolve(TaskSpec(request.task, manifest["tasks"][request.task]["in_channels"]), unet_config["out_channels"])
    for needed in task.needs:
        if getattr(request, needed) is None:
            raise ConfigError(f"task {request.task!r} needs --{needed} PNG")
    geometry = _geometry(export_dir, unet_config)
    example = _inputs(task, request, geometry)
    # optimum loads .onnx only (not a mobile folder's .ort) and calls its graphs with whole batches (not --batch 1)
    optimum_runs = (export_dir / "unet" / "model.onnx").is_file() and manifest["export"].get("batch") is None
    if manifest["kind"] == "task" and task.optimum_pipeline and request.use_optimum and optimum_runs:
        image = _optimum(export_dir, task, request, example, progress)
        runner = f"optimum {task.optimum_pipeline}"
    else:
        image = _own(export_dir, manifest, task, request, example, geometry.vae_config, progress)
        runner = "mtu-export ORT sampler"
    save_image(tmp, image, image_format(tmp))
    return runner


def _check_out(out: Path) -> None:
    """Refuse, before any work, an `out` that is a folder or has no image suffix."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass an image file to write, such as {out / 'image.png'}")
    image_format(out)


def _manifest(export_dir: Path) -> dict:
    if not (export_dir / "manifest.json").is_file():
        raise InputError(f"{export_dir} is not an `mtu-export onnx` folder (no manifest.json); export it first")
    return read_json(export_dir / "manifest.json")


def _graph(export_dir: Path, component: str) -> Path:
    """The component's model.onnx, or model.ort in a folder written for ONNX Runtime Mobile."""
    try:
        return graph_path(export_dir / component)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None


@dataclass(frozen=True)
class _Geometry:
    pixels: int  # the export's square image size
    factor: int  # the VAE's downsampling factor
    multiple: int  # output sides must be multiples of this (image_processor.size_multiple)
    vae_config: dict


def _geometry(export_dir: Path, unet_config: dict) -> _Geometry:
    vae_config = read_json(export_dir / "vae_decoder" / "config.json")
    factor = vae_factor(vae_config["block_out_channels"])
    size = unet_config.get("sample_size") or 64
    pixels = (size[0] if isinstance(size, list) else size) * factor
    multiple = size_multiple(factor, len(unet_config["block_out_channels"]) - 1)
    return _Geometry(pixels, factor, multiple, vae_config)


def _open(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as picture:
            picture.load()
            return picture
    except (OSError, PIL.UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {path}: {exc}; pass a PNG or JPEG file") from None


def _mask_for(request: GenerateRequest, image: PIL.Image.Image) -> PIL.Image.Image:
    """The inpainting mask, refused unless it has its image's size (checked before any work or note)."""
    mask = _open(request.mask)
    if mask.size != image.size:
        raise InputError(
            f"--mask {request.mask} is {mask.size[0]}x{mask.size[1]}, --image {request.image} is "
            f"{image.size[0]}x{image.size[1]}; pass a mask of its image's size"
        )
    return mask


def _inputs(task: TaskDef, request: GenerateRequest, geometry: _Geometry) -> Example:
    """The request as an Example, so the training code builds the conditioning. `target` only sets the output's
    shape (inpainting: the image whose hole is repainted). The input image is prepared at its own size fitted to
    what the UNet takes, within image_processor.MAX_AREA times the export's area (`fit`), or cropped to the export's
    size (`crop`); sr's low-res input at 1/scale of that."""
    if not task.has_image_input:
        return Example(request.task, request.prompt, np.zeros((geometry.pixels,) * 2 + (3,), np.uint8))
    scale = task.input_scale(geometry.factor)  # output pixels per input pixel
    picture = _open(request.image)
    mask = _mask_for(request, picture) if task.condition.masked else None
    side = geometry.pixels // scale
    size = (side, side) if request.resize == "crop" else None
    cap = max_pixels((geometry.pixels, geometry.pixels), scale)
    image = prepare_image(picture, request.resize, geometry.multiple // scale, size, max_pixels=cap)
    if image.note(str(request.image)):
        logger.info(image.note(str(request.image)))
    if mask is None:
        width, height = image.size
        output = np.zeros((height * scale, width * scale, 3), np.uint8)
        role = "low_res" if task.super_resolution else "source"
        return Example(request.task, request.prompt, output, **{role: image.array})
    hole = prepare_image(mask, request.resize, geometry.multiple, image.size, mask=True)  # resized as its image
    return Example(request.task, request.prompt, image.array, mask=hole.array)


@torch.no_grad()
def _own(export_dir, manifest, task: TaskDef, request, example: Example, vae_config, progress) -> np.ndarray:
    import diffusers
    from transformers import CLIPTokenizer

    scheduler_config = read_json(export_dir / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    tokenizer = CLIPTokenizer.from_pretrained(export_dir / "tokenizer")
    text_encoder = OrtTextEncoder(_graph(export_dir, "text_encoder"), request.threads)
    vae = OrtVae(_graph(export_dir, "vae_encoder"), _graph(export_dir, "vae_decoder"), vae_config, request.threads)
    task_info = manifest["tasks"][request.task]
    bundle = (
        {}
        if task_info["task_id"] is None
        else {"task_id": task_info["task_id"], "channels": manifest["unet_input_channels"]}
    )
    unet = OrtUNet(_graph(export_dir, "unet"), request.threads, **bundle)
    sampler = SamplerConfig(request.steps, request.guidance, request.image_guidance, request.seed)
    calls = [0]

    def denoise(x, t, h):
        calls[0] += 1
        if progress:
            progress(calls[0], request.steps)
        return unet(x, t, h)

    return sample_examples(denoise, task, [example], Components(vae, text_encoder, tokenizer, scheduler), sampler)[0]


def _optimum(export_dir, task: TaskDef, request, example: Example, progress) -> np.ndarray:
    import optimum.onnxruntime as ort_pipelines

    pipeline_class = getattr(ort_pipelines, task.optimum_pipeline)
    options = None
    if request.threads:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = request.threads
    pipe = pipeline_class.from_pretrained(export_dir, session_options=options)
    pipe.set_progress_bar_config(disable=True)
    height, width = example.target.shape[:2]
    kwargs = dict(
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=torch.Generator().manual_seed(request.seed),
        height=height,
        width=width,
        output_type="np",
    )
    if progress:
        kwargs["callback_on_step_end"] = lambda p, i, t, kw: (progress(i + 1, request.steps), kw)[1]
    if task.condition.masked:  # already at a size the UNet takes: optimum's processor keeps it
        kwargs["image"] = PIL.Image.fromarray(example.target)
        kwargs["mask_image"] = PIL.Image.fromarray(example.mask.astype(np.uint8) * 255)
    images = pipe(request.prompt, **kwargs).images  # (1, H, W, 3) floats in [0, 1]
    return (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)
