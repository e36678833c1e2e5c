"""The task registry: what each task is, and what it does, defined once.

A task's definition says which extra input channels its `conv_in` takes and how they are built (its `Condition`),
how sampling guides it (text only, or text + image as InstructPix2Pix), whether training drops its image condition,
the diffusers / optimum pipeline classes its folded export targets, the dataset columns it reads by default
(diffusers' training-script conventions) and the do-nothing floor its metrics are compared with.

A condition is a sequence of parts concatenated after the latent on the channel axis, each built from the request's
image (and mask) by one recipe of PARTS, which every sampler implements (conditioning.py with torch, the
standalone pipelines.py shipped in ONNX folders, ondevice/pipeline.py with numpy, the Swift notes of apple.py).
A new condition made of these parts is one entry of CONDITIONS (L = the UNet's latent channels):

- `none`              text-to-image                                                                                    L
- `source_latent`     VAE latent (posterior mode, unscaled) of a source image, as InstructPix2Pix                     2L
- `low_res_rgb`       the low-res RGB image at latent resolution, as SD's x4 upscaler (factor-4 VAE)               L + 3
- `low_res_latent`    VAE latent of the low-res image bicubic-upsampled to full size (x4, any VAE)                    2L
- `low_res_latent_x2` the same at x2 (the built-in `sr2`)                                                             2L
- `masked_latent`     mask + latent of the masked image, as SD inpainting                                         2L + 1

Besides the built-in `t2i`, `edit`, `sr`, `sr2` and `inpaint`, any other task name declared with 2L channels
(`colorize:8`) is an image-conditioned task like `edit`: source image in, target image out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mtu_export.config import TaskSpec, did_you_mean
from mtu_export.errors import ConfigError

SR_SCALE = 4  # super-resolution factor of `sr` with a VAE latent condition (the x4 upscaler's factor)


# The parts of a condition. Each takes the request's input image (and, for the masked parts, its mask) and gives
# channels at latent resolution, in this order after the latent:
PARTS: dict[str, str] = {
    "image": "the input image itself in [-1, 1], which sits at latent resolution (3 channels)",
    "image_latent": (
        "the input image bicubic-upsampled to the output's size (when smaller) and clamped to [-1, 1], through the "
        "VAE encoder: the posterior mode, unscaled (L channels)"
    ),
    "mask": "the mask (1 = repaint) nearest-resized to the latent (1 channel)",
    "masked_latent": (
        "the input image with its hole set to 0 in [-1, 1], through the VAE encoder: a posterior sample times the "
        "VAE's scaling factor (L channels)"
    ),
}
_LATENT_WIDE = ("image_latent", "masked_latent")
_FIXED_WIDTH = {"image": 3, "mask": 1}


def part_channels(part: str, latent_channels: int) -> int:
    """The channels one part of a condition adds for a UNet with `latent_channels`."""
    return latent_channels if part in _LATENT_WIDE else _FIXED_WIDTH[part]


@dataclass(frozen=True)
class Condition:
    """What a task feeds its UNet besides the noisy latent (see the module docstring)."""

    name: str
    parts: tuple[str, ...]  # PARTS, in channel order
    scale: int | None = 1  # output pixels per input-image pixel; None: the VAE's factor (an input at latent size)

    def __post_init__(self) -> None:
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown:
            raise ValueError(f"condition {self.name!r}: unknown parts {unknown}; the parts are {', '.join(PARTS)}")

    def extra_channels(self, latent_channels: int) -> int:
        return sum(part_channels(part, latent_channels) for part in self.parts)

    def input_scale(self, vae_factor: int) -> int:
        """Output pixels per input-image pixel: a super-resolution input is smaller by this factor."""
        return vae_factor if self.scale is None else self.scale

    @property
    def masked(self) -> bool:
        """The input is an image to repaint and its mask (the output keeps the image's size)."""
        return "mask" in self.parts

    @property
    def needs(self) -> tuple[str, ...]:
        """What a request gives besides the prompt: nothing, an image, or an image and its mask."""
        return ("image", "mask") if self.masked else ("image",) if self.parts else ()

    @property
    def encodes_input(self) -> bool:
        """The VAE encoder sees the input image as it is (an image-to-image task of the output's size)."""
        return "image_latent" in self.parts and self.scale == 1

    def describe(self) -> dict:
        """The condition as exported folders record it, enough for a sampler to build it without this module."""
        return {"condition": self.name, "parts": list(self.parts), "input_scale": self.scale}


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("none", ()),
        Condition("source_latent", ("image_latent",)),
        Condition("low_res_rgb", ("image",), scale=None),
        Condition("low_res_latent", ("image_latent",), scale=SR_SCALE),
        Condition("low_res_latent_x2", ("image_latent",), scale=2),
        Condition("masked_latent", ("mask", "masked_latent")),
    )
}


@dataclass(frozen=True)
class TaskDef:
    """Everything the toolchain needs to know about one task (see the module docstring)."""

    name: str
    condition: Condition
    image_guidance: bool  # sampling: InstructPix2Pix's text + image guidance; else text guidance only
    drop_image: bool  # training drops the image condition with the text (needed for image guidance)
    pipeline: str  # the diffusers pipeline class a folded single-task export is labelled with
    optimum_pipeline: str | None  # optimum's ORT pipeline that runs its ONNX export, if one exists
    columns: dict[str, str] = field(default_factory=dict)  # role -> default dataset column
    floor: str | None = None  # do-nothing baseline of its metrics: "source" (return the input) or "bicubic"
    primary: str = "psnr"  # the metric parity judges it by (higher is better)
    reader_scored: bool = False  # on the shapes world, the scene reader checks its outputs against the caption
    world: str | None = None  # the shapes world's example family it trains and evaluates on without --data
    builtin: bool = True

    def extra_channels(self, latent_channels: int) -> int:
        return self.condition.extra_channels(latent_channels)

    def input_scale(self, vae_factor: int) -> int:
        return self.condition.input_scale(vae_factor)

    @property
    def needs(self) -> tuple[str, ...]:
        """`generate` inputs besides the prompt: image, mask."""
        return self.condition.needs

    @property
    def has_image_input(self) -> bool:
        return bool(self.condition.parts)

    @property
    def super_resolution(self) -> bool:
        return self.condition.scale != 1


_PROMPT, _IMAGE = "text", "image"
BUILTIN: dict[str, TaskDef] = {
    "t2i": TaskDef(
        "t2i",
        CONDITIONS["none"],
        image_guidance=False,
        drop_image=False,
        pipeline="StableDiffusionPipeline",
        optimum_pipeline="ORTStableDiffusionPipeline",
        columns={"image": _IMAGE, "prompt": _PROMPT},
        primary="reader_accuracy",
        reader_scored=True,
        world="t2i",
    ),
    "edit": TaskDef(
        "edit",
        CONDITIONS["source_latent"],
        image_guidance=True,
        drop_image=True,
        pipeline="StableDiffusionInstructPix2PixPipeline",
        optimum_pipeline=None,
        columns={"source": "input_image", "prompt": "edit_prompt", "image": "edited_image"},
        floor="source",
        reader_scored=True,
        world="edit",
    ),
    "sr": TaskDef(
        "sr",
        CONDITIONS["low_res_rgb"],
        image_guidance=True,
        drop_image=True,
        pipeline="MTUSuperResolutionPipeline",  # shipped in the folder (pipelines.py): diffusers has no such pipeline
        optimum_pipeline=None,
        columns={"image": _IMAGE, "prompt": _PROMPT, "low_res": "low_res_image"},
        floor="bicubic",
        world="sr",
    ),
    "sr2": TaskDef(
        "sr2",
        CONDITIONS["low_res_latent_x2"],
        image_guidance=True,
        drop_image=True,
        pipeline="MTUSuperResolutionPipeline",
        optimum_pipeline=None,
        columns={"image": _IMAGE, "prompt": _PROMPT, "low_res": "low_res_image"},
        floor="bicubic",
        world="sr",  # the world's sr scenes, the low-res input made at half the output's side
    ),
    "inpaint": TaskDef(
        "inpaint",
        CONDITIONS["masked_latent"],
        image_guidance=False,
        drop_image=False,  # SD inpainting keeps its image in both guidance branches
        pipeline="StableDiffusionInpaintPipeline",
        optimum_pipeline="ORTStableDiffusionInpaintPipeline",
        columns={"image": _IMAGE, "prompt": _PROMPT, "mask": "mask"},
        world="inpaint",
    ),
}
RESERVED = ("all",)  # `--task all` means every task of a checkpoint


def declared(name: str) -> TaskDef:
    """A user-declared image-conditioned task: a source image's latent concatenated, InstructPix2Pix's recipe."""
    return replace(BUILTIN["edit"], name=name, builtin=False, reader_scored=False, world=None)


def default_channels(name: str, latent_channels: int = 4, vae_factor: int = 4) -> int | None:
    """`conv_in` channels of a built-in task for a UNet with `latent_channels` and a VAE downsampling by
    `vae_factor`; None for a name that is not built in. `sr` feeds the low-res RGB image at latent resolution with a
    factor-4 VAE (SD's x4 upscaler) and the latent of its bicubic upsample otherwise (with SD1.5's factor-8 VAE the
    RGB convention would mean x8 super-resolution)."""
    if name == "sr":
        return latent_channels + (3 if vae_factor == SR_SCALE else latent_channels)
    if name not in BUILTIN:
        return None
    return latent_channels + BUILTIN[name].extra_channels(latent_channels)


def check_declaration(name: str, channels: int | None, latent_channels: int = 4, vae_factor: int = 4) -> None:
    """Refuse task names and channel counts no command could run: `all`, a built-in with a channel count other
    than its convention's."""
    if name in RESERVED:
        raise ConfigError(f"{name!r} is reserved (`--task all` means every task); name the task otherwise")
    if channels is None or name not in BUILTIN:
        return
    allowed = {default_channels(name, latent_channels, vae_factor)}
    if name == "sr":
        allowed |= {latent_channels + 3, 2 * latent_channels}
    if channels not in allowed:
        shown = " or ".join(str(c) for c in sorted(allowed))
        raise ConfigError(
            f"built-in task {name!r} takes {shown} input channels, not {channels}; drop ':{channels}' "
            f"or give a new task its own name (e.g. 'my_{name}:{channels}')"
        )


def resolve(spec: TaskSpec, latent_channels: int = 4) -> TaskDef:
    """The definition of a checkpoint's task. Raises a one-line ConfigError for a task no command past `fold` can
    run (a declared task whose channels are not an image-conditioned task's)."""
    if spec.name in BUILTIN:
        task = BUILTIN[spec.name]
        if spec.name == "sr" and spec.in_channels == 2 * latent_channels:
            task = replace(task, condition=CONDITIONS["low_res_latent"])
        expected = latent_channels + task.extra_channels(latent_channels)
        if spec.in_channels != expected:
            raise ConfigError(
                f"task {spec.name!r} has {spec.in_channels} input channels, its convention needs {expected}; "
                "re-upcycle with the default channel count"
            )
        return task
    if spec.in_channels == 2 * latent_channels:
        return declared(spec.name)
    raise ConfigError(
        f"task {spec.name!r} takes {spec.in_channels} input channels; beyond upcycle and fold, a declared task must be "
        f"image-conditioned ({2 * latent_channels} channels: latent + source-image latent, as InstructPix2Pix); "
        f"re-upcycle with '{spec.name}:{2 * latent_channels}'"
    )


_SDXL = {
    "StableDiffusionInstructPix2PixPipeline": "StableDiffusionXLInstructPix2PixPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionXLInpaintPipeline",
}


def pipeline_class(task: TaskDef, base_class: str) -> str:
    """The diffusers pipeline class a folded `task` of a `base_class` pipeline is labelled with; a ConfigError when
    no class would run it (a label that names a stock pipeline which then crashes is worse than a refusal)."""
    if base_class == "StableDiffusionPipeline":
        return task.pipeline
    if task.pipeline == "StableDiffusionPipeline":  # text-to-image keeps its base's own class
        return base_class
    if base_class == "StableDiffusionXLPipeline" and task.pipeline in _SDXL:
        return _SDXL[task.pipeline]
    raise ConfigError(
        f"no pipeline class runs a folded {task.name!r} of a {base_class or 'unlabelled'} base; fold it from a "
        "Stable Diffusion 1.x/2.x pipeline, or upcycle the bare UNet folder and fold that (a UNet folder out)"
    )


def resolve_all(specs: tuple[TaskSpec, ...], latent_channels: int = 4) -> dict[str, TaskDef]:
    return {spec.name: resolve(spec, latent_channels) for spec in specs}


def model_tasks(model) -> dict[str, TaskDef]:
    """The definitions of an MTU UNet's tasks (its latent channels are its UNet's output channels)."""
    return resolve_all(model.config.tasks, model.unet.config.out_channels)


def resolve_name(name: str, specs: tuple[TaskSpec, ...], latent_channels: int = 4) -> TaskDef:
    """The definition of the task called `name` among a checkpoint's `specs` (a clear error if it has none)."""
    for spec in specs:
        if spec.name == name:
            return resolve(spec, latent_channels)
    names = [s.name for s in specs]
    raise ConfigError(f"unknown task {name!r}; this model has: {', '.join(names)}{did_you_mean(name, names)}")


def parse_tasks(text: str, latent_channels: int = 4, vae_factor: int = 4) -> tuple[TaskSpec, ...]:
    """Parse `t2i,edit,sr,inpaint,colorize:8` (built-ins take their convention's channels; a new task needs
    `:channels`)."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        if count and not count.isdigit():
            raise ConfigError(f"task {item!r}: channel count must be an integer, as in 'colorize:8'")
        channels = int(count) if count else None
        check_declaration(name, channels, latent_channels, vae_factor)
        default = default_channels(name, latent_channels, vae_factor)
        if channels is None and default is None:
            raise ConfigError(
                f"unknown task {name!r}; built in: {', '.join(BUILTIN)}{did_you_mean(name, list(BUILTIN))} "
                f"(or declare an image-conditioned task with its channel count, as in '{name}:{2 * latent_channels}')"
            )
        specs.append(TaskSpec(name, channels if channels is not None else default))
    if not specs:
        raise ConfigError("no tasks given; pass e.g. --tasks t2i,edit,sr,inpaint")
    return tuple(specs)
