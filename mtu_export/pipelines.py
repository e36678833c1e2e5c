"""Diffusers pipeline classes for the folders stock diffusers and optimum cannot run, and the writer that ships them.

- `MTUSuperResolutionPipeline`: a folded `sr` pipeline (torch): the low-res image as `sr` was trained on it
  (`low_res_rgb`: the RGB image at latent resolution, L + 3 UNet channels; `low_res_latent`: the VAE latent of its
  bicubic upsample to 4x, 2L channels), sampled with InstructPix2Pix's text + image guidance.
- `MTUOnnxPipeline`: an ONNX export in optimum's layout whose UNet no optimum pipeline runs: the all-task bundle (its
  UNet takes a `task_id` and a sample zero-padded to the widest task's channels) and a single-task `sr` export.

Input images go through mtu-export's image processor (image_processor.py) with `resize_mode`: `fit` (default) keeps
each image's size and aspect, its sides rounded to what the UNet takes (a multiple of the VAE factor x 2 ** the UNet's
down-samplings), so the output has the input's shape (sr: 4x its sides); `crop` resizes the shorter side and
centre-crops to the model's square size, as training does.

This file is copied verbatim into every folder it labels, as `pipeline_mtu.py`, beside a copy of image_processor.py,
and `model_index.json` names it (`"_class_name": ["pipeline_mtu", "<class>"]`), diffusers' custom-pipeline mechanism
for a local folder: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads both without mtu-export
installed. So it imports only numpy, PIL, torch, diffusers (onnxruntime through diffusers' `OnnxRuntimeModel`) and its
sibling image processor, never the package; the conditioning and guidance below restate conditioning.py and
sample.py, and the tests hold both to the same images.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, OnnxRuntimeModel, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .image_processor import (
    POLICIES,
    fit_size,
    max_pixels,
    prepare_image,
    size_multiple,
    to_model_input,
    vae_factor,
)

MODULE = "pipeline_mtu"  # the file's name (without .py) in every folder it labels
IMAGE_PROCESSOR = "image_processor.py"  # its sibling, copied beside it
SR_SCALE = 4  # super-resolution factor of the latent convention (mtu_export.tasks.SR_SCALE)

Images = PIL.Image.Image | list[PIL.Image.Image] | None
logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------- shared by both classes
def _pictures(images: Images) -> list[PIL.Image.Image]:
    if images is None:
        return []
    return list(images) if isinstance(images, list) else [images]


def _prepare(
    images: Images, masks: Images, policy: str, multiple: int, size: tuple[int, int] | None, cap: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (uint8 (H, W, 3)) and masks (bool (H, W), True = hole) through the image processor: all at the first
    image's prepared size (`fit`: within `cap` pixels); a mask must have its image's size."""
    if policy not in POLICIES:
        raise ValueError(f"resize_mode {policy!r} is not one of {', '.join(map(repr, POLICIES))}")
    pictures, holes = _pictures(images), _pictures(masks)
    if not pictures:
        return [], []
    first = prepare_image(pictures[0], policy, multiple, size, max_pixels=cap)
    size = first.size
    if first.changed:
        logger.warning(first.note("the image"))
    for hole in holes:
        if hole.size != first.original:
            raise ValueError(f"mask_image is {hole.size[0]}x{hole.size[1]}, the image {first.original[0]}x"
                             f"{first.original[1]}; pass a mask of its image's size")  # fmt: skip
    prepared = [first.array] + [prepare_image(p, policy, multiple, size).array for p in pictures[1:]]
    return prepared, [prepare_image(h, policy, multiple, size, mask=True).array for h in holes]


def _image_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(to_model_input(images))


def _batch(prompt: str | list[str], images: list[np.ndarray]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if images and len(prompts) == 1:
        prompts = prompts * len(images)
    if images and len(images) not in (1, len(prompts)):
        raise ValueError(f"got {len(prompts)} prompts and {len(images)} images; pass one image or one per prompt")
    return prompts


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """As StableDiffusionPipeline makes them: padded to the model's length, no attention mask."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, L)


def _condition(
    parts: list[str],
    encode: Callable[[torch.Tensor], DiagonalGaussianDistribution],
    images: list[np.ndarray],
    masks: list[np.ndarray],
    size: tuple[int, int],  # (H, W) of the output image
    factor: int,  # the VAE's: output pixels per latent pixel
    scaling: float,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """The task's extra UNet channels, (B, C, h, w): its condition's parts in order, each built as conditioning.py
    builds it (mtu_export.tasks.PARTS); None for a task without an image input."""
    built = []
    for part in parts:
        image = _image_tensor(images)
        if part == "image":  # the input itself, at latent resolution
            built.append(image)
        elif part == "image_latent":  # the input's latent, posterior mode, unscaled (as InstructPix2Pix)
            if tuple(image.shape[-2:]) != tuple(size):
                image = F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
            built.append(encode(image).mode())
        elif part == "mask":  # (B, 1, h, w), 1 = hole, nearest-resized to the latent
            mask = torch.from_numpy(np.stack(masks)).float()[:, None]
            built.append(F.interpolate(mask, size=(size[0] // factor, size[1] // factor)))
        elif part == "masked_latent":  # the masked image (the hole is 0, mid-gray) as a scaled posterior sample
            mask = torch.from_numpy(np.stack(masks)).float()[:, None]
            hole = encode(image * (mask < 0.5))
            noise = torch.randn(hole.mean.shape, generator=generator, dtype=torch.float32)
            built.append((hole.mean.float() + hole.std.float() * noise) * scaling)
        else:
            raise ValueError(f"this pipeline cannot build a condition part {part!r}; update pipeline_mtu.py")
    return torch.cat(built, dim=1) if built else None


def _input_scale(scale: int | None, factor: int) -> int:
    """Output pixels per input-image pixel (tasks.Condition.input_scale): None means the VAE's factor."""
    return factor if scale is None else scale


def _condition_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """mtu-export draws an inpainting condition's posterior sample from the seed after the latents' seed."""
    return None if generator is None else torch.Generator().manual_seed(generator.initial_seed() + 1)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")


class _GuidedSampling:
    """The sampling loop of sample.py; each pipeline gives its text encoder (`_embed`) and its denoiser."""

    def _embed(self, prompts: list[str]) -> torch.Tensor:  # (B, L, D)
        raise NotImplementedError

    @torch.no_grad()
    def _sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        prompts: list[str],
        condition: torch.Tensor | None,  # (B, C, h, w)
        shape: tuple[int, ...],  # (B, L, h, w)
        two_scale: bool,
        steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Guided sampling as sample.guided_loop; returns scaled latents (B, L, h, w)."""
        scheduler = self.scheduler
        text, empty = self._embed(prompts), self._embed([""] * len(prompts))
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=device)
        copies = 3 if two_scale else 2
        if two_scale:
            hidden = torch.cat([text, empty, empty])
            cond = torch.cat([condition, condition, torch.zeros_like(condition)])
        else:
            hidden = torch.cat([text, empty])
            cond = None if condition is None else torch.cat([condition, condition])
        for t in self.progress_bar(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents] * copies), t)
            x = x if cond is None else torch.cat([x, cond.to(x.device)], dim=1)
            model_output = denoise(x, t.expand(x.shape[0]), hidden)  # ε, v or x0: what the scheduler expects
            if two_scale:
                full, image_only, none = model_output.chunk(3)
                guided = none + image_guidance_scale * (image_only - none) + guidance_scale * (full - image_only)
            else:
                full, none = model_output.chunk(2)
                guided = none + guidance_scale * (full - none)
            latents = scheduler.step(guided, t, latents).prev_sample
        return latents

    @staticmethod
    def _output(decoded: torch.Tensor, latents: torch.Tensor, output_type: str, return_dict: bool):
        """(B, 3, H, W) in [-1, 1] -> PIL (uint8 exactly as mtu-export rounds), np / pt in [0, 1], or latents."""
        if output_type == "latent":
            images = latents
        elif output_type == "pil":
            pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            images = [PIL.Image.fromarray(p) for p in pixels]
        else:
            images = (decoded.clamp(-1, 1) + 1) / 2
            images = images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# --------------------------------------------------------------------------------------------- the torch sr pipeline
class MTUSuperResolutionPipeline(_GuidedSampling, DiffusionPipeline):
    """Super-resolution with a folded mtu-export `sr` UNet: `pipe(prompt, image=low_res).images[0]`.

    The output is 4x the low-res image (with the RGB convention: the VAE's factor, which is 4). Two-scale guidance:
    ε = ε(∅, ∅) + image_guidance_scale·(ε(∅, img) − ε(∅, ∅)) + guidance_scale·(ε(text, img) − ε(∅, img)).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler,
        condition: dict | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(condition=condition)

    @property
    def condition(self) -> tuple[list[str], int | None]:
        """The condition's parts and input scale: as the folder's config records them (mtu_export.tasks.Condition),
        else `sr`'s two conventions told apart by the UNet's channels."""
        recorded = self.config.get("condition")
        if recorded:
            return recorded["parts"], recorded["input_scale"]
        latent, channels = self.unet.config.out_channels, self.unet.config.in_channels
        if channels == latent + 3:
            return ["image"], None
        if channels == 2 * latent:
            return ["image_latent"], SR_SCALE
        raise ValueError(f"this UNet takes {channels} input channels; an sr UNet takes {latent + 3} or {2 * latent}")

    @property
    def vae_scale_factor(self) -> int:
        return vae_factor(self.vae.config.block_out_channels)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = _token_ids(self.tokenizer, prompts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0].float()

    def _encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.vae.encode(image.to(self.vae.device, self.vae.dtype)).latent_dist

    def _denoise(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(sample.to(dtype), timestep, hidden.to(dtype)).sample.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Images,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        resize_mode: str = "fit",
    ):
        """`image`: the low-res image(s) (PIL); the output has 4x its sides. `resize_mode`: see the module."""
        _check_output_type(output_type)
        (parts, input_scale), factor = self.condition, self.vae_scale_factor
        scale = _input_scale(input_scale, factor)
        multiple = size_multiple(factor, self.unet.num_upsamplers) // scale
        model = self.unet.config.sample_size * factor
        side, cap = model // scale, max_pixels((model, model), scale)
        images, _ = _prepare(image, None, resize_mode, multiple, (side, side) if resize_mode == "crop" else None, cap)
        if not images:
            raise ValueError("sr needs `image`, the low-res image to upscale")
        prompts = _batch(prompt, images)
        images = images * len(prompts) if len(images) == 1 else images
        height, width = images[0].shape[:2]
        size = (height * scale, width * scale)
        latent_size = (size[0] // factor, size[1] // factor)
        scaling = self.vae.config.scaling_factor
        device = self._execution_device
        condition = _condition(parts, self._encode, images, [], size, factor, scaling, None).float().to(device)
        shape = (len(prompts), self.unet.config.out_channels, *latent_size)
        latents = self._sample(
            self._denoise, prompts, condition, shape, True, num_inference_steps, guidance_scale, image_guidance_scale,
            generator, device,
        )  # fmt: skip
        decoded = None
        if output_type != "latent":
            decoded = self.vae.decode((latents / scaling).to(self.vae.dtype)).sample.float()
        return self._output(decoded, latents, output_type, return_dict)


# ------------------------------------------------------------------------------------------ the ONNX folder pipeline
_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _run(model: OnnxRuntimeModel, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run a graph on torch feeds cast to its input types (as optimum does); a graph exported with `--batch 1` (its
    batched inputs fixed at one row) once per row, outputs stacked (mtu_export.export.runtime.run_rows)."""
    inputs = model.model.get_inputs()
    types = {i.name: i.type for i in inputs}
    arrays = {k: v.detach().cpu().numpy().astype(_NUMPY[types[k]], copy=False) for k, v in feeds.items()}
    fixed = {i.name for i in inputs if i.shape and i.shape[0] == 1}
    batched = [k for k in fixed if arrays[k].ndim and arrays[k].shape[0] > 1]
    if not batched:
        return model(**arrays)
    calls = [model(**{k: v[i : i + 1] if k in batched else v for k, v in arrays.items()})
             for i in range(arrays[batched[0]].shape[0])]  # fmt: skip
    return [np.concatenate(parts) for parts in zip(*calls, strict=True)]


class MTUOnnxPipeline(_GuidedSampling, DiffusionPipeline):
    """The tasks of an mtu-export ONNX folder on onnxruntime: `pipe(prompt, task="edit", image=source).images[0]`.

    `tasks` (model_index.json) holds, per task, its `task_id` in an all-task bundle's UNet (None in a single-task
    export), its condition (mtu_export.tasks.Condition: its `condition` name, the `parts` built from the inputs in
    channel order and its `input_scale`) and whether it is guided on the image too (`image_guidance`, as
    InstructPix2Pix); a bundle's UNet reads every task's sample zero-padded to its own input channels. Inputs by
    condition: `image` (edit: the source; sr: the low-res image, the output has 4x its sides; inpaint: the image to
    repaint) and `mask_image` (inpaint; white = repaint); t2i takes `height` / `width` (default: the export's size).
    """

    def __init__(
        self,
        vae_encoder: OnnxRuntimeModel,
        vae_decoder: OnnxRuntimeModel,
        text_encoder: OnnxRuntimeModel,
        tokenizer,
        unet: OnnxRuntimeModel,
        scheduler,
        tasks: dict | None = None,
        scaling_factor: float = 0.18215,
        vae_scale_factor: int = 8,
        sample_size: int = 64,
        size_multiple: int | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae_encoder=vae_encoder,
            vae_decoder=vae_decoder,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
        self.register_to_config(
            tasks=tasks or {}, scaling_factor=scaling_factor, vae_scale_factor=vae_scale_factor,
            sample_size=sample_size, size_multiple=size_multiple,
        )  # fmt: skip

    def _task(self, task: str | None) -> tuple[str, dict]:
        known = self.config.tasks
        if task is None and len(known) == 1:
            task = next(iter(known))
        if task not in known:
            found = "no task" if task is None else f"task {task!r}"
            raise ValueError(f"this folder runs the tasks {', '.join(known)}; got {found}: pass task=one of those")
        return task, known[task]

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        hidden = _run(self.text_encoder, {"input_ids": _token_ids(self.tokenizer, prompts)})[0]
        return torch.from_numpy(hidden).float()

    def _encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        (moments,) = _run(self.vae_encoder, {"sample": image})
        return DiagonalGaussianDistribution(torch.from_numpy(moments).float())

    def _denoiser(self, task_id: int | None):
        channels = next(i.shape[1] for i in self.unet.model.get_inputs() if i.name == "sample")  # (B, C, h, w)

        def denoise(sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            feeds = {"sample": sample, "timestep": timestep.reshape(-1)[0].float(), "encoder_hidden_states": hidden}
            if task_id is not None:  # the bundle: the task's channels, then zeros
                feeds["sample"] = F.pad(
                    sample, (0, 0, 0, 0, 0, channels - sample.shape[1])
                )  # as bundle.pad_to_channels
                feeds["task_id"] = torch.tensor(task_id, dtype=torch.int64)
            return torch.from_numpy(_run(self.unet, feeds)[0]).float()

        return denoise

    @property
    def _multiple(self) -> int:
        """Output sides must be multiples of this (folders from before it was recorded: the VAE's factor)."""
        return self.config.get("size_multiple") or self.config.vae_scale_factor

    def _t2i_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.config.sample_size * self.config.vae_scale_factor
        size = (height or default, width or default)
        multiple = self._multiple
        if size[0] % multiple or size[1] % multiple:
            w, h = fit_size(size[1], size[0], multiple)
            raise ValueError(
                f"height {size[0]} and width {size[1]} must be multiples of {multiple} (the VAE's factor x 2 ** the "
                f"UNet's down-samplings); the nearest are height={h}, width={w}"
            )
        return size

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        task: str | None = None,
        image: Images = None,
        mask_image: Images = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        resize_mode: str = "fit",
    ):
        _check_output_type(output_type)
        task, spec = self._task(task)
        parts = spec["parts"]
        needed = {"image": bool(parts), "mask_image": "mask" in parts}
        for name, given in (("image", image), ("mask_image", mask_image)):
            if (given is not None) != needed[name]:
                raise ValueError(f"task {task!r} {'needs' if needed[name] else 'takes no'} `{name}`")
        if parts and (height is not None or width is not None):
            raise ValueError(
                f"height and width are for text-to-image; a {spec['condition']} task takes its size from `image`"
            )
        factor = self.config.vae_scale_factor
        scale = _input_scale(spec["input_scale"], factor)
        model = self.config.sample_size * factor
        side, cap = model // scale, max_pixels((model, model), scale)
        crop = (side, side) if resize_mode == "crop" else None
        images, masks = _prepare(image, mask_image, resize_mode, self._multiple // scale, crop, cap)
        prompts = _batch(prompt, images)
        images, masks = [x * len(prompts) if len(x) == 1 else x for x in (images, masks)]
        if images:
            size = (images[0].shape[0] * scale, images[0].shape[1] * scale)
        else:
            size = self._t2i_size(height, width)
        latent_size = (size[0] // factor, size[1] // factor)
        scaling = self.config.scaling_factor
        condition = _condition(
            parts, self._encode, images, masks, size, factor, scaling, _condition_generator(generator)
        )
        channels = self.unet.model.get_outputs()[0].shape[1]
        latents = self._sample(
            self._denoiser(spec["task_id"]), prompts, condition, (len(prompts), channels, *latent_size),
            spec["image_guidance"], num_inference_steps, guidance_scale, image_guidance_scale, generator,
            torch.device("cpu"),
        )  # fmt: skip
        decoded = None
        if output_type != "latent":
            decoded = torch.from_numpy(_run(self.vae_decoder, {"latent_sample": latents / scaling})[0]).float()
        return self._output(decoded, latents, output_type, return_dict)


# ----------------------------------------------------------------------------------------------------- the writer
SHIPPED = {"MTUSuperResolutionPipeline": MTUSuperResolutionPipeline, "MTUOnnxPipeline": MTUOnnxPipeline}
ONNX_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")  # graphs, loaded as OnnxRuntimeModel


def ship(folder: Path, index: dict, class_name: str, **config) -> dict:
    """Copy this file into `folder` and return the pipeline's `index` (model_index.json) labelled with the shipped
    `class_name`: its components and `config` entries, nothing its constructor does not take."""
    accepted = set(inspect.signature(SHIPPED[class_name].__init__).parameters) - {"self"}
    kept = {k: v for k, v in {**index, **config}.items() if k in accepted or (k.startswith("_") and k != "_class_name")}
    shutil.copyfile(Path(__file__), Path(folder) / f"{MODULE}.py")
    shutil.copyfile(Path(__file__).with_name(IMAGE_PROCESSOR), Path(folder) / IMAGE_PROCESSOR)
    return {"_class_name": [MODULE, class_name], **kept}


def onnx_components() -> dict[str, list[str]]:
    """model_index.json entries of an ONNX folder's graphs, as diffusers loads them."""
    return {name: ["diffusers", "OnnxRuntimeModel"] for name in ONNX_COMPONENTS}
