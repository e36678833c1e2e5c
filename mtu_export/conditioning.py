"""What each task feeds its UNet besides the noisy latent, built exactly as the diffusers pipelines build it, so a
folded task runs in the stock pipeline it mirrors. The task's condition (`tasks.Condition`) lists its parts, each
built here by one recipe (tasks.PARTS):

- `image`          the input image in [-1, 1] at latent resolution (as SD's x4 upscaler)
- `image_latent`   the latent (posterior mode, *unscaled*) of the input image, bicubic-upsampled first when it is
                   smaller than the output (StableDiffusionInstructPix2PixPipeline's source latent); zeros when the
                   image is dropped
- `mask`           the mask (1 = hole) resized to the latent (nearest)
- `masked_latent`  the latent of the image with the hole set to 0 in [-1, 1], posterior sample × scaling factor
                   (StableDiffusionInpaintPipeline's)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtu_export.errors import ConfigError
from mtu_export.example import Example
from mtu_export.image_processor import to_model_input
from mtu_export.tasks import TaskDef


def image_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the VAE's input range (image_processor's)."""
    return torch.from_numpy(to_model_input(images))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of `image_tensor`: (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def mask_tensor(masks: list[np.ndarray]) -> torch.Tensor:
    """bool (H, W) masks, True = hole -> float (B, 1, H, W) in {0, 1}."""
    return torch.from_numpy(np.stack(masks)).float()[:, None]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline makes them: padded to the model's length, no attention mask."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, L)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting pipeline's masked image: the hole is 0 (mid-gray) in [-1, 1] space."""
    return image * (mask < 0.5)


@torch.no_grad()
def encode_batch(task: TaskDef, vae, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Everything random-free the task needs from the VAE for a batch (cacheable): the target's posterior mean /
    std and, per part of its condition, what the part is built from (`image`: the input; `image_latent`: its
    latent's mode; `mask`: the mask at latent size; `masked_latent`: the masked image's posterior mean / std)."""
    device, dtype = vae.device, vae.dtype
    target = vae.encode(image_tensor([e.target for e in examples]).to(device, dtype)).latent_dist
    out = {"target_mean": target.mean, "target_std": target.std}  # (B, 4, h, w)
    inputs = [e.target if task.condition.masked else e.input for e in examples]
    for part in task.condition.parts:
        out |= _ENCODERS[part](task, vae, image_tensor(inputs).to(device, dtype), examples, target.mean.shape)
    return out


def _image(task: TaskDef, vae, image: torch.Tensor, examples: list[Example], latent_shape) -> dict:
    if image.shape[-2:] != latent_shape[-2:]:
        raise ConfigError(
            f"{task.name} feeds the {tuple(image.shape[-2:])} input image at latent resolution, but this VAE makes "
            f"{tuple(latent_shape[-2:])} latents; upcycle {task.name} with the latent convention "
            f"({2 * latent_shape[1]} channels)"
        )
    return {"image": image}  # (B, 3, h, w)


def _image_latent(task: TaskDef, vae, image: torch.Tensor, examples: list[Example], latent_shape) -> dict:
    size = examples[0].target.shape[:2]
    if tuple(image.shape[-2:]) != tuple(size):  # a low-res input: upsampled to the output's size first
        image = F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    return {"image_latent": vae.encode(image).latent_dist.mode()}


def _mask(task: TaskDef, vae, image: torch.Tensor, examples: list[Example], latent_shape) -> dict:
    mask = mask_tensor([e.mask for e in examples]).to(image.device, image.dtype)
    return {"mask": F.interpolate(mask, size=latent_shape[-2:])}  # (B, 1, h, w), nearest as the pipeline does


def _masked_latent(task: TaskDef, vae, image: torch.Tensor, examples: list[Example], latent_shape) -> dict:
    mask = mask_tensor([e.mask for e in examples]).to(image.device, image.dtype)
    hole = vae.encode(masked_image(image, mask)).latent_dist
    return {"masked_mean": hole.mean, "masked_std": hole.std}


_ENCODERS = {"image": _image, "image_latent": _image_latent, "mask": _mask, "masked_latent": _masked_latent}


def _sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean.float() + std.float() * noise


def target_latents(encoded: dict, scaling: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled target latents (posterior samples), (B, 4, h, w)."""
    return _sample(encoded["target_mean"], encoded["target_std"], generator) * scaling


def task_condition(
    task: TaskDef, encoded: dict, scaling: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """The extra input channels of `task`, (B, extra channels, h, w), or None without an image input."""
    parts = [_PARTS[part](encoded, scaling, generator) for part in task.condition.parts]
    return torch.cat(parts, dim=1) if parts else None


_PARTS = {
    "image": lambda encoded, scaling, generator: encoded["image"].float(),
    "image_latent": lambda encoded, scaling, generator: encoded["image_latent"].float(),  # unscaled mode
    "mask": lambda encoded, scaling, generator: encoded["mask"].float(),
    "masked_latent": lambda encoded, scaling, generator: (
        _sample(encoded["masked_mean"], encoded["masked_std"], generator) * scaling
    ),
}


def drop_image(task: TaskDef, condition: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on the image: zero the condition of the rows in `drop` (B,) bool. Inpainting keeps
    its image (its pipeline guides on text only), as SD inpainting was trained."""
    if not task.drop_image:
        return condition
    return torch.where(drop[:, None, None, None].to(condition.device), torch.zeros_like(condition), condition)
