"""Sampling every task in torch, with text and image classifier-free guidance, on the pipeline's own scheduler.

- tasks guided on text only (`t2i`, `inpaint`): ε = ε(∅) + s_t·(ε(text) − ε(∅)) (inpainting keeps its image
  condition in both branches, as StableDiffusionInpaintPipeline does);
- tasks with image guidance (`edit`, `sr`, declared image-conditioned tasks): InstructPix2Pix's two-scale
  guidance, ε = ε(∅, ∅) + s_i·(ε(∅, img) − ε(∅, ∅)) +
  s_t·(ε(text, img) − ε(∅, img)), the image condition zeroed for ε(∅, ∅).

The guidance formulas are linear in the model output, so they hold as written for v- and x0-prediction too; the
scheduler's config says which one the UNet gives. The denoiser is any callable `(sample, timestep,
encoder_hidden_states) -> ε, v or x0`: a routed MTU UNet for one task, a folded or single-task UNet, or (for exports)
an ONNX session. The task's definition (`tasks.TaskDef`) says which guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtu_export.conditioning import encode_batch, task_condition, to_uint8, tokenize
from mtu_export.example import Example
from mtu_export.tasks import TaskDef

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Components:
    """What sampling needs around the denoiser: a pipeline's frozen VAE, text encoder, tokenizer and scheduler (torch
    modules from `checkpoint.load_components`, or exported graphs behind the same interface)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 25
    text_guidance: float = 7.5
    image_guidance: float = 1.5  # edit and sr only
    seed: int = 0


def denoiser_for(model, task: str | None = None) -> Denoiser:
    """Wrap a routed MTU UNet (give `task`) or a plain diffusers UNet as a denoiser."""
    if task is not None:
        return lambda x, t, h: model(x, t, h, task=task).sample
    return lambda x, t, h: model(x, t, h).sample


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0]  # (B, L, D)


@torch.no_grad()
def guided_loop(
    denoise: Denoiser,
    task: TaskDef,
    scheduler,
    text: torch.Tensor,  # (B, L, D) prompt embeddings
    empty: torch.Tensor,  # (B, L, D) unconditional embeddings
    condition: torch.Tensor | None,  # (B, C, h, w) the task's extra channels
    shape: tuple[int, ...],  # (B, 4, h, w)
    config: SamplerConfig,
) -> torch.Tensor:
    """Run the guided sampling loop from seeded noise; returns scaled latents (B, 4, h, w)."""
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(config.steps)
    two_scale = task.image_guidance
    if two_scale:
        hidden = torch.cat([text, empty, empty])
        cond = torch.cat([condition, condition, torch.zeros_like(condition)])
    else:
        hidden = torch.cat([text, empty])
        cond = None if condition is None else torch.cat([condition, condition])
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * (3 if two_scale else 2)), t)
        x = x if cond is None else torch.cat([x, cond], dim=1)
        model_output = denoise(x, t.expand(x.shape[0]), hidden)  # ε, v or x0: whatever the scheduler expects
        if two_scale:
            full, image_only, none = model_output.chunk(3)
            guided = none + config.image_guidance * (image_only - none) + config.text_guidance * (full - image_only)
        else:
            full, none = model_output.chunk(2)
            guided = none + config.text_guidance * (full - none)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_latents(
    denoise: Denoiser, task: TaskDef, examples: list[Example], components: Components, config: SamplerConfig
) -> torch.Tensor:
    """Encode the task's conditioning and the prompts of `examples`, then sample; returns scaled latents
    (B, 4, h, w). The one preamble behind every sampler here (evaluation, export probes and checks, generate)."""
    scaling = components.vae.config.scaling_factor
    encoded = encode_batch(task, components.vae, examples)
    condition = task_condition(task, encoded, scaling, torch.Generator().manual_seed(config.seed + 1))
    prompts = [e.prompt for e in examples]
    text = encode_prompts(components.text_encoder, components.tokenizer, prompts)
    empty = encode_prompts(components.text_encoder, components.tokenizer, [""] * len(prompts))
    shape = tuple(encoded["target_mean"].shape)
    return guided_loop(denoise, task, components.scheduler, text, empty, condition, shape, config)


@torch.no_grad()
def sample_examples(
    denoise: Denoiser, task: TaskDef, examples: list[Example], components: Components, config: SamplerConfig
) -> np.ndarray:
    """Generate the outputs of `task` for `examples` (their prompts and image inputs); uint8 (B, H, W, 3)."""
    latents = sample_latents(denoise, task, examples, components, config)
    return to_uint8(components.vae.decode(latents / components.vae.config.scaling_factor).sample)
