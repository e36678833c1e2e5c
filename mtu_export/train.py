"""`mtu-export train`: multi-task MTU training (and the single-task baselines) from a base pipeline folder.

Every step draws a mixed-task batch (each task's share set by its sampling weight), runs one routed forward per
task inside one module call (so DDP sees one forward per backward), and minimises the diffusion loss summed over
tasks (Min-SNR weighted unless `min_snr_gamma` is 0), on the base pipeline's own noise schedule and prediction type
(ε for Stable Diffusion 1.5, v for 2.x and the shipped base). Text and image conditions are dropped as
InstructPix2Pix does (one uniform draw r: text dropped for r < 2p, image for p ≤ r < 3p), so sampling can use text
and image guidance.

Single-task baselines use the same base, data, steps and loss: the base UNet with the task's conv_in, fine-tuned
in full (`trainable="full"`), as the paper's baselines (InstructPix2Pix, SD inpainting, the x4 upscaler) are.

Each task's examples come from its `--data` dataset or, for the built-in tasks, the shapes world's first
`cache_size` train examples (data.py). The VAE and text encoder stay frozen; every example's VAE outputs are
encoded once into memory-mapped shards in the work folder (cache.py), so memory does not grow with the dataset.
`mixed_precision` (accelerate's autocast) and `gradient_checkpointing` (diffusers', task routing restored on
recomputation) pass through for large models.

With `eval_every`, the main process scores every trained task on the shapes world's held-out examples
`eval_first` .. `eval_first + eval_count - 1` every `eval_every` steps and at the last step (the weights the run
would return, in eval mode, no_grad, in fp32, the global RNG restored afterwards) and appends a line to
`<work>/curve.jsonl` (curves.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from mtu_export import logs
from mtu_export.cache import LatentCache, build_cache
from mtu_export.checkpoint import load_components, save_checkpoint
from mtu_export.conditioning import drop_image, target_latents, task_condition, tokenize
from mtu_export.config import TrainConfig
from mtu_export.data import Source, open_source, pipeline_geometry
from mtu_export.errors import ConfigError, InputError
from mtu_export.loop import process_state, run_stage
from mtu_export.machine import cpu_flags
from mtu_export.moe import MTUUNet, routed_checkpointing
from mtu_export.objective import NUM_TRAIN_TIMESTEPS, diffusion_target, min_snr_weight, training_scheduler
from mtu_export.storage import locate_unet, refuse_output, write_json
from mtu_export.tasks import resolve
from mtu_export.upcycle import load_unet, upcycle_unet

logger = logging.getLogger(__name__)


def cache_folder(workdir: Path, task: str) -> Path:
    return workdir / f"cache-{task}"


# ------------------------------------------------------------------------------------------------------------ loss
class TaskLoss(nn.Module):
    """The MTU UNet plus the loss of one mixed-task batch, in one forward (what DDP wraps)."""

    def __init__(self, mtu: MTUUNet, min_snr_gamma: float, scheduler) -> None:
        super().__init__()
        self.mtu = mtu
        self.min_snr_gamma = min_snr_gamma
        self.scheduler, self.prediction_type = scheduler, scheduler.config.prediction_type

    def forward(self, batches: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`batches[task]` holds `sample` (noisy latent + condition), `timestep`, `hidden` and `target`."""
        total_rows = sum(b["target"].shape[0] for b in batches.values())
        total, per_task = 0.0, {}
        for task, b in batches.items():
            pred = self.mtu(b["sample"], b["timestep"], b["hidden"], task=task).sample
            per_sample = (pred - b["target"]).pow(2).mean(dim=(1, 2, 3))  # (B_task,)
            if self.min_snr_gamma > 0:
                per_sample = per_sample * min_snr_weight(
                    self.scheduler, b["timestep"], self.min_snr_gamma, self.prediction_type
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
    """Draw one step's per-task inputs (random indices, noise, timesteps and dropouts all from `generator`).
    `caches[task]` is a LatentCache whose `task` attribute holds the task's definition."""
    batches = {}
    p = config.cfg_dropout
    for task, count in task_counts(config).items():
        cache = caches[task]
        index = torch.randint(0, len(cache), (count,), generator=generator)
        encoded = cache.gather(index)
        latents = target_latents(encoded, scaling, generator)  # (B, 4, h, w)
        condition = task_condition(cache.task, encoded, scaling, generator)
        noise = torch.randn(latents.shape, generator=generator)
        timestep = torch.randint(0, NUM_TRAIN_TIMESTEPS, (count,), generator=generator)
        r = torch.rand(count, generator=generator)
        ids = torch.where((r < 2 * p)[:, None], empty_ids, encoded["input_ids"])  # (B, L)
        sample = scheduler.add_noise(latents, noise, timestep)
        if condition is not None:
            sample = torch.cat([sample, drop_image(cache.task, condition, (r >= p) & (r < 3 * p))], dim=1)
        with torch.no_grad():
            hidden = text_encoder(ids.to(device))[0]
        batches[task] = {"sample": sample.to(device), "timestep": timestep.to(device), "hidden": hidden}
        batches[task]["target"] = diffusion_target(scheduler, latents, noise, timestep).to(device)
    return batches


# -------------------------------------------------------------------------------------------------------- training
def require_pipeline(base: Path) -> None:
    if locate_unet(base).pipeline_dir is None:
        raise InputError(f"{base} is a UNet folder; training needs a full pipeline folder (VAE, text encoder, ...)")


def load_base(base: Path):
    """The frozen parts of a base pipeline (VAE, text encoder, tokenizer) in fp32, its UNet, and the DDPM scheduler
    that adds training noise on the pipeline's noise schedule and prediction type."""
    require_pipeline(base)
    parts = load_components(base)
    frozen = parts.vae.eval().requires_grad_(False), parts.text_encoder.eval().requires_grad_(False), parts.tokenizer
    return *frozen, load_unet(base), training_scheduler(dict(parts.scheduler.config))


def prepare_model(config: TrainConfig, unet) -> MTUUNet:
    mtu = upcycle_unet(unet.float(), config.moe())
    if config.trainable == "full":
        for param in mtu.parameters():
            param.requires_grad_(True)
    if config.gradient_checkpointing:
        mtu.unet.enable_gradient_checkpointing(routed_checkpointing(mtu))
    return mtu


def training_sources(config: TrainConfig, base: Path) -> dict[str, Source]:
    """Each trained task's source: its `--data` dataset, else the shapes world's train split (built-in tasks).
    Opening a source validates it (columns, emptiness), so bad data fails before anything is written."""
    require_pipeline(base)
    latent, factor, default_size = pipeline_geometry(base)
    size = config.resolution or default_size
    if size % factor:
        raise ConfigError(f"--resolution {size} is not a multiple of the VAE's downsampling factor {factor}")
    specs = {t.name: t for t in config.moe().tasks}
    data = {d.task: d for d in config.data}
    return {
        task: open_source(resolve(specs[task], latent), data.get(task), "train", size, factor, config.cache_size)
        for task in config.weights()
    }


def build_caches(workdir: Path, sources: dict[str, Source], vae, tokenizer, state) -> dict[str, LatentCache]:
    """Encode every source once into `workdir` (each rank its share, on its device), then open the caches."""
    vae.to(state.device)
    caches = {}
    for task, source in sources.items():
        caches[task] = build_cache(cache_folder(workdir, task), source, vae, tokenizer, state)
    vae.to("cpu")
    return caches


def curve_hook(config: TrainConfig, base: Path, workdir: Path, mtu: MTUUNet, state):
    """The `run_stage` hook that scores `mtu` on the curve's held-out slice and appends a curve line; None when
    `eval_every` is 0 and on processes other than the main one."""
    if not config.eval_every or not state.is_main_process:
        return None
    from mtu_export.checkpoint import load_components
    from mtu_export.curves import append_line, curve_point, summary
    from mtu_export.evaluate import EvalConfig, evaluate_model, evaluation_sources
    from mtu_export.sample import SamplerConfig
    from mtu_export.tasks import model_tasks

    sampler = SamplerConfig(steps=config.eval_steps, text_guidance=config.eval_guidance)
    eval_config = EvalConfig("heldout", config.eval_count, config.eval_first, sampler=sampler)
    tasks = tuple(config.weights())
    sources = evaluation_sources(mtu, base, eval_config, tasks, None, str(workdir))
    components, defs = load_components(base), model_tasks(mtu)

    def on_step(step: int, modules: list[nn.Module]) -> None:
        device = next(mtu.parameters()).device  # where accelerate put it
        devices = [device] if device.type == "cuda" else []
        line = {"step": step, "tasks": {}}
        started = time.perf_counter()
        for m in modules:
            m.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for task in tasks:
                    task_started = time.perf_counter()
                    with logs.quiet("mtu_export.evaluate"):  # the curve's line says it all
                        results = evaluate_model(mtu, {task: sources[task]}, components, eval_config)[0]
                    line["tasks"][task] = curve_point(defs[task], results[task], time.perf_counter() - task_started)
        finally:
            for m in modules:
                m.train()
        line["seconds"] = round(time.perf_counter() - started, 2)
        append_line(workdir, line)
        logger.info(f"curve {summary(line)} ({line['seconds']:.0f} s)")

    return on_step


def _check_precision(config: TrainConfig) -> None:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 on CPUs (or no)")
    if config.mixed_precision == "bf16" and not torch.cuda.is_available() and _cpu_lacks_bf16():
        logger.warning(
            "--mixed-precision bf16 on a CPU without bf16 instructions (avx512_bf16 / amx_bf16) is emulated, "
            "many times slower than fp32; use --mixed-precision no here"
        )


def _cpu_lacks_bf16() -> bool:
    """An x86 CPU whose flags name no bf16 instructions (elsewhere: not known, so False)."""
    import platform

    flags = cpu_flags()
    return platform.machine() in ("x86_64", "AMD64") and bool(flags) and not {"avx512_bf16", "amx_bf16"} & flags


def fit(config: TrainConfig, base: Path, workdir: Path, resume: bool = False) -> tuple[MTUUNet, dict]:
    """Run (or resume) the training in `workdir` on every process; return this process's model and progress."""
    state = process_state()
    _check_precision(config)
    _check_workdir(workdir, config, resume)
    sources = training_sources(config, Path(base))
    vae, text_encoder, tokenizer, unet, scheduler = load_base(Path(base))
    caches = build_caches(workdir, sources, vae, tokenizer, state)
    if state.is_main_process:
        write_json(workdir / "train_config.json", config.to_dict())
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
        mixed_precision=config.mixed_precision,
        on_step=curve_hook(config, Path(base), workdir, model.mtu, state),
        on_step_every=config.eval_every,
    )
    return model.mtu, progress


def train(config: TrainConfig, base: Path, workdir: Path, out: Path, resume: bool = False, overwrite: bool = False):
    """Train (or resume) in `workdir`, then write the MTU checkpoint (with the base's pipeline) to `out`. Returns
    `out`, or None when the call stopped early (`stop_at`) or on processes other than the main one."""
    # writing `out` must not destroy what training reads, nor its own work folder (caches, resumable checkpoints)
    refuse_output(out, [base, workdir, *(spec.path for spec in config.data)], overwrite)  # before training
    mtu, progress = fit(config, base, workdir, resume)
    if progress["step"] < config.steps or not process_state().is_main_process:
        return None
    record = {"config": config.to_dict(), "steps": progress["step"], "seconds": progress["seconds"], "base": str(base)}
    save_checkpoint(mtu, out, pipeline_dir=Path(base), overwrite=overwrite, extra={"training": record})
    return out


# Settings a resumed run may change: where it stops and how its steps are computed (autocast, activation
# recomputation), e.g. on a machine without bf16 kernels, not what the steps compute.
RESUME_MAY_CHANGE = ("stop_at", "mixed_precision", "gradient_checkpointing")


def _check_workdir(workdir: Path, config: TrainConfig, resume: bool) -> None:
    saved = workdir / "train_config.json"
    if not saved.exists():
        return
    if not resume:
        raise ConfigError(f"{workdir} holds an earlier run; pass --resume to continue it, or choose another --work")
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # settings added since an earlier run kept defaults
    earlier = {**defaults, **json.loads(saved.read_text())}
    now = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as the saved file has them
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and earlier.get(k) != now[k])
    if changed:
        raise ConfigError(
            f"--resume with other settings than the run in {workdir} ({', '.join(changed)}); "
            "use the same options or another --work"
        )
