"""What each task feeds its UNet besides the noisy latent, built exactly as the diffusers pipelines build it, so a
folded task runs in the stock pipeline it mirrors. The task's definition (`tasks.TaskDef.condition`) says which:

- `none`            nothing                                  (StableDiffusionPipeline)
- `source_latent`   source-image latent, posterior mode, *unscaled*; zeros when the image is dropped
                                                             (StableDiffusionInstructPix2PixPipeline)
- `low_res_rgb`     the low-res RGB image in [-1, 1] at latent resolution (as SD's x4 upscaler)
- `low_res_latent`  the latent (mode, unscaled) of the low-res image bicubic-upsampled to full size
- `masked_latent`   [mask (1 = hole) resized to the latent, latent of the image with the hole set to 0 in [-1, 1],
                    posterior sample × scaling factor]      (StableDiffusionInpaintPipeline)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtu_export.errors import ConfigError
from mtu_export.image_processor import to_model_input
from mtu_export.tasks import TaskDef
from mtu_export.world import Example


def image_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the VAE's input range (image_processor's)."""
    return torch.from_numpy(to_model_input(images))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of `image_tensor`: (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def mask_tensor(masks: list[np.ndarray]) -> torch.Tensor:
    """bool (H, W) masks, True = hole -> float (B, 1, H, W) in {0, 1}."""
    return torch.from_numpy(np.stack(masks)).float()[:, None]


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting pipeline's masked image: the hole is 0 (mid-gray) in [-1, 1] space."""
    return image * (mask < 0.5)


@torch.no_grad()
def encode_batch(task: TaskDef, vae, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Everything random-free the task needs from the VAE for a batch (cacheable): target posterior mean / std and
    the task's image inputs (`source`: a source latent's mode; `low_res`: the low-res RGB; inpainting: the mask at
    latent size and the masked image's posterior mean / std)."""
    device, dtype = vae.device, vae.dtype
    target = vae.encode(image_tensor([e.target for e in examples]).to(device, dtype)).latent_dist
    out = {"target_mean": target.mean, "target_std": target.std}  # (B, 4, h, w)
    if task.condition == "source_latent":
        out["source"] = vae.encode(image_tensor([e.source for e in examples]).to(device, dtype)).latent_dist.mode()
    elif task.condition == "low_res_rgb":
        out["low_res"] = image_tensor([e.source for e in examples]).to(device, dtype)  # (B, 3, h, w)
        if out["low_res"].shape[-2:] != target.mean.shape[-2:]:
            raise ConfigError(
                f"{task.name} feeds the {tuple(out['low_res'].shape[-2:])} low-res image at latent resolution, but "
                f"this VAE makes {tuple(target.mean.shape[-2:])} latents; upcycle {task.name} with the latent "
                f"convention ({2 * target.mean.shape[1]} channels)"
            )
    elif task.condition == "low_res_latent":
        low_res = image_tensor([e.source for e in examples]).to(device, dtype)
        upsampled = F.interpolate(low_res, size=examples[0].target.shape[:2], mode="bicubic", align_corners=False)
        out["source"] = vae.encode(upsampled.clamp(-1, 1)).latent_dist.mode()
    elif task.condition == "masked_latent":
        image = image_tensor([e.target for e in examples]).to(device, dtype)
        mask = mask_tensor([e.mask for e in examples]).to(device, dtype)
        hole = vae.encode(masked_image(image, mask)).latent_dist
        out["mask"] = F.interpolate(mask, size=hole.mean.shape[-2:])  # (B, 1, h, w), nearest as the pipeline does
        out["masked_mean"], out["masked_std"] = hole.mean, hole.std
    return out


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
    if task.condition in ("source_latent", "low_res_latent"):
        return encoded["source"].float()  # unscaled posterior mode, as InstructPix2Pix
    if task.condition == "low_res_rgb":
        return encoded["low_res"].float()
    if task.condition == "masked_latent":
        hole = _sample(encoded["masked_mean"], encoded["masked_std"], generator) * scaling
        return torch.cat([encoded["mask"].float(), hole], dim=1)
    return None


def drop_image(task: TaskDef, condition: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on the image: zero the condition of the rows in `drop` (B,) bool. Inpainting keeps
    its image (its pipeline guides on text only), as SD inpainting was trained."""
    if not task.drop_image:
        return condition
    return torch.where(drop[:, None, None, None].to(condition.device), torch.zeros_like(condition), condition)
