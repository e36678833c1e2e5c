"""Train the shipped base model: a small Stable-Diffusion-shaped text-to-image pipeline for the shapes world.

Three stages, each resumable from its last checkpoint in a work folder, each on accelerate (one CPU here; the
same code runs DDP under `accelerate launch`):

1. `vae`    AutoencoderKL, 64×64×3 <-> 16×16×4, L1 + L2 reconstruction with a small KL term;
2. `encode` the first `dataset_size` train-split t2i scenes, encoded once into latent mean / std, plus their
            tokenized captions; the latent scaling factor (SD's 0.18215) is measured here as 1 / std;
3. `unet`   UNet2DConditionModel and CLIPTextModel trained together from scratch on ε-prediction with Min-SNR
            weighting, caption dropout for classifier-free guidance and an EMA of the weights.

Batches are a pure function of (seed, step, rank): a resumed run sees the data and noise an uninterrupted run
would. Imports config, errors, storage, vocab and world.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tomllib
import torch
from torch import nn

from mtu_export.config import BaseRecipe, StageRecipe
from mtu_export.errors import CheckpointError, InputError
from mtu_export.storage import atomic_output_dir, write_json
from mtu_export.vocab import world_tokenizer
from mtu_export.world import make_example

NUM_TRAIN_TIMESTEPS = 1000
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's
LOG_EVERY = 25
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


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **NOISE_SCHEDULE)


def sampling_scheduler():
    """The scheduler shipped in the pipeline: DPM-Solver++ (2M) on the training noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, steps_offset=1, **NOISE_SCHEDULE)


# ------------------------------------------------------------------------------------------------------------ data
def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def vae_images(indices: range) -> list[np.ndarray]:
    """Clean scenes, and every fourth one an inpainting input with its hole, so later tasks' inputs encode well."""
    out = []
    for i in indices:
        if i % 4 == 3:
            out.append(make_example("inpaint", "train", i).source)
        else:
            out.append(make_example("t2i", "train", i).target)
    return out


def _generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003) + step) * 1_009 + rank)


# ------------------------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of parameters, with the usual warm-up (decay grows as (1+k)/(10+k))."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[nn.Parameter]) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        for shadow, p in zip(self.shadow, params, strict=True):
            p.copy_(shadow)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.shadow = [t.clone() for t in state["shadow"]]


# -------------------------------------------------------------------------------------------------------- the loop
def _lr_lambda(stage: StageRecipe) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save_state(accelerator, state_dir: Path, progress: dict) -> None:
    """Save model, optimiser, LR schedule, EMA and RNG state; replace the previous checkpoint only when complete."""
    partial = state_dir.with_name(state_dir.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    if accelerator.is_main_process:
        write_json(partial / "progress.json", progress)
        shutil.rmtree(state_dir, ignore_errors=True)
        partial.rename(state_dir)
    accelerator.wait_for_everyone()


def _load_progress(accelerator, state_dir: Path) -> dict:
    if not (state_dir / "progress.json").is_file():
        return {"step": 0, "seconds": 0.0}
    try:
        accelerator.load_state(str(state_dir))
        return json.loads((state_dir / "progress.json").read_text())
    except Exception as exc:  # a checkpoint written by another recipe or a broken file
        raise CheckpointError(
            f"cannot resume from {state_dir} ({type(exc).__name__}: {exc}); delete it to start the stage afresh"
        ) from None


class _Reporter:
    """A rich progress bar on a terminal, plain log lines otherwise (nohup logs); JSON lines to `log_file`."""

    def __init__(self, name: str, total: int, start: int, log_file: Path, enabled: bool) -> None:
        self.name, self.total, self.log_file, self.enabled = name, total, log_file, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.bar.start()
            self.task = self.bar.add_task(name, total=total, completed=start)

    def step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"{self.name} {text}")
        if step % LOG_EVERY == 0 or step == self.total:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.bar is None:
                print(f"{self.name} step {step}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_stage(
    name: str,
    modules: list[nn.Module],
    loss_fn: Callable[[list[nn.Module], int, torch.Generator, object], torch.Tensor],
    stage: StageRecipe,
    workdir: Path,
    seed: int,
    ema_decay: float | None = None,
    stop_at: int | None = None,
) -> tuple[list[nn.Module], dict]:
    """Train `modules` for `stage.steps` AdamW steps of `loss_fn(modules, step, generator)`, resuming from
    `workdir/<name>-state` when it exists, and checkpointing there (also at `stop_at`, where this call ends early).
    Returns the unwrapped modules (EMA weights copied in when `ema_decay`) and the progress record (step, seconds).
    Each stage has its own Accelerator, so a checkpoint holds exactly that stage's models and optimiser."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage))
    *wrapped, optimizer, schedule = accelerator.prepare(*modules, optimizer, schedule)
    ema = EMA(params, ema_decay) if ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    state_dir = workdir / f"{name}-state"
    progress = _load_progress(accelerator, state_dir)
    if progress["step"]:
        accelerator.print(f"{name}: resuming at step {progress['step']} of {stage.steps}")
    log_file = workdir / f"{name}-log.jsonl"
    reporter = _Reporter(name, stage.steps, progress["step"], log_file, accelerator.is_main_process)
    for m in wrapped:
        m.train()
    started = time.perf_counter() - progress["seconds"]
    end = stage.steps if stop_at is None else min(stop_at, stage.steps)
    for step in range(progress["step"], end):
        loss = loss_fn(wrapped, step, _generator(seed, step, accelerator.process_index), accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(params)
        done = step + 1
        reporter.step(done, {"loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        if done % stage.checkpoint_every == 0 or done == end:
            progress = {"step": done, "seconds": time.perf_counter() - started}
            _save_state(accelerator, state_dir, progress)
    reporter.close()
    if ema is not None:
        ema.copy_to(params)
    return [accelerator.unwrap_model(m).eval() for m in wrapped], progress


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# ---------------------------------------------------------------------------------------------------------- stages
def train_vae(recipe: BaseRecipe, workdir: Path, stop_at: int | None = None) -> dict:
    """Stage 1: the autoencoder. Saves `workdir/vae` once complete; returns the stage's progress record."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe)
    stage = recipe.vae_training

    def loss_fn(modules: list[nn.Module], step: int, generator: torch.Generator, accelerator) -> torch.Tensor:
        (model,) = modules
        first = (step * accelerator.num_processes + accelerator.process_index) * stage.batch_size
        x = images_to_tensor(vae_images(range(first, first + stage.batch_size))).to(accelerator.device)  # (B,3,64,64)
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

    vae = AutoencoderKL.from_pretrained(workdir / "vae").eval()
    means, stds, ids = [], [], []
    for first in range(0, recipe.dataset_size, ENCODE_BATCH):
        last = min(first + ENCODE_BATCH, recipe.dataset_size)
        examples = [make_example("t2i", "train", i) for i in range(first, last)]
        posterior = vae.encode(images_to_tensor([e.target for e in examples])).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        ids.append(tokenize(tokenizer, [e.prompt for e in examples]))
        print(f"encode {first + len(examples)}/{recipe.dataset_size}", flush=True)
    mean = torch.cat(means)
    scaling = float(1.0 / mean.float().std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(workdir / "vae")
    tensors = {"mean": mean, "std": torch.cat(stds), "input_ids": torch.cat(ids)}
    partial = workdir / "latents.safetensors.partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, partial)
    partial.rename(workdir / "latents.safetensors")
    return scaling


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline makes them: padded to the model's length, no attention mask."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, L)


def train_unet(recipe: BaseRecipe, workdir: Path, tokenizer) -> tuple[nn.Module, nn.Module, dict]:
    """Stage 3: UNet and text encoder together, from scratch. Returns both (EMA weights) and the progress record."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    data = load_file(workdir / "latents.safetensors")
    scaling = AutoencoderKL.load_config(workdir / "vae")["scaling_factor"]
    empty = tokenize(tokenizer, [""])  # (1, L): the unconditional prompt
    torch.manual_seed(recipe.seed + 1)
    unet, text_encoder = build_unet(recipe), build_text_encoder(recipe, tokenizer)
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod  # (T,)
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
        per_sample = (pred - noise.to(device)).pow(2).mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * (snr.clamp(max=recipe.min_snr_gamma) / snr).to(device)
        return per_sample.mean()

    (unet, text_encoder), progress = run_stage(
        "unet", [unet, text_encoder], loss_fn, stage, workdir, recipe.seed, recipe.ema_decay
    )
    return unet, text_encoder, progress


# ----------------------------------------------------------------------------------------------------- whole recipe
def pretrain(recipe_path: Path, workdir: Path, out: Path, overwrite: bool = False, dtype: str = "fp16") -> Path:
    """Run (or resume) every stage of the recipe in `workdir`, then write the StableDiffusionPipeline to `out`."""
    from accelerate import PartialState

    recipe = load_recipe(recipe_path)
    if out.exists() and not overwrite:
        from mtu_export.storage import check_output

        check_output(out, overwrite)  # refuse before hours of training, not after
    workdir.mkdir(parents=True, exist_ok=True)
    state = PartialState()  # the process group under `accelerate launch`; one process otherwise
    timings_file = workdir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    tokenizer = world_tokenizer(workdir / "tokenizer-files")
    if not (workdir / "vae" / "config.json").exists():
        timings["vae"] = train_vae(recipe, workdir)
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
        write_pipeline(workdir, unet, text_encoder, tokenizer, recipe, timings, out, overwrite, dtype)
    state.wait_for_everyone()
    return out


def write_pipeline(workdir, unet, text_encoder, tokenizer, recipe, timings, out, overwrite, dtype) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(workdir / "vae"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype == "fp16":
        pipe.to(torch.float16)
    with atomic_output_dir(out, overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", {"recipe": recipe.to_dict(), "timings": timings, "weights_dtype": dtype})
