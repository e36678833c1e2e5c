"""`mtu-export train`: multi-task MTU training (and the single-task baselines) from a base pipeline folder.

Every step draws a mixed-task batch (each task's share set by its sampling weight), runs one routed forward per
task inside one module call (so DDP sees one forward per backward), and minimises the diffusion loss summed over
tasks (Min-SNR weighted unless `min_snr_gamma` is 0), on the base pipeline's own noise schedule and prediction type
(ε for Stable Diffusion 1.5, v for 2.x and the shipped base). Text and image conditions are dropped as
InstructPix2Pix does (one uniform draw r: text dropped for r < 2p, image for p ≤ r < 3p), so sampling can use text
and image guidance.

Single-task baselines use the same base, data, steps and loss: the base UNet with the task's conv_in, fine-tuned
in full (`trainable="full"`), as the paper's baselines (InstructPix2Pix, SD inpainting, the x4 upscaler) are.

The VAE and text encoder stay frozen; each task's VAE outputs for the first `cache_size` train examples are cached
once in the work folder. Imports config, errors, storage, conditioning, loop, upcycle, world and pretrain.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mtu_export.conditioning import drop_image, encode_batch, target_latents, task_condition
from mtu_export.config import TrainConfig
from mtu_export.errors import CheckpointError, ConfigError, InputError
from mtu_export.loop import process_state, run_stage
from mtu_export.moe import MTUUNet
from mtu_export.pretrain import NUM_TRAIN_TIMESTEPS, diffusion_target, min_snr_weight, training_scheduler
from mtu_export.storage import check_output, locate_unet, write_json
from mtu_export.upcycle import load_components, load_unet, save_checkpoint, upcycle_unet
from mtu_export.vocab import tokenize
from mtu_export.world import make_example

CACHE_BATCH = 200


# ----------------------------------------------------------------------------------------------------------- cache
def cache_path(workdir: Path, task: str) -> Path:
    return workdir / f"cache-{task}.safetensors"


def build_cache(task: str, vae, tokenizer, count: int, path: Path) -> None:
    """Encode the first `count` train examples of `task` once (fp16 on disk): VAE outputs and prompt token ids."""
    from safetensors.torch import save_file

    parts: dict[str, list[torch.Tensor]] = {}
    for first in range(0, count, CACHE_BATCH):
        examples = [make_example(task, "train", i) for i in range(first, min(first + CACHE_BATCH, count))]
        encoded = encode_batch(task, vae, examples)
        if task == "sr" and encoded["low_res"].shape[-2:] != encoded["target_mean"].shape[-2:]:
            raise ConfigError(
                f"sr feeds the {tuple(encoded['low_res'].shape[-2:])} low-res image at latent resolution, but this "
                f"VAE makes {tuple(encoded['target_mean'].shape[-2:])} latents; use a VAE that downsamples by 4"
            )
        encoded = {k: v.half() for k, v in encoded.items()}
        encoded["input_ids"] = tokenize(tokenizer, [e.prompt for e in examples])
        for key, value in encoded.items():
            parts.setdefault(key, []).append(value.cpu())
        print(f"cache {task} {first + len(examples)}/{count}", flush=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, partial)
    partial.rename(path)


def load_cache(workdir: Path, task: str, count: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cache = load_file(cache_path(workdir, task))
    if cache["input_ids"].shape[0] != count:
        raise CheckpointError(
            f"{cache_path(workdir, task)} holds {cache['input_ids'].shape[0]} examples, the run asks for {count}; "
            "delete the file or use the work folder's original settings"
        )
    return cache


# ------------------------------------------------------------------------------------------------------------ loss
class TaskLoss(nn.Module):
    """The MTU UNet plus the loss of one mixed-task batch, in one forward (what DDP wraps)."""

    def __init__(self, mtu: MTUUNet, min_snr_gamma: float, scheduler) -> None:
        super().__init__()
        self.mtu = mtu
        self.min_snr_gamma = min_snr_gamma
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas", scheduler.alphas_cumprod.float(), persistent=False)

    def forward(self, batches: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`batches[task]` holds `sample` (noisy latent + condition), `timestep`, `hidden` and `target`."""
        total_rows = sum(b["target"].shape[0] for b in batches.values())
        total, per_task = 0.0, {}
        for task, b in batches.items():
            pred = self.mtu(b["sample"], b["timestep"], b["hidden"], task=task).sample
            per_sample = (pred - b["target"]).pow(2).mean(dim=(1, 2, 3))  # (B_task,)
            if self.min_snr_gamma > 0:
                per_sample = per_sample * min_snr_weight(
                    self.alphas, b["timestep"], self.min_snr_gamma, self.prediction_type
                )
            per_task[task] = per_sample.mean()
            total = total + per_sample.sum() / total_rows
        return total, per_task


def task_counts(config: TrainConfig) -> dict[str, int]:
    """Rows per task in every batch, proportional to the sampling weights (largest remainders get the extras)."""
    weights = config.weights()
    total = sum(weights.values())
    exact = {t: config.batch_size * w / total for t, w in weights.items()}
    counts = {t: int(v) for t, v in exact.items()}
    for task in sorted(exact, key=lambda t: counts[t] - exact[t])[: config.batch_size - sum(counts.values())]:
        counts[task] += 1
    return {t: c for t, c in counts.items() if c > 0}


def make_batches(config, caches, text_encoder, empty_ids, scheduler, scaling, generator, device) -> dict:
    """Draw one step's per-task inputs (random indices, noise, timesteps and dropouts all from `generator`)."""
    batches = {}
    p = config.cfg_dropout
    for task, count in task_counts(config).items():
        cache = caches[task]
        index = torch.randint(0, cache["input_ids"].shape[0], (count,), generator=generator)
        encoded = {k: v[index] for k, v in cache.items()}
        latents = target_latents(encoded, scaling, generator)  # (B, 4, h, w)
        condition = task_condition(task, encoded, scaling, generator)
        noise = torch.randn(latents.shape, generator=generator)
        timestep = torch.randint(0, NUM_TRAIN_TIMESTEPS, (count,), generator=generator)
        r = torch.rand(count, generator=generator)
        ids = torch.where((r < 2 * p)[:, None], empty_ids, encoded["input_ids"])  # (B, L)
        sample = scheduler.add_noise(latents, noise, timestep)
        if condition is not None:
            sample = torch.cat([sample, drop_image(task, condition, (r >= p) & (r < 3 * p))], dim=1)
        with torch.no_grad():
            hidden = text_encoder(ids.to(device))[0]
        batches[task] = {"sample": sample.to(device), "timestep": timestep.to(device), "hidden": hidden}
        batches[task]["target"] = diffusion_target(scheduler, latents, noise, timestep).to(device)
    return batches


# -------------------------------------------------------------------------------------------------------- training
def load_base(base: Path):
    """The frozen parts of a base pipeline (VAE, text encoder, tokenizer) in fp32, its UNet, and the DDPM scheduler
    that adds training noise on the pipeline's noise schedule and prediction type."""
    source = locate_unet(base)
    if source.pipeline_dir is None:
        raise InputError(f"{base} is a UNet folder; training needs a full pipeline folder (VAE, text encoder, ...)")
    vae, text_encoder, tokenizer, scheduler = load_components(base)
    frozen = vae.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), tokenizer
    return *frozen, load_unet(base), training_scheduler(dict(scheduler.config))


def prepare_model(config: TrainConfig, unet) -> MTUUNet:
    mtu = upcycle_unet(unet.float(), config.moe())
    if config.trainable == "full":
        for param in mtu.parameters():
            param.requires_grad_(True)
    return mtu


def fit(config: TrainConfig, base: Path, workdir: Path, resume: bool = False) -> tuple[MTUUNet, dict]:
    """Run (or resume) the training in `workdir` on every process; return this process's model and progress."""
    state = process_state()
    _check_workdir(workdir, config, resume)
    vae, text_encoder, tokenizer, unet, scheduler = load_base(Path(base))
    if state.is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / "train_config.json", config.to_dict())
        for task in config.weights():
            if not cache_path(workdir, task).exists():
                build_cache(task, vae, tokenizer, config.cache_size, cache_path(workdir, task))
    state.wait_for_everyone()
    caches = {task: load_cache(workdir, task, config.cache_size) for task in config.weights()}
    torch.manual_seed(config.seed)
    model = TaskLoss(prepare_model(config, unet), config.min_snr_gamma, scheduler)
    empty, scaling = tokenize(tokenizer, [""]), vae.config.scaling_factor

    def loss_fn(modules, step, generator, accelerator):
        (wrapped,) = modules
        text_encoder.to(accelerator.device)
        batches = make_batches(config, caches, text_encoder, empty, scheduler, scaling, generator, accelerator.device)
        loss, per_task = wrapped(batches)
        return loss, {f"loss_{t}": v.item() for t, v in per_task.items()}

    def lr_scale(name: str) -> float:
        return config.input_lr_scale if ".conv_in." in name else 1.0

    stage, ema = config.stage(), config.ema_decay or None
    (model,), progress = run_stage(
        "train",
        [model],
        loss_fn,
        stage,
        workdir,
        config.seed,
        ema,
        stop_at=config.stop_at,
        find_unused_parameters=True,
        lr_scale=lr_scale,
    )
    return model.mtu, progress


def train(config: TrainConfig, base: Path, workdir: Path, out: Path, resume: bool = False, overwrite: bool = False):
    """Train (or resume) in `workdir`, then write the MTU checkpoint (with the base's pipeline) to `out`. Returns
    `out`, or None when the call stopped early (`stop_at`) or on processes other than the main one."""
    if Path(out).exists() and not overwrite:
        check_output(Path(out), overwrite)  # refuse before training, not after
    mtu, progress = fit(config, base, workdir, resume)
    if progress["step"] < config.steps or not process_state().is_main_process:
        return None
    record = {"config": config.to_dict(), "steps": progress["step"], "seconds": progress["seconds"], "base": str(base)}
    save_checkpoint(mtu, out, pipeline_dir=Path(base), overwrite=overwrite, extra={"training": record})
    return out


def _check_workdir(workdir: Path, config: TrainConfig, resume: bool) -> None:
    saved = workdir / "train_config.json"
    if not saved.exists():
        return
    if not resume:
        raise ConfigError(f"{workdir} holds an earlier run; pass --resume to continue it, or choose another --work")
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # settings added since an earlier run kept defaults
    earlier = {**defaults, **json.loads(saved.read_text())}
    now = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as the saved file has them
    changed = sorted(k for k in now if k != "stop_at" and earlier.get(k) != now[k])
    if changed:
        raise ConfigError(
            f"--resume with other settings than the run in {workdir} ({', '.join(changed)}); "
            "use the same options or another --work"
        )
