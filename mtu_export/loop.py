"""The training loop every stage and trainer shares: accelerate-prepared modules, AdamW with linear warm-up and
cosine decay, gradient clipping, an optional EMA, progress (a rich bar on a terminal, log lines otherwise, JSON
lines always) and checkpoints with optimiser, schedule, EMA and RNG state that a later call resumes from.

Batches are a pure function of (seed, step, rank) through `step_generator`, so a resumed run sees the data and
noise an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mtu_export.config import StageRecipe
from mtu_export.errors import CheckpointError
from mtu_export.storage import write_json

logger = logging.getLogger(__name__)

LOG_EVERY = 25


def _cpu_only() -> bool:
    """No GPU (CUDA or Apple MPS): DDP then runs on the CPU over gloo. accelerate only does so when told `cpu`,
    and its launcher's `--multi_gpu` (torchrun) path does not tell it."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def process_state():
    """accelerate's process state (the process group under `accelerate launch`; one process otherwise)."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def _fresh_accelerator_state() -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision; every stage (and every in-process API call) sets its own, so drop the previous stage's. The process
    group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003) + step) * 1_009 + rank)


# ------------------------------------------------------------------------------------------------------------- EMA
def make_ema(params: list[nn.Parameter], decay: float):
    """diffusers' `training_utils.EMAModel` of `params`, with its usual warm-up: the k-th update decays by
    min(decay, k / (9 + k)) (diffusers counts from 0, so its first update copies the weights). This project's own EMA
    before it used (1 + k) / (10 + k); over the shipped base's 5,000 UNet steps at 0.999 the two weigh the run's
    iterates 7.8e-5 apart in total variation (mean iterate 4499.9 vs 4500.0)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=True)


# -------------------------------------------------------------------------------------------------------- the loop
def _lr_lambda(stage: StageRecipe) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(modules: list[nn.Module], lr: float, lr_scale: Callable[[str], float] | None) -> list[dict]:
    """One AdamW group per distinct learning rate, parameters in module order (one group when nothing is scaled)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                groups.setdefault(lr * (lr_scale(name) if lr_scale else 1.0), []).append(param)
    return [{"params": group, "lr": group_lr} for group_lr, group in groups.items()]


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
    """A rich progress bar on a terminal, log lines otherwise (logs.py; nohup logs); JSON lines to `log_file`."""

    def __init__(self, name: str, total: int, start: int, log_file: Path, enabled: bool) -> None:
        self.name, self.total, self.log_file, self.enabled = name, total, log_file, enabled
        self.bar = None
        if enabled:
            _truncate_log(log_file, start)
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.bar.start()
            self.task = self.bar.add_task(name, total=total, completed=start)

    def step(self, step: int, metrics: dict, seconds: float) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"{self.name} {text}")
        if step % LOG_EVERY == 0 or step == self.total:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics, "seconds": round(seconds, 2)}) + "\n")
            if self.bar is None:
                logger.info(f"{self.name} step {step}/{self.total} {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop the log lines after `step`, where a resumed run starts again: the steps between its last checkpoint and
    where it was stopped are run (and logged) once more, so each step keeps one line (a torn last line goes too)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    log_file.write_text("".join(f"{line}\n" for line in kept))


def _call_with_returned_weights(on_step, step: int, modules: list[nn.Module], ema, params) -> None:
    """`on_step(step, modules)` with the EMA weights in place when there is an EMA, then the training weights back."""
    if ema is None:
        on_step(step, modules)
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        on_step(step, modules)
    finally:
        ema.restore(params)


def run_stage(
    name: str,
    modules: list[nn.Module],
    loss_fn: Callable[[list[nn.Module], int, torch.Generator, object], torch.Tensor | tuple[torch.Tensor, dict]],
    stage: StageRecipe,
    workdir: Path,
    seed: int,
    ema_decay: float | None = None,
    stop_at: int | None = None,
    find_unused_parameters: bool = False,
    lr_scale: Callable[[str], float] | None = None,
    mixed_precision: str = "no",
    on_step: Callable[[int, list[nn.Module]], None] | None = None,
    on_step_every: int = 0,
) -> tuple[list[nn.Module], dict]:
    """Train `modules` for `stage.steps` AdamW steps of `loss_fn(modules, step, generator, accelerator)` (a loss,
    or (loss, metrics)), resuming from `workdir/<name>-state` when it exists and checkpointing there (also at
    `stop_at`, where this call ends early).
    Returns the unwrapped modules (EMA weights copied in when `ema_decay`) and the progress record (step, seconds).
    `lr_scale(name)` multiplies the learning rate of the parameter called `name` in its module (default 1);
    `mixed_precision` (no, fp16, bf16) is accelerate's autocast around the modules' forward.
    `on_step(step, modules)` runs on every process after each multiple of `on_step_every` steps (0: never) and after the
    stage's last step, before that step's checkpoint, with the weights the stage would return in place (the EMA's
    when `ema_decay`; the training weights are put back after it); its time is not counted in `seconds`.
    Each stage has its own Accelerator, so a checkpoint holds exactly that stage's models and optimiser."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    process_state()  # set up first, so the process group is the one the launcher made
    _fresh_accelerator_state()
    accelerator = Accelerator(cpu=_cpu_only(), kwargs_handlers=[ddp], mixed_precision=mixed_precision)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(modules, stage.lr, lr_scale), weight_decay=stage.weight_decay)
    factor = _lr_lambda(stage)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    *wrapped, optimizer, schedule = accelerator.prepare(*modules, optimizer, schedule)
    ema = make_ema(params, ema_decay) if ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    state_dir = workdir / f"{name}-state"
    progress = _load_progress(accelerator, state_dir)
    if ema is not None:
        ema.to(accelerator.device)  # a resumed EMA is loaded on the CPU
    if progress["step"]:
        if accelerator.is_main_process:
            logger.info(f"{name}: resuming at step {progress['step']} of {stage.steps}")
    log_file = workdir / f"{name}-log.jsonl"
    reporter = _Reporter(name, stage.steps, progress["step"], log_file, accelerator.is_main_process)
    for m in wrapped:
        m.train()
    started = time.perf_counter() - progress["seconds"]
    end = stage.steps if stop_at is None else min(stop_at, stage.steps)
    for step in range(progress["step"], end):
        loss = loss_fn(wrapped, step, step_generator(seed, step, accelerator.process_index), accelerator)
        loss, metrics = loss if isinstance(loss, tuple) else (loss, {})
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        done = step + 1
        metrics = {"loss": loss.item(), **metrics, "lr": stage.lr * factor(done)}  # unscaled groups' lr
        reporter.step(done, metrics, seconds=time.perf_counter() - started)
        if on_step is not None and on_step_every and (done % on_step_every == 0 or done == stage.steps):
            hook_started = time.perf_counter()
            _call_with_returned_weights(on_step, done, wrapped, ema, params)
            started += time.perf_counter() - hook_started  # the hook's time is not training time
        if done % stage.checkpoint_every == 0 or done == end:
            progress = {"step": done, "seconds": time.perf_counter() - started}
            _save_state(accelerator, state_dir, progress)
    reporter.close()
    if ema is not None:
        ema.copy_to(params)
    return [accelerator.unwrap_model(m).eval() for m in wrapped], progress
