"""The diffusion objective every training run here shares (the base model's recipe and MTU / single-task
training): the DDPM scheduler that adds training noise, what the UNet learns to output per prediction type (ε, v or
x0), and the Min-SNR-γ loss weight.
"""

from __future__ import annotations

import torch

from mtu_export.config import PREDICTION_TYPES
from mtu_export.errors import InputError

NUM_TRAIN_TIMESTEPS = 1000  # training timesteps are drawn from [0, NUM_TRAIN_TIMESTEPS)


def training_scheduler(config: dict):
    """DDPM that adds the training noise, on the noise schedule and prediction type of a scheduler `config` (any
    diffusers scheduler's, e.g. a pipeline's `scheduler/scheduler_config.json`)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"the scheduler config predicts {scheduler.config.prediction_type!r}; training supports "
            f"{', '.join(PREDICTION_TYPES)}: fix prediction_type in scheduler/scheduler_config.json"
        )
    return scheduler


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for `scheduler.add_noise(latents, noise, timesteps)`: ε, v or x0."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents if kind == "sample" else noise


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR-γ loss weight (Hang et al. 2023) for a model predicting ε, v or x0: the x0-loss weight
    min(SNR, γ) expressed in the parameterisation's own loss. SNR(t) = ᾱ_t / (1 − ᾱ_t) is diffusers'
    `training_utils.compute_snr` of the training `scheduler`, on `timesteps`' device."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr.clamp(min=1e-12)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped
