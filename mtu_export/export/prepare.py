"""What both exporters (onnx.py, coreml.py) do before they write anything: resolve the tasks to export, load the
checkpoint's pipeline components, settle the image size, find each task's validation / calibration examples and
fold every task, plus the end-to-end image quality goal both report against."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mtu_export.checkpoint import Checkpoint, load_checkpoint, load_components
from mtu_export.config import ExportConfig, SparseFold
from mtu_export.errors import ConfigError, InputError
from mtu_export.export.probes import ExampleSources, Probes, trajectory_probes
from mtu_export.fold import ffn_kept, fold_task, sparse_deviation, verify_fold
from mtu_export.image_processor import vae_factor
from mtu_export.sample import Components, SamplerConfig
from mtu_export.tasks import model_tasks

IMAGE_PSNR_GOAL_DB = 30.0  # end-to-end images vs the fp32 torch pipeline (the goal for quantized exports)

logger = logging.getLogger(__name__)


def example_sources(ckpt: Checkpoint, tasks: tuple[str, ...], data: dict, size: tuple[int, int, int]):
    """Validation / calibration examples per exported task; refuses data for a task not exported and a declared
    task without data, before any heavy work."""
    from mtu_export.data import check_data_tasks

    check_data_tasks(data, tasks, f"this export of {ckpt.path}")
    defs = model_tasks(ckpt.model)
    height, _, factor = size
    return ExampleSources({t: defs[t] for t in tasks}, data, height, factor)


def require_kind(config: ExportConfig, config_type: type[ExportConfig]) -> None:
    """Refuse a config of another format's kind (an OnnxConfig handed to the Core ML export, a bare ExportConfig)."""
    if not isinstance(config, config_type):
        raise ConfigError(
            f"`mtu-export {config_type.command}` takes a {config_type.__name__}, not a {type(config).__name__}; "
            f"build one with the same fields (mtu_export.config.{config_type.__name__})"
        )


def resolve_tasks(ckpt: Checkpoint, config: ExportConfig) -> tuple[str, ...]:
    if ckpt.model.unet.config.addition_embed_type == "text_time":
        raise ConfigError(
            "SDXL-style UNets (text_time conditioning) are not exportable yet; fold and export with optimum"
        )
    if not config.tasks:
        return ckpt.model.config.task_names
    return tuple(ckpt.model.config.task(name).name for name in config.tasks)


def checkpoint_components(ckpt: Checkpoint) -> Components:
    """The VAE, text encoder, tokenizer and scheduler of the pipeline a checkpoint refers to."""
    if ckpt.pipeline_dir is None:
        raise InputError(
            f"{ckpt.path} holds a UNet only; export needs the pipeline's text encoder, VAE, tokenizer and scheduler: "
            "upcycle a pipeline folder (e.g. models/shapes-base), not a bare UNet"
        )
    return load_components(ckpt.pipeline_dir)


def fold_tasks(
    ckpt: Checkpoint, tasks: tuple[str, ...], sparse: SparseFold | None = None
) -> dict[str, torch.nn.Module]:
    unets = {}
    for task in tasks:
        unets[task] = fold_task(ckpt.model, task, sparse).eval()
        diff = verify_fold(ckpt.model, unets[task], task, sparse)
        kept = ffn_kept(ckpt.model, unets[task])
        narrowed = "" if kept == 1.0 else f", FFN width kept {kept:.0%}"
        if sparse is not None and sparse.drops_weight:
            narrowed += f", vs every expert {sparse_deviation(ckpt.model, unets[task], task):.2e} relative"
        logger.info(f"folded {task} (fold vs routed max |diff| {diff:.2e}{narrowed})")
    return unets


def image_size(ckpt: Checkpoint, vae, config: ExportConfig) -> tuple[int, int, int]:
    """(height, width, VAE factor) of the export; the default is the UNet's sample size times the VAE's factor."""
    factor = vae_factor(vae.config.block_out_channels)
    sample = ckpt.model.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else (sample or 64)
    height, width = config.height or sample * factor, config.width or sample * factor
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ConfigError(f"--{name} {value} is not a multiple of the VAE's downsampling factor {factor}")
    if height != width:
        raise ConfigError(f"--height {height} and --width {width} differ; square images only for now")
    return height, width, factor


@dataclass(frozen=True)
class Prepared:
    """What every exporter starts from (`prepare_export`)."""

    ckpt: Checkpoint
    tasks: tuple[str, ...]
    components: Components
    size: tuple[int, int, int]  # (height, width, VAE factor)
    sources: ExampleSources
    unets: dict[str, torch.nn.Module]  # task -> folded UNet, checked against the routed model


def prepare_export(
    checkpoint: Path,
    config: ExportConfig,
    data: dict | None,
    fits: Callable[[Checkpoint, Components], None] | None = None,
) -> Prepared:
    """The exporters' shared start, every refusal before heavy work: the checkpoint, its tasks and components (and
    `fits`, a format's own check of them), the image size, each task's examples; then each task's folded UNet."""
    ckpt = load_checkpoint(Path(checkpoint), dtype=torch.float32)
    tasks = resolve_tasks(ckpt, config)
    components = checkpoint_components(ckpt)
    if fits is not None:
        fits(ckpt, components)
    size = image_size(ckpt, components.vae, config)
    sources = example_sources(ckpt, tasks, data or {}, size)
    return Prepared(ckpt, tasks, components, size, sources, fold_tasks(ckpt, tasks, config.sparse))


def record_probes(
    config: ExportConfig,
    unets: dict[str, torch.nn.Module],
    sources: ExampleSources,
    components: Components,
    purpose: str = "validation",
    count: int = 1,
    bundle: tuple[str, ...] | None = None,
    bundle_channels: int = 0,
) -> dict[str, Probes]:
    """What every exporter checks (or calibrates) its graphs on: per task, every graph input along the guided
    sampling trajectories (`config.probe_steps` steps) of `count` of its `purpose` examples ("validation" or
    "calibration"), sampled with its folded UNet. `bundle`: the tasks of an all-task UNet, whose inputs then carry
    each task's index and are padded to `bundle_channels`."""
    sampler = SamplerConfig(config.probe_steps, config.guidance, config.image_guidance, config.seed)
    probes = {}
    for task, unet in unets.items():
        ids = None if bundle is None else (bundle.index(task), bundle_channels)
        examples = getattr(sources, purpose)(task, count)
        probes[task] = trajectory_probes(unet, sources.tasks[task], examples, components, sampler, ids)
    return probes
