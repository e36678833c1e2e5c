"""Train the shipped base model: a small Stable-Diffusion-shaped text-to-image pipeline for the shapes world.

Three stages, each resumable from its last checkpoint in a work folder, each on accelerate (one CPU here; the
same code runs DDP under `accelerate launch`):

1. `vae`    AutoencoderKL, 64×64×3 <-> 16×16×4, L1 + L2 reconstruction with a small KL term;
2. `encode` the first `dataset_size` train-split t2i scenes, encoded once into latent mean / std, plus their
            tokenized captions; the latent scaling factor (SD's 0.18215) is measured here as 1 / std;
3. `unet`   UNet2DConditionModel and CLIPTextModel trained together from scratch on ε-, v- or x0-prediction
            (optionally on a zero-terminal-SNR schedule), Min-SNR weighting unless γ is 0, caption dropout for
            classifier-free guidance and an EMA of the weights.

Batches are a pure function of (seed, step, rank): a resumed run sees the data and noise an uninterrupted run
would.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import tomllib
import torch
from torch import nn

from mtu_export.conditioning import image_tensor, tokenize
from mtu_export.config import BaseRecipe
from mtu_export.errors import ConfigError, InputError
from mtu_export.loop import process_state, run_stage
from mtu_export.objective import NUM_TRAIN_TIMESTEPS, diffusion_target, min_snr_weight, training_scheduler
from mtu_export.shapes.vocab import world_tokenizer
from mtu_export.shapes.world import make_example
from mtu_export.storage import atomic_output, refuse_output, write_json

logger = logging.getLogger(__name__)

NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's
ENCODE_BATCH = 250


def load_recipe(path: Path) -> BaseRecipe:
    """Read a base-model recipe TOML (e.g. `models/shapes-base.toml`)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"recipe {path} not found; pass a TOML file such as models/shapes-base.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None
    return BaseRecipe.from_dict(data, source=f"recipe {path}")


# ---------------------------------------------------------------------------------------------------------- models
def build_vae(recipe: BaseRecipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, **recipe.vae)


def build_text_encoder(recipe: BaseRecipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe.text_encoder,
    )
    return CLIPTextModel(config)


def build_unet(recipe: BaseRecipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=recipe.text_encoder["hidden_size"], **recipe.unet
    )


def recipe_schedule(recipe: BaseRecipe) -> dict:
    """The recipe's noise schedule and prediction type as diffusers scheduler-config fields."""
    return dict(
        NOISE_SCHEDULE,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type=recipe.prediction_type,
        rescale_betas_zero_snr=recipe.zero_terminal_snr,
    )


def sampling_scheduler(recipe: BaseRecipe):
    """The scheduler shipped in the pipeline: DPM-Solver++ (2M) on the training noise schedule (with zero terminal
    SNR, from the last timestep: "trailing" spacing)."""
    from diffusers import DPMSolverMultistepScheduler

    spacing = "trailing" if recipe.zero_terminal_snr else "linspace"
    return DPMSolverMultistepScheduler(**recipe_schedule(recipe), steps_offset=1, timestep_spacing=spacing)


# ------------------------------------------------------------------------------------------------------------ data
def vae_images(indices: range) -> list[np.ndarray]:
    """Clean scenes, and every fourth one an inpainting input with its hole, so later tasks' inputs encode well."""
    out = []
    for i in indices:
        if i % 4 == 3:
            out.append(make_example("inpaint", "train", i).input)
        else:
            out.append(make_example("t2i", "train", i).target)
    return out


def _is_main_process() -> bool:
    return process_state().is_main_process


# ---------------------------------------------------------------------------------------------------------- stages
def train_vae(recipe: BaseRecipe, workdir: Path, stop_at: int | None = None) -> dict:
    """Stage 1: the autoencoder. Saves `workdir/vae` once complete; returns the stage's progress record."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe)
    stage = recipe.vae_training

    def loss_fn(modules: list[nn.Module], step: int, generator: torch.Generator, accelerator) -> torch.Tensor:
        (model,) = modules
        first = (step * accelerator.num_processes + accelerator.process_index) * stage.batch_size
        x = image_tensor(vae_images(range(first, first + stage.batch_size))).to(accelerator.device)  # (B,3,64,64)
        posterior = model.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        z = posterior.mean + posterior.std * noise  # (B, 4, 16, 16)
        recon = model.decode(z).sample
        return (recon - x).abs().mean() + (recon - x).pow(2).mean() + recipe.kl_weight * posterior.kl().mean()

    (vae,), progress = run_stage("vae", [vae], loss_fn, stage, workdir, recipe.seed, stop_at=stop_at)
    if _is_main_process() and progress["step"] == stage.steps:
        vae.save_pretrained(workdir / "vae")
    return progress


@torch.no_grad()
def encode_dataset(recipe: BaseRecipe, workdir: Path, tokenizer) -> float:
    """Stage 2: latents (mean, std) and caption token ids of the first `dataset_size` train scenes, saved to
    `workdir/latents.safetensors`; sets the VAE's scaling factor to 1 / std(latents) and re-saves it."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(workdir / "vae", use_safetensors=True).eval()
    means, stds, ids = [], [], []
    for first in range(0, recipe.dataset_size, ENCODE_BATCH):
        last = min(first + ENCODE_BATCH, recipe.dataset_size)
        examples = [make_example("t2i", "train", i) for i in range(first, last)]
        posterior = vae.encode(image_tensor([e.target for e in examples])).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        ids.append(tokenize(tokenizer, [e.prompt for e in examples]))
        logger.info(f"encode {first + len(examples)}/{recipe.dataset_size}")
    mean = torch.cat(means)
    scaling = float(1.0 / mean.float().std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(workdir / "vae")
    tensors = {"mean": mean, "std": torch.cat(stds), "input_ids": torch.cat(ids)}
    partial = workdir / "latents.safetensors.partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, partial)
    partial.rename(workdir / "latents.safetensors")
    return scaling


def train_unet(recipe: BaseRecipe, workdir: Path, tokenizer) -> tuple[nn.Module, nn.Module, dict]:
    """Stage 3: UNet and text encoder together, from scratch. Returns both (EMA weights) and the progress record."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    data = load_file(workdir / "latents.safetensors")
    scaling = AutoencoderKL.load_config(workdir / "vae")["scaling_factor"]
    empty = tokenize(tokenizer, [""])  # (1, L): the unconditional prompt
    torch.manual_seed(recipe.seed + 1)
    unet, text_encoder = build_unet(recipe), build_text_encoder(recipe, tokenizer)
    scheduler = training_scheduler(recipe_schedule(recipe))
    stage = recipe.unet_training
    count = data["mean"].shape[0]

    def loss_fn(modules: list[nn.Module], step: int, generator: torch.Generator, accelerator) -> torch.Tensor:
        model, encoder = modules
        index = torch.randint(0, count, (stage.batch_size,), generator=generator)
        latents = data["mean"][index].float() + data["std"][index].float() * torch.randn(
            (stage.batch_size, *data["mean"].shape[1:]), generator=generator
        )
        latents = latents * scaling  # (B, 4, 16, 16), unit variance
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (stage.batch_size,), generator=generator)
        drop = torch.rand(stage.batch_size, generator=generator) < recipe.caption_dropout
        ids = torch.where(drop[:, None], empty, data["input_ids"][index])  # (B, L)
        device = accelerator.device
        hidden = encoder(ids.to(device))[0]  # (B, L, D)
        pred = model(scheduler.add_noise(latents, noise, t).to(device), t.to(device), hidden).sample
        target = diffusion_target(scheduler, latents, noise, t)
        per_sample = (pred - target.to(device)).pow(2).mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma > 0:
            weight = min_snr_weight(scheduler, t, recipe.min_snr_gamma, recipe.prediction_type)
            per_sample = per_sample * weight.to(device)
        return per_sample.mean()

    (unet, text_encoder), progress = run_stage(
        "unet", [unet, text_encoder], loss_fn, stage, workdir, recipe.seed, recipe.ema_decay
    )
    return unet, text_encoder, progress


# ----------------------------------------------------------------------------------------------------- whole recipe
def pretrain(recipe_path: Path, workdir: Path, out: Path, overwrite: bool = False, dtype: str = "fp16") -> Path:
    """Run (or resume) every stage of the recipe in `workdir`, then write the StableDiffusionPipeline to `out`."""
    if dtype not in ("fp16", "fp32"):
        raise ConfigError(f"--dtype must be fp16 or fp32, got {dtype!r}")
    refuse_output(out, [recipe_path], overwrite)  # refuse before hours of training, not after
    recipe = load_recipe(recipe_path)
    workdir.mkdir(parents=True, exist_ok=True)
    state = process_state()
    timings_file = workdir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    tokenizer = world_tokenizer(workdir / "tokenizer-files")
    if not (workdir / "vae" / "config.json").exists():
        timings["vae"] = train_vae(recipe, workdir)
        if state.is_main_process:
            write_json(timings_file, timings)
    if not (workdir / "latents.safetensors").exists() and state.is_main_process:
        started = time.perf_counter()
        encode_dataset(recipe, workdir, tokenizer)
        timings["encode"] = {"seconds": time.perf_counter() - started, "scenes": recipe.dataset_size}
        write_json(timings_file, timings)
    state.wait_for_everyone()
    unet, text_encoder, timings["unet"] = train_unet(recipe, workdir, tokenizer)
    if state.is_main_process:
        write_json(timings_file, timings)
        _write_pipeline(workdir, unet, text_encoder, tokenizer, recipe, timings, out, overwrite, dtype)
    state.wait_for_everyone()
    return out


def _write_pipeline(workdir, unet, text_encoder, tokenizer, recipe, timings, out, overwrite, dtype) -> None:
    """Assemble the StableDiffusionPipeline (DPM-Solver++ for sampling) and write it, with `training.json`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(workdir / "vae", use_safetensors=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(recipe),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype == "fp16":
        pipe.to(torch.float16)
    with atomic_output(out, [workdir / "vae"], overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", {"recipe": recipe.to_dict(), "timings": timings, "weights_dtype": dtype})
