"""The torch-free pipeline: every task of an `mtu-export onnx` folder, end to end, on onnxruntime, numpy, Pillow and
`tokenizers` alone, giving the images `mtu-export generate` gives (to within a grey level) for the same request.

It owns the sampling choices `generate` makes, restated without torch:

- sizes: the input image through image_processor.py with the request's policy (`fit` keeps its aspect, `crop` cuts
  the export's square), sr's low-res input at 1/scale of the output, `fit`'s area cap, a mask at its image's size;
- what each task feeds its UNet (conditioning.py): an unscaled source latent (posterior mode), the low-res RGB at
  latent size, the latent of the bicubic 4x upsample, or [mask, posterior sample of the masked image x scaling];
- two samplers, chosen as `generate` chooses: a single-task `t2i` / `inpaint` export with .onnx graphs runs in
  optimum's ORT pipelines (diffusers' StableDiffusion(Inpaint)Pipeline: batch [uncond, cond], guidance only when
  > 1, image in [-1, 1] as 2 x/255 - 1, one generator for the latents and then the masked image's posterior sample,
  output rounded from [0, 1]); everything else runs in this project's sampler (sample.py: batch [text, empty] for
  text guidance, [text+img, empty+img, empty+zeros] for InstructPix2Pix's two scales, latents from `seed`, the
  inpainting posterior sample from `seed + 1`, output rounded as image_processor.to_uint8);
- the noise: torch's CPU `randn` streams reproduced in numpy (noise.py).

Must not import torch, transformers or diffusers, even indirectly; onnxruntime is imported where sessions are made.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtu_export.config import TaskSpec
from mtu_export.errors import ConfigError
from mtu_export.image_processor import (
    POLICIES,
    Prepared,
    max_pixels,
    prepare_image,
    size_multiple,
    to_model_input,
    to_uint8,
    vae_factor,
)
from mtu_export.ondevice.graphs import graph_path, trim_heap
from mtu_export.ondevice.noise import TorchCompatibleGenerator
from mtu_export.ondevice.schedulers import scheduler_from_config
from mtu_export.ondevice.tokenizer import ClipTokenizer
from mtu_export.tasks import Condition, TaskDef, resolve

CUBIC_A = -0.75  # torch's bicubic kernel coefficient
logger = logging.getLogger(__name__)


# --- tasks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskPlan:
    """One task of the folder as the sampler needs it: its definition (mtu_export.tasks, torch-free) and its id."""

    task: TaskDef
    task_id: int | None  # the bundle UNet's task index; None in a single-task export

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def condition(self) -> Condition:
        return self.task.condition

    @property
    def image_guidance(self) -> bool:
        """InstructPix2Pix's two-scale guidance (edit, sr, declared tasks); t2i and inpaint guide on text only."""
        return self.task.image_guidance

    @property
    def needs(self) -> tuple[str, ...]:
        return self.task.needs

    def input_scale(self, vae_factor: int) -> int:
        return self.task.input_scale(vae_factor)


def task_plan(name: str, info: dict[str, Any], latent_channels: int) -> TaskPlan:
    """The plan of a manifest task `{task_id, in_channels}`; a ValueError for channels no sampler takes."""
    try:
        task = resolve(TaskSpec(name, info["in_channels"]), latent_channels)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return TaskPlan(task, info.get("task_id"))


# --- graphs ----------------------------------------------------------------------------------------------------

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_NUMPY_TYPES |= {"tensor(int32)": np.int32}


class Graph:
    """An onnxruntime CPU session fed numpy arrays, each cast to its input's type and (a scalar for a rank-1 input,
    as optimum unsqueezes the timestep) shape. A graph exported with `--batch 1` (batched inputs fixed at one row)
    is called once per row and its outputs stacked, as export.runtime.run_rows does."""

    def __init__(self, path: Path, threads: int | None = None, low_memory: bool = False, spinning: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if low_memory:  # tensors freed after their last use, not kept in a growing arena or a reused memory plan
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        if not spinning:  # idle threads sleep: what a benchmark timing two sessions side by side needs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def __call__(self, **feeds: Any) -> list[np.ndarray]:
        arrays = {}
        for name, value in feeds.items():
            spec = self.inputs[name]
            array = np.asarray(value).astype(_NUMPY_TYPES[spec.type], copy=False)
            arrays[name] = array.reshape(1) if array.ndim == 0 and len(spec.shape) == 1 else array
        fixed = [name for name, a in arrays.items() if self.inputs[name].shape[:1] == [1] and a.ndim and len(a) > 1]
        if not fixed:
            return self.session.run(None, arrays)
        rows = [{k: a[i : i + 1] if k in fixed else a for k, a in arrays.items()} for i in range(len(arrays[fixed[0]]))]
        calls = [self.session.run(None, row) for row in rows]
        return [np.concatenate(parts) for parts in zip(*calls, strict=True)]


@dataclass(frozen=True)
class Posterior:
    """The VAE's diagonal Gaussian as diffusers' DiagonalGaussianDistribution makes it from the encoder's moments."""

    mean: np.ndarray  # (B, L, h, w)
    std: np.ndarray  # (B, L, h, w)

    @classmethod
    def from_moments(cls, moments: np.ndarray) -> Posterior:
        mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)  # mean and logvar stacked on channels
        return cls(mean, np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0)))

    def sample(self, generator: TorchCompatibleGenerator) -> np.ndarray:
        return self.mean + self.std * generator.randn(self.mean.shape)


# --- resampling as torch's F.interpolate -----------------------------------------------------------------------


def _cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 weights of torch's bicubic (A = -0.75, align_corners=False, edge indices clamped)."""
    real = np.float32(in_size / out_size) * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    t = real - base
    a = np.float32(CUBIC_A)

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    for k, weight in enumerate(weights):
        np.add.at(matrix, (rows, np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)), weight)
    return matrix


def resize_bicubic(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, H, W) float32 -> (B, C, *size) as `F.interpolate(mode="bicubic", align_corners=False)`."""
    rows, cols = _cubic_matrix(images.shape[2], size[0]), _cubic_matrix(images.shape[3], size[1])
    return np.einsum("ih,bchw,jw->bcij", rows, images, cols, optimize=True).astype(np.float32)


def resize_nearest(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, H, W) -> (B, C, *size) as `F.interpolate(mode="nearest")`: source index floor(i * in / out)."""

    def index(in_size: int, out_size: int) -> np.ndarray:
        scaled = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
        return np.minimum(np.floor(scaled).astype(np.int64), in_size - 1)

    return images[:, :, index(images.shape[2], size[0])][:, :, :, index(images.shape[3], size[1])]


# --- the request's images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What the folder's configs say about sizes (generate._geometry)."""

    pixels: int  # the export's square image size
    factor: int  # the VAE's downsampling factor
    multiple: int  # output sides are multiples of this
    latent_channels: int
    scaling_factor: float


@dataclass(frozen=True)
class Inputs:
    """A request's images, prepared as `generate` prepares them."""

    size: tuple[int, int]  # output (height, width)
    image: np.ndarray | None = None  # uint8 (h, w, 3): edit's source, sr's low-res input, inpaint's image
    mask: np.ndarray | None = None  # bool (H, W), True = hole


def _prepare(
    picture: Image.Image,
    policy: str,
    multiple: int,
    size: tuple[int, int] | None,
    mask: bool = False,
    cap: int | None = None,
) -> Prepared:
    prepared = prepare_image(picture, policy, multiple, size, mask=mask, max_pixels=cap)
    note = prepared.note("the mask" if mask else "the image")
    if note:
        logger.info(note)
    return prepared


def prepare_inputs(
    plan: TaskPlan,
    geometry: Geometry,
    image: Image.Image | None,
    mask: Image.Image | None,
    resize: str,
) -> Inputs:
    """generate._inputs: the input at its own size fitted to what the UNet takes (within image_processor's area
    cap) or cropped to the export's size; sr's low-res input at 1/scale of that; a mask at its image's size."""
    if not plan.needs:
        return Inputs((geometry.pixels, geometry.pixels))
    if plan.condition.masked and mask.size != image.size:  # refused before any note on the image
        raise ValueError(
            f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}; "
            "pass a mask of its image's size"
        )
    scale = plan.input_scale(geometry.factor)
    side = geometry.pixels // scale
    cap = max_pixels((geometry.pixels, geometry.pixels), scale)
    crop_to = (side, side) if resize == "crop" else None
    prepared = _prepare(image, resize, geometry.multiple // scale, crop_to, cap=cap)
    width, height = prepared.size
    if not plan.condition.masked:
        return Inputs((height * scale, width * scale), prepared.array)
    hole = _prepare(mask, resize, geometry.multiple, prepared.size, mask=True)
    return Inputs((height, width), prepared.array, hole.array)


# --- guidance --------------------------------------------------------------------------------------------------

Combine = Callable[[np.ndarray], np.ndarray]


def text_guidance(scale: float, cond_first: bool) -> Combine:
    """eps(none) + s (eps(text) - eps(none)) over a batch [text, none] (ours) or [none, text] (diffusers')."""

    def combine(output: np.ndarray) -> np.ndarray:
        full, none = np.split(output, 2) if cond_first else np.split(output, 2)[::-1]
        return none + np.float32(scale) * (full - none)

    return combine


def two_scale_guidance(text_scale: float, image_scale: float) -> Combine:
    """InstructPix2Pix over a batch [text+img, empty+img, empty+zeros] (sample.guided_loop)."""

    def combine(output: np.ndarray) -> np.ndarray:
        full, image_only, none = np.split(output, 3)
        return none + np.float32(image_scale) * (image_only - none) + np.float32(text_scale) * (full - image_only)

    return combine


# --- the pipeline ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} is missing; pass a folder written by `mtu-export onnx`")
    return json.loads(path.read_text(encoding="utf-8"))


class OnDevicePipeline:
    """An `mtu-export onnx` folder, sampled without torch. Graphs are opened on first use (t2i never opens the VAE
    encoder). `pipeline(prompt, task=..., image=..., mask=...)` returns uint8 (H, W, 3).

    `low_memory=True` is for a phone's budget (Apple's `reduceMemory`): each graph is opened for its stage and closed
    after it (text encoder, VAE encoder, UNet, VAE decoder: one in memory at a time), without onnxruntime's memory
    arena. Same images; slower per request, since every request opens the graphs again. `spinning=False` lets idle
    onnxruntime threads sleep (for timing two pipelines side by side)."""

    def __init__(self, folder: Path, threads: int | None = None, low_memory: bool = False, spinning: bool = True):
        self.folder, self.threads, self.low_memory, self.spinning = Path(folder), threads, low_memory, spinning
        if not (self.folder / "manifest.json").is_file():
            raise ValueError(f"{self.folder} is not an `mtu-export onnx` folder (no manifest.json); export it first")
        self.manifest = _read_json(self.folder / "manifest.json")
        unet_config = _read_json(self.folder / "unet" / "config.json")
        vae_config = _read_json(self.folder / "vae_decoder" / "config.json")
        factor = vae_factor(vae_config["block_out_channels"])
        sample_size = unet_config.get("sample_size") or 64
        sample_size = sample_size[0] if isinstance(sample_size, list) else sample_size
        self.geometry = Geometry(
            pixels=sample_size * factor,
            factor=factor,
            multiple=size_multiple(factor, len(unet_config["block_out_channels"]) - 1),
            latent_channels=unet_config["out_channels"],
            scaling_factor=float(vae_config["scaling_factor"]),
        )
        self.tasks = {
            name: task_plan(name, info, unet_config["out_channels"]) for name, info in self.manifest["tasks"].items()
        }
        self.scheduler_config = _read_json(self.folder / "scheduler" / "scheduler_config.json")
        scheduler_from_config(self.scheduler_config)  # refuse an unsupported scheduler now, not mid-request
        self.tokenizer = ClipTokenizer.from_folder(self.folder / "tokenizer")
        self._graphs: dict[str, Graph] = {}

    @classmethod
    def from_folder(
        cls, folder: Path | str, threads: int | None = None, low_memory: bool = False, spinning: bool = True
    ) -> OnDevicePipeline:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return cls(Path(folder), threads, low_memory, spinning)

    def graph(self, component: str) -> Graph:
        if component not in self._graphs:
            path = graph_path(self.folder / component)
            self._graphs[component] = Graph(path, self.threads, self.low_memory, self.spinning)
        return self._graphs[component]

    def _done_with(self, *components: str) -> None:
        """In low-memory mode, close these graphs (a stage is over) and hand their memory back to the OS."""
        if not self.low_memory:
            return
        for component in components:
            self._graphs.pop(component, None)
        trim_heap()

    def runs_optimum(self, plan: TaskPlan) -> bool:
        """Whether `generate` runs this task in optimum's pipelines, which load .onnx graphs (not .ort) and call them
        with whole batches (not the one-row graphs of `--batch 1`)."""
        single = self.manifest.get("kind") == "task" and plan.task.optimum_pipeline is not None
        batch_one = self.manifest.get("export", {}).get("batch") is not None
        return single and not batch_one and (self.folder / "unet" / "model.onnx").is_file()

    # --- the request ---

    def _plan(self, task: str | None) -> TaskPlan:
        known = ", ".join(self.tasks)
        if task is None:
            if len(self.tasks) != 1:
                raise ValueError(f"{self.folder} holds several tasks ({known}); pass task= one of them")
            return next(iter(self.tasks.values()))
        if task not in self.tasks:
            close = difflib.get_close_matches(task, list(self.tasks), n=1)
            hint = f" -- did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown task {task!r}; {self.folder} was exported for {known}{hint}")
        return self.tasks[task]

    def __call__(
        self,
        prompt: str,
        task: str | None = None,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        steps: int = 25,
        guidance: float = 3.0,
        image_guidance: float = 1.5,
        seed: int = 0,
        resize: str = "fit",
        optimum: bool = True,
    ) -> np.ndarray:
        """uint8 (H, W, 3): what `mtu-export generate` writes for the same request (`optimum=False`: as
        `--no-optimum`, our sampler for single-task t2i / inpaint exports too). A resized input is noted in a log line
        (logger `mtu_export.ondevice.pipeline`)."""
        plan = self._plan(task)
        if resize not in POLICIES:
            raise ValueError(f"resize {resize!r} is not a policy; choose one of {', '.join(POLICIES)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        given = {"image": image, "mask": mask}
        for needed in plan.needs:
            if given[needed] is None:
                raise ValueError(f"task {plan.name!r} needs an input {needed}; pass {needed}= a PIL image")
        inputs = prepare_inputs(plan, self.geometry, image, mask, resize)
        if optimum and self.runs_optimum(plan):
            return self._optimum(plan, inputs, prompt, steps, guidance, seed)
        return self._own(plan, inputs, prompt, steps, guidance, image_guidance, seed)

    # --- pieces ---

    def _embed(self, prompt: str) -> np.ndarray:
        (hidden, *_) = self.graph("text_encoder")(input_ids=self.tokenizer.encode([prompt]))
        return hidden.astype(np.float32)  # (1, L, D)

    def _posterior(self, images: np.ndarray) -> Posterior:
        (moments,) = self.graph("vae_encoder")(sample=images)
        return Posterior.from_moments(moments)

    def _latent_shape(self, inputs: Inputs) -> tuple[int, int, int, int]:
        height, width = inputs.size
        return (1, self.geometry.latent_channels, height // self.geometry.factor, width // self.geometry.factor)

    def _unet(self, plan: TaskPlan) -> Callable[[np.ndarray, Any, np.ndarray], np.ndarray]:
        """(sample, timestep, encoder_hidden_states) -> model output, as OrtUNet feeds the graph: the bundle's sample
        zero-padded to its input width, with the task's id."""
        graph, width = self.graph("unet"), self.manifest.get("unet_input_channels", 0)

        def denoise(sample: np.ndarray, timestep: Any, hidden: np.ndarray) -> np.ndarray:
            feeds = {"sample": sample, "timestep": np.asarray(timestep), "encoder_hidden_states": hidden}
            if plan.task_id is not None:
                pad = np.zeros((sample.shape[0], width - sample.shape[1], *sample.shape[2:]), np.float32)
                feeds["sample"] = np.concatenate([sample, pad], axis=1)
                feeds["task_id"] = np.asarray(plan.task_id, np.int64)
            (out,) = graph(**feeds)
            return out.astype(np.float32)

        return denoise

    def _loop(
        self,
        plan: TaskPlan,
        latents: np.ndarray,  # (1, L, h, w), already scaled by init_noise_sigma
        hidden: np.ndarray,  # (k, L, D): one row per guidance branch
        condition: np.ndarray | None,  # (k, C, h, w) the task's channels per branch
        combine: Combine,
        scheduler: Any,  # set to its timesteps
    ) -> np.ndarray:
        """The denoising loop both samplers share: scale, append the condition, denoise every branch, guide, step."""
        denoise = self._unet(plan)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(np.concatenate([latents] * hidden.shape[0]), t)
            x = x if condition is None else np.concatenate([x, condition], axis=1)
            latents = scheduler.step(combine(denoise(x, t, hidden)), t, latents).prev_sample
        return latents

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        (image,) = self.graph("vae_decoder")(latent_sample=latents / np.float32(self.geometry.scaling_factor))
        return image.astype(np.float32)  # (1, 3, H, W) in about [-1, 1]

    # --- this project's sampler (sample.py) ---

    def _condition(self, plan: TaskPlan, inputs: Inputs, generator: TorchCompatibleGenerator) -> np.ndarray | None:
        """conditioning.encode_batch + task_condition: the parts of the task's condition in order, (1, C, h, w), or
        None for a task without an image input."""
        built = [getattr(self, f"_part_{part}")(inputs, generator) for part in plan.condition.parts]
        return np.concatenate(built, axis=1) if built else None

    def _part_image(self, inputs: Inputs, generator: TorchCompatibleGenerator) -> np.ndarray:
        return to_model_input([inputs.image])  # (1, 3, h, w) in [-1, 1], at latent resolution

    def _part_image_latent(self, inputs: Inputs, generator: TorchCompatibleGenerator) -> np.ndarray:
        image = to_model_input([inputs.image])
        if image.shape[-2:] != tuple(inputs.size):  # a low-res input: upsampled to the output's size first
            image = np.clip(resize_bicubic(image, inputs.size), -1, 1)
        return self._posterior(image).mean  # the mode, unscaled

    def _part_mask(self, inputs: Inputs, generator: TorchCompatibleGenerator) -> np.ndarray:
        mask = inputs.mask[None, None].astype(np.float32)  # (1, 1, H, W), 1 = hole
        latent = (inputs.size[0] // self.geometry.factor, inputs.size[1] // self.geometry.factor)
        return resize_nearest(mask, latent)

    def _part_masked_latent(self, inputs: Inputs, generator: TorchCompatibleGenerator) -> np.ndarray:
        mask = inputs.mask[None, None].astype(np.float32)
        posterior = self._posterior(to_model_input([inputs.image]) * (mask < 0.5))  # the hole is 0 (mid-grey)
        return posterior.sample(generator) * self._scaling

    def _own(self, plan, inputs: Inputs, prompt: str, steps: int, guidance: float, image_guidance: float, seed: int):
        condition = self._condition(plan, inputs, TorchCompatibleGenerator(seed + 1))
        self._done_with("vae_encoder")
        text, empty = self._embed(prompt), self._embed("")
        self._done_with("text_encoder")
        scheduler = scheduler_from_config(self.scheduler_config)
        latents = TorchCompatibleGenerator(seed).randn(self._latent_shape(inputs))
        latents = latents * np.float32(scheduler.init_noise_sigma)
        scheduler.set_timesteps(steps)
        if plan.image_guidance:
            hidden = np.concatenate([text, empty, empty])
            branches = np.concatenate([condition, condition, np.zeros_like(condition)])
            combine = two_scale_guidance(guidance, image_guidance)
        else:
            hidden = np.concatenate([text, empty])
            branches = None if condition is None else np.concatenate([condition, condition])
            combine = text_guidance(guidance, cond_first=True)
        latents = self._loop(plan, latents, hidden, branches, combine, scheduler)
        self._done_with("unet")
        decoded = self._decode(latents)
        self._done_with("vae_decoder")
        return to_uint8(decoded)[0]

    # --- optimum's ORT pipelines (diffusers' StableDiffusionPipeline / StableDiffusionInpaintPipeline) ---

    def _optimum(self, plan: TaskPlan, inputs: Inputs, prompt: str, steps: int, guidance: float, seed: int):
        generator = TorchCompatibleGenerator(seed)  # one stream: latents, then the masked image's posterior sample
        guided = guidance > 1.0  # diffusers' do_classifier_free_guidance
        hidden = np.concatenate([self._embed(""), self._embed(prompt)]) if guided else self._embed(prompt)
        self._done_with("text_encoder")
        scheduler = scheduler_from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = generator.randn(self._latent_shape(inputs)) * np.float32(scheduler.init_noise_sigma)
        condition = None
        if plan.condition.masked:
            image = (inputs.image.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]  # (1, 3, H, W)
            image = np.float32(2.0) * image - np.float32(1.0)  # VaeImageProcessor.normalize
            mask = inputs.mask[None, None].astype(np.float32)  # binarised already: {0, 1}
            masked = self._posterior(image * (mask < 0.5)).sample(generator)
            condition = np.concatenate([resize_nearest(mask, latents.shape[-2:]), masked * self._scaling], axis=1)
            condition = np.concatenate([condition] * hidden.shape[0])
            self._done_with("vae_encoder")
        combine = text_guidance(guidance, cond_first=False) if guided else (lambda output: output)
        latents = self._loop(plan, latents, hidden, condition, combine, scheduler)
        self._done_with("unet")
        decoded = self._decode(latents)
        self._done_with("vae_decoder")
        unit = np.clip(decoded * np.float32(0.5) + np.float32(0.5), 0, 1)  # VaeImageProcessor.postprocess("np")
        return np.round(unit.transpose(0, 2, 3, 1)[0] * np.float32(255)).astype(np.uint8)  # generate._optimum

    @property
    def _scaling(self) -> np.float32:
        return np.float32(self.geometry.scaling_factor)
