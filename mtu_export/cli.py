"""The `mtu-export` command line: parse options -> config -> one library call -> a short report.

Known problems (MtuError) print one `error:` line and exit with the error's code, and so do usage errors (an
unknown option, a missing argument, a value of the wrong type: exit 3, as ConfigError); nothing imports this module.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # older typer depends on click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

# diffusers logs a warning at import time about optimum's two distributions; keep the CLI's output to results.
# Users who want diffusers' logs back set DIFFUSERS_VERBOSITY themselves.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from mtu_export.config import MoEConfig
from mtu_export.errors import ConfigError, MtuError

console = Console(soft_wrap=True)  # one result line per message, however narrow the terminal
stderr = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def _print_error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


class OneLineUsageErrors(TyperGroup):
    """Parse errors as one `error:` line and exit 3, like every ConfigError, instead of click's boxed usage text and
    exit 2. `main` is what both `mtu-export` and typer's CliRunner call; `--help` still prints help and exits 0."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code, or a command's value
        except NoArgsIsHelpError as exc:  # bare `mtu-export`: the help (rich has printed it already), exit 3
            if exc.format_message().strip():
                print(exc.format_message(), file=sys.stderr)
            sys.exit(ConfigError.exit_code)
        except UsageError as exc:
            message = " ".join(exc.format_message().split()).rstrip(".")
            where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else "; see --help"
            _print_error(f"{message[:1].lower()}{message[1:]}{where}")
            sys.exit(ConfigError.exit_code)
        except ClickException as exc:
            _print_error(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mtu-export",
    help="Multi-Task Upcycling for diffusion UNets: upcycle, fold exactly, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineUsageErrors,
)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
DataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="TASK=PATH: a local dataset for a task (image folder with metadata.jsonl/.csv, .parquet, .jsonl, .csv "
        "or a save_to_disk folder); repeat per task. Tasks without one use the shapes world.",
    ),
]
ColumnOption = Annotated[
    list[str] | None,
    typer.Option("--column", help="TASK.ROLE=NAME: read ROLE (image, prompt, source, mask, low_res) from column NAME."),
]


def _data(data: list[str] | None, columns: list[str] | None) -> dict:
    from mtu_export.data import parse_data

    return parse_data(data, columns)


def _separate(out: Path | None, *inputs: Path | str | None, data: dict | None = None, option: str = "--out") -> None:
    """Refuse an output overlapping anything the command reads, `--data` datasets included (storage.check_separate);
    for library calls that do not check every input themselves."""
    from mtu_export.storage import check_separate

    if out is not None:
        check_separate(out, *inputs, *(spec.path for spec in (data or {}).values()), option=option)


def _parse_tasks(text: str, source: Path):
    """Task specs with the built-ins' channels for the model at `source` (its latent channels and VAE factor)."""
    from mtu_export.data import task_geometry
    from mtu_export.tasks import parse_tasks

    return parse_tasks(text, *task_geometry(source))


def handles_errors(command: F) -> F:
    """Turn an MtuError into one line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MtuError as exc:
            _print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # disk full, permissions, a path that became a file: no traceback either
            where = f" ({exc.filename})" if exc.filename else ""
            _print_error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@handles_errors
def upcycle(
    source: Annotated[Path, typer.Argument(help="Diffusers UNet folder, or pipeline folder with unet/.")],
    out: OutOption,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated tasks: built-ins t2i, edit, sr, inpaint (their own channels), or a new "
            "image-conditioned task `name:8` (latent + source latent, as InstructPix2Pix)."
        ),
    ] = "t2i,edit,sr,inpaint",
    experts: Annotated[int, typer.Option(help="Experts per FFN (N); must divide the FFN hidden width.")] = 4,
    task_embed_dim: Annotated[int, typer.Option(help="Width of the learned task embedding.")] = 64,
    router_hidden_dim: Annotated[int, typer.Option(help="Hidden width of each layer's router MLP.")] = 64,
    overwrite: OverwriteOption = False,
) -> None:
    """Turn a pretrained diffusers UNet into a multi-task MTU checkpoint (exact at initialisation)."""
    from mtu_export.upcycle import describe, upcycle_folder

    config = MoEConfig(_parse_tasks(tasks, source), experts, task_embed_dim, router_hidden_dim)
    with console.status(f"upcycling {source} ..."):
        ckpt = upcycle_folder(source, out, config, overwrite=overwrite)
    summary = describe(ckpt.model)
    params = summary["parameters"]
    console.print(
        f"wrote {ckpt.path}: {summary['moe_layers']} FFNs -> {experts} experts each, tasks "
        f"{', '.join(config.task_names)}; {params['total']:,} parameters ({params['trainable']:,} trainable)"
        + ("; pipeline components kept" if ckpt.pipeline_dir else "")
    )


@app.command()
@handles_errors
def fold(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder (from `mtu-export upcycle` or train).")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task to fold.")],
    out: OutOption,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold one task into a vanilla diffusers UNet (or a full pipeline folder when the checkpoint has one)."""
    from mtu_export.fold import fold_checkpoint

    with console.status(f"folding task {task!r} of {checkpoint} ..."):
        result = fold_checkpoint(checkpoint, task, out, overwrite=overwrite)
    console.print(
        f"wrote {result.path}: task {task!r} as a plain diffusers UNet2DConditionModel "
        f"(max |folded - routed| = {result.max_abs_diff:.2e})"
    )


@app.command()
@handles_errors
def info(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show what an MTU checkpoint holds: tasks, experts, parameters and per-layer routing weights."""
    from mtu_export.upcycle import describe, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    summary = describe(ckpt.model)
    if as_json:
        console.print_json(json.dumps(summary))
        return
    params = summary["parameters"]
    console.print(f"[bold]{checkpoint}[/]")
    console.print("tasks: " + ", ".join(f"{t['name']} ({t['in_channels']} ch)" for t in summary["tasks"]))
    console.print(
        f"experts per FFN: {summary['num_experts']}, MoE layers: {summary['moe_layers']}, "
        f"task embedding {summary['task_embed_dim']}, router hidden {summary['router_hidden_dim']}"
    )
    console.print(
        f"parameters: {params['total']:,} total, {params['trainable']:,} trainable, {params['frozen']:,} frozen"
    )
    console.print(_routing_table(summary))


@app.command()
@handles_errors
def world(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG file to write.")] = None,
    task: Annotated[str, typer.Option(help="t2i, edit, sr, inpaint, or all (one column block per task).")] = "all",
    split: Annotated[str, typer.Option(help="train, heldout or unseen.")] = "train",
    count: Annotated[int, typer.Option(min=1, help="Examples per task (a grid shows at most 64).")] = 8,
    start: Annotated[int, typer.Option(min=0, help="Index of the first example.")] = 0,
    export_dataset: Annotated[
        Path | None, typer.Option(help="Write --count examples of --task as an image-folder dataset here instead.")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Render a PNG grid of shapes-world examples (inputs, then the target, per row; a block per task), or write
    them as a dataset folder that `--data` reads (--export-dataset)."""
    from mtu_export.errors import ConfigError

    if (out is None) == (export_dataset is None):
        raise ConfigError("give --out PNG (a grid) or --export-dataset DIR (a dataset), one of the two")
    if export_dataset is not None:
        from mtu_export.data import export_world_dataset

        path = export_world_dataset(export_dataset, task, split, count, overwrite=overwrite, start=start)
        console.print(
            f"wrote {path}: {count} {task} examples of the {split} split from index {start} (images/ + metadata.jsonl)"
        )
        return
    if count > 64:
        raise ConfigError(f"a grid shows at most 64 examples per task, got --count {count}")
    from mtu_export.world_grid import write_grid

    path = write_grid(out, task, split, count, start, overwrite=overwrite)
    console.print(f"wrote {path}")


@app.command("pack")
@handles_errors
def pack(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder.")],
    out: OutOption,
    pipeline_ref: Annotated[
        str, typer.Option(help="Pipeline folder to share, as a path relative to --out (e.g. ../shapes-base).")
    ],
    dtype: Annotated[str, typer.Option(help="Weights dtype: fp16, bf16 or fp32.")] = "fp16",
    overwrite: OverwriteOption = False,
) -> None:
    """Re-save a checkpoint for shipping: weights in --dtype, the base pipeline shared by reference, not copied."""
    from mtu_export.upcycle import pack_checkpoint

    console.print(f"wrote {pack_checkpoint(checkpoint, out, pipeline_ref, dtype, overwrite)}")


@app.command()
@handles_errors
def pretrain(
    out: OutOption,
    recipe: Annotated[Path, typer.Option(help="Base-model recipe (TOML).")] = Path("models/shapes-base.toml"),
    work: Annotated[Path, typer.Option(help="Work folder: stage outputs and resumable checkpoints.")] = Path(
        "runs/shapes-base"
    ),
    dtype: Annotated[str, typer.Option(help="Weights dtype of the written pipeline: fp16 or fp32.")] = "fp16",
    overwrite: OverwriteOption = False,
) -> None:
    """Train the shapes-world base pipeline (VAE, text encoder, UNet) from scratch; re-run to resume."""
    from mtu_export.errors import ConfigError
    from mtu_export.pretrain import pretrain as run

    if dtype not in ("fp16", "fp32"):
        raise ConfigError(f"--dtype must be fp16 or fp32, got {dtype!r}")
    _separate(out, recipe)
    path = run(recipe, work, out, overwrite=overwrite, dtype=dtype)
    console.print(f"wrote {path}")


@app.command()
@handles_errors
def train(
    base: Annotated[Path, typer.Argument(help="Base pipeline folder (e.g. models/shapes-base).")],
    out: OutOption,
    work: Annotated[Path, typer.Option(help="Work folder: caches, resumable checkpoints, the JSON-lines log.")],
    tasks: Annotated[str, typer.Option(help="Tasks, optionally with channels (sr:7).")] = "t2i,edit,sr,inpaint",
    experts: Annotated[int, typer.Option(help="Experts per FFN (N).")] = 4,
    single_task: Annotated[str | None, typer.Option(help="Train the single-task baseline of this task.")] = None,
    trainable: Annotated[
        str | None, typer.Option(help="mtu (the paper's split) or full; default mtu, full with --single-task.")
    ] = None,
    task_weights: Annotated[
        str | None, typer.Option(help="Sampling weights, e.g. t2i=1,edit=2,sr=1,inpaint=2.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Rows per step, split across tasks by weight.")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    input_lr_scale: Annotated[
        float, typer.Option(help="Learning-rate multiplier for conv_in (its condition channels start at zero).")
    ] = 1.0,
    cfg_dropout: Annotated[float, typer.Option(help="InstructPix2Pix-style condition dropout p.")] = 0.05,
    min_snr_gamma: Annotated[
        float, typer.Option(help="Min-SNR loss weighting gamma; 0 weighs every timestep alike.")
    ] = 5.0,
    cache_size: Annotated[int, typer.Option(help="Train examples per task, VAE-encoded once.")] = 4000,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 250,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and noise.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --work.")] = False,
    stop_at: Annotated[int | None, typer.Option(help="End this call after this step (resume later).")] = None,
    data: DataOption = None,
    column: ColumnOption = None,
    resolution: Annotated[
        int | None, typer.Option(help="Training images in pixels (default: the UNet's sample size x VAE factor).")
    ] = None,
    mixed_precision: Annotated[str, typer.Option(help="accelerate autocast: no, fp16 (GPU) or bf16.")] = "no",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward (less memory, slower).")
    ] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Train an MTU checkpoint (or a single-task baseline) on your --data datasets or the shapes world, on
    accelerate; `accelerate launch` runs the same command on several processes."""
    from mtu_export.config import TrainConfig
    from mtu_export.train import train as run

    specs = _parse_tasks(tasks, base)
    data_specs = _data(data, column)
    _separate(out, base, data=data_specs)
    config = TrainConfig(
        tasks=specs,
        num_experts=experts,
        single_task=single_task,
        trainable=trainable or ("full" if single_task else "mtu"),
        task_weights=_parse_weights(task_weights, [t.name for t in specs]) if task_weights else None,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        input_lr_scale=input_lr_scale,
        cfg_dropout=cfg_dropout,
        min_snr_gamma=min_snr_gamma,
        cache_size=cache_size,
        checkpoint_every=checkpoint_every,
        seed=seed,
        stop_at=stop_at,
        data=tuple(data_specs.values()),
        resolution=resolution,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
    )
    path = run(config, base, work, out, resume=resume, overwrite=overwrite)
    console.print(f"wrote {path}" if path else f"stopped at step {stop_at}; continue with --resume")


def _parse_weights(text: str, names: list[str]) -> tuple[float, ...]:
    from mtu_export.config import did_you_mean
    from mtu_export.errors import ConfigError

    weights = dict.fromkeys(names, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in weights:
            raise ConfigError(f"--task-weights names {name!r}, not a trained task{did_you_mean(name, names)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--task-weights: {item!r} is not task=number, as in 'edit=2'") from None
    return tuple(weights.values())


@app.command("eval")
@handles_errors
def evaluate(
    pipeline: Annotated[
        Path, typer.Argument(help="A StableDiffusionPipeline folder (models/shapes-base) or an MTU checkpoint.")
    ],
    task: Annotated[str, typer.Option(help="Checkpoints: a task, or all.")] = "all",
    split: Annotated[str, typer.Option(help="train, heldout or unseen.")] = "heldout",
    count: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 200,
    first: Annotated[int, typer.Option(min=0, help="Index of the first scene.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    image_guidance: Annotated[float, typer.Option(help="Image guidance scale (edit, sr).")] = 1.5,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    grid: Annotated[Path | None, typer.Option(help="Also write a PNG of generated images.")] = None,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing --json / --grid files.")] = False,
) -> None:
    """Measure a shapes-world pipeline (VAE PSNR, text-to-image scene-reader accuracy) or every task of an MTU
    checkpoint (PSNR / SSIM to ground truth, scene-reader accuracy, the bicubic floor for sr)."""
    from mtu_export.evaluate import EvalConfig, check_outputs, evaluate_base, write_outputs

    config = EvalConfig(split=split, count=count, first=first, steps=steps, guidance=guidance, seed=seed)
    specs = _data(data, column)
    check_outputs(pipeline, json_out, grid, overwrite, specs)
    if (pipeline / "mtu_config.json").is_file():
        _evaluate_checkpoint(pipeline, task, config, image_guidance, json_out, grid, specs, overwrite)
        return
    if specs:
        from mtu_export.errors import ConfigError

        raise ConfigError("--data evaluates a checkpoint's tasks; a base pipeline is scored on the shapes world")
    result, images = evaluate_base(pipeline, config, grid_count=32 if grid else 0)
    vae, acc = result["vae"], result["t2i_accuracy"]
    console.print(f"VAE reconstruction on {split}: {vae['psnr_mean_db']:.2f} dB mean, {vae['psnr_min_db']:.2f} worst")
    ceiling = vae["reader_accuracy_on_reconstructions"]
    shown = ", ".join(f"{k} {100 * v:.1f} %" for k, v in ceiling.items())
    console.print(f"scene reader on those reconstructions (the ceiling through this VAE): {shown}")
    table = Table(title=f"t2i attribute accuracy on {split} ({count} captions, {steps} steps, cfg {guidance})")
    for key in acc:
        table.add_column(key, justify="right")
    table.add_row(*(f"{100 * v:.1f} %" for v in acc.values()))
    console.print(table)
    for path in write_outputs(json_out, grid, result, images, overwrite):
        console.print(f"wrote {path}")


@app.command("parity")
@handles_errors
def parity_report(
    mtu: Annotated[Path, typer.Argument(help="The MTU checkpoint.")],
    baseline: Annotated[list[str], typer.Option(help="TASK=CHECKPOINT of a single-task baseline (repeat).")],
    out: OutOption,
    split: Annotated[str, typer.Option(help="train, heldout or unseen.")] = "heldout",
    count: Annotated[int, typer.Option(min=1, help="Examples per task.")] = 200,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Text guidance scale.")] = 7.5,
    image_guidance: Annotated[float, typer.Option(help="Image guidance scale (edit, sr).")] = 1.5,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """MTU vs single-task baselines, task by task: parity.json, parity.md and a grid per task
    (input | MTU | single-task | ground truth)."""
    from mtu_export.evaluate import EvalConfig
    from mtu_export.parity import write_report
    from mtu_export.sample import SamplerConfig

    baselines = dict(_task_path(item) for item in baseline)
    specs = _data(data, column)
    _separate(out, mtu, *baselines.values(), data=specs)
    config = EvalConfig(split=split, count=count, steps=steps, guidance=guidance, seed=seed)
    sampler = SamplerConfig(steps, guidance, image_guidance, seed)
    report = write_report(mtu, baselines, config, sampler, out, overwrite, specs)
    for task, entry in report["parity"].items():
        row = entry["metrics"][entry["primary"]]
        ratio = f"MTU {row['mtu']:.4f} / single {row['single']:.4f} = {row['ratio']:.4f}"
        console.print(f"{task}: {entry['primary']} {ratio}")
    console.print(f"wrote {out}/parity.md")


def _evaluate_checkpoint(
    path: Path, task: str, config, image_guidance: float, json_out, grid, data, overwrite: bool
) -> None:
    from mtu_export.evaluate import evaluate_checkpoint, write_outputs
    from mtu_export.sample import SamplerConfig

    sampler = SamplerConfig(config.steps, config.guidance, image_guidance, config.seed)
    results, images, _ = evaluate_checkpoint(path, config, sampler, None if task == "all" else (task,), data=data)
    where = ", ".join(f"{t}: {spec.path}" for t, spec in data.items())
    shown = f"{config.split}" + (f" (--data {where})" if where else "")
    table = Table(title=f"{path} on {shown} ({config.count} examples, {config.steps} steps)")
    for column in ("task", "psnr", "ssim", "psnr_mask", "reader_accuracy", "bicubic_psnr"):
        table.add_column(column, justify="right")
    for name, row in results.items():
        cells = [row.get(k) for k in ("psnr", "ssim", "psnr_mask", "reader_accuracy", "bicubic_psnr")]
        table.add_row(name, *("" if v is None else f"{v:.3f}" for v in cells))
    console.print(table)
    settings = {"split": config.split, "first": config.first, "count": config.count, "steps": config.steps}
    settings |= {"guidance": config.guidance, "image_guidance": image_guidance, "seed": config.seed}
    settings["data"] = {t: spec.path for t, spec in data.items()}
    first = [im for name in results for im in images[name][:8]]
    report = {"checkpoint": str(path), **settings, "tasks": results}
    for written in write_outputs(json_out, grid, report, first, overwrite):
        console.print(f"wrote {written}")


# ---------------------------------------------------------------------------------------------------------- export
TaskArg = Annotated[str, typer.Option("--task", help="A task of the checkpoint, or all (one bundle, shared weights).")]


def _export_config(task: str, **options):
    from mtu_export.config import ExportConfig

    tasks = () if task == "all" else tuple(t.strip() for t in task.split(",") if t.strip())
    if len(tasks) > 1:
        from mtu_export.errors import ConfigError

        raise ConfigError(f"--task takes one task or all, got {task!r}; run once per task or use --task all")
    return ExportConfig(tasks=tasks, **options)


@app.command("onnx")
@handles_errors
def onnx_command(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder (from upcycle or train).")],
    out: OutOption,
    task: TaskArg = "all",
    opset: Annotated[int, typer.Option(help="ONNX opset (14-21).")] = 18,
    dynamo: Annotated[bool, typer.Option(help="Use torch.onnx's dynamo exporter (opset >= 18).")] = False,
    fixed_shapes: Annotated[
        bool, typer.Option(help="Fix batch (UNet: the guidance batch), height and width instead of dynamic axes.")
    ] = False,
    height: Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")] = None,
    external_data: Annotated[
        bool | None, typer.Option(help="Weights in model.onnx_data (default: only past 2 GB).")
    ] = None,
    quantize: Annotated[str, typer.Option(help="UNet: none, dynamic-int8, static-int8 or fp16.")] = "none",
    attention: Annotated[
        str, typer.Option(help="UNet attention: default (exported ops) or fused (onnxruntime MultiHeadAttention).")
    ] = "default",
    allow_drift: Annotated[bool, typer.Option(help="Keep an export whose graphs drift from torch.")] = False,
    image_count: Annotated[int, typer.Option(min=0, help="Images per task in the end-to-end check (0: skip).")] = 2,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold and export to ONNX in optimum's folder layout, validating every graph against torch."""
    from mtu_export.export.onnx import export_onnx

    config = _export_config(
        task,
        opset=opset,
        dynamo=dynamo,
        fixed_shapes=fixed_shapes,
        height=height,
        width=width,
        external_data=external_data,
        quantize=quantize,
        attention=attention,
        allow_drift=allow_drift,
        image_count=image_count,
    )
    specs = _data(data, column)
    _separate(out, checkpoint, data=specs)  # the export checks the checkpoint and its pipeline, not --data
    manifest = export_onnx(
        checkpoint, config, out, overwrite=overwrite, log=lambda m: console.print(escape(m)), data=specs
    )
    _print_export_report(manifest)
    console.print(f"wrote {out} (manifest: {out / 'manifest.json'})")


@app.command("coreml")
@handles_errors
def coreml_command(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder (from upcycle or train).")],
    out: OutOption,
    task: TaskArg = "all",
    target: Annotated[str, typer.Option(help="Minimum deployment target: iOS17 or iOS18 (all tasks: iOS18).")] = "",
    compute_precision: Annotated[str, typer.Option(help="fp16 or fp32 compute.")] = "fp16",
    height: Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")] = None,
    quantize: Annotated[str, typer.Option(help="UNet: none, int8, palettize-6, palettize-4, int4-block.")] = "none",
    allow_drift: Annotated[bool, typer.Option(help="Keep packages that drift from torch (macOS check).")] = False,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold and convert to Core ML .mlpackages (a multifunction UNet for all tasks); structure checked here,
    numbers compared with torch on macOS."""
    from mtu_export.export.coreml import export_coreml

    chosen = target or ("iOS18" if task == "all" else "iOS17")
    config = _export_config(
        task,
        target=chosen,
        compute_precision=compute_precision,
        height=height,
        width=width,
        quantize=quantize,
        allow_drift=allow_drift,
    )
    specs = _data(data, column)
    _separate(out, checkpoint, data=specs)  # the export checks the checkpoint and its pipeline, not --data
    manifest = export_coreml(
        checkpoint, config, out, overwrite=overwrite, log=lambda m: console.print(escape(m)), data=specs
    )
    table = Table(title="Core ML packages (reloaded, spec read)")
    for column in ("package", "functions", "inputs", "outputs", "ops", "MB"):
        table.add_column(column)
    for name, info in manifest["packages"].items():
        ops = sum(sum(f["ops"].values()) for f in info["functions"].values())
        table.add_row(
            name,
            ",".join(info["functions"]),
            ",".join(info["inputs"]),
            ",".join(info["outputs"]),
            str(ops),
            f"{info['bytes'] / 1e6:.2f}",
        )
    console.print(table)
    parity = manifest["parity"]
    console.print(escape(parity["skipped"]) if "skipped" in parity else f"{len(parity['rows'])} outputs compared")
    console.print(f"wrote {out} (manifest: {out / 'manifest.json'})")


@app.command("generate")
@handles_errors
def generate_command(
    export_dir: Annotated[Path, typer.Argument(help="A folder written by `mtu-export onnx`.")],
    task: Annotated[str, typer.Option(help="The task to run.")],
    prompt: Annotated[str, typer.Option(help="Caption or edit instruction.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Image to write: .png, .jpg / .jpeg or .webp.")],
    image: Annotated[Path | None, typer.Option(help="Input image (edit: source, sr: low-res, inpaint).")] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask (white = repaint).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Text guidance scale.")] = 3.0,
    image_guidance: Annotated[float, typer.Option(help="Image guidance scale (edit, sr).")] = 1.5,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="onnxruntime intra-op threads.")] = None,
    optimum: Annotated[bool, typer.Option(help="Use optimum's ORT pipelines for t2i / inpaint exports.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Run an exported task end to end on onnxruntime and write an image (same seed, same image)."""
    from rich.progress import Progress

    from mtu_export.generate import GenerateRequest, generate

    for path in (image, mask):
        if path is not None and not path.is_file():
            from mtu_export.errors import InputError

            raise InputError(f"{path} is not a file; pass an existing PNG")
    request = GenerateRequest(task, prompt, image, mask, steps, guidance, image_guidance, seed, threads, optimum)
    with Progress(console=stderr, transient=True) as bar:
        job = bar.add_task(f"{task}: sampling", total=steps)
        runner = generate(
            export_dir,
            request,
            out,
            progress=lambda i, n: bar.update(job, completed=min(i, n)),
            overwrite=overwrite,
            log=lambda m: stderr.print(escape(m), highlight=False, soft_wrap=True),
        )
    console.print(f"wrote {out} ({runner}, {steps} steps, seed {seed})")


def _print_export_report(manifest: dict) -> None:
    table = Table(title="exported graphs vs torch (trajectory inputs)")
    for column in ("graph", "output", "feeds", "max |diff|", "PSNR dB", "floor", "ok"):
        table.add_column(column, justify="right" if column not in ("graph", "output") else "left")
    for row in manifest["graph_parity"]:
        graph = escape(row["component"] + (f" {row['task']}" if row["task"] else ""))
        psnr = "exact" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        ok = "yes" if row["ok"] else "[red]NO[/]"
        table.add_row(
            graph, row["output"], str(row["feeds"]), f"{row['max_abs_diff']:.2e}", psnr, f"{row['floor_db']:.0f}", ok
        )
    console.print(table)
    for row in manifest["image_parity"]:
        psnr = "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB"
        goal = "" if row["meets_goal"] else f" [red]below the {manifest['image_psnr_goal_db']:.0f} dB goal[/]"
        console.print(f"{row['task']}: end-to-end images vs torch fp32: {psnr}{goal}")
    if manifest.get("sizes"):
        s = manifest["sizes"]
        console.print(
            f"bundle of {s['tasks']} tasks: {s['bundle_bytes'] / 1e6:.2f} MB = {s['ratio']:.3f} x one single-task "
            f"export ({s['single_task_bytes'] / 1e6:.2f} MB); UNet {s['unet_ratio']:.3f} x"
        )


# ----------------------------------------------------------------------------------------------------------- bench
@app.command("bench")
@handles_errors
def bench_command(
    checkpoint: Annotated[Path | None, typer.Argument(help="MTU checkpoint to measure.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("benchmarks/results"),
    baseline: Annotated[
        list[str] | None, typer.Option(help="TASK=CHECKPOINT of a trained single-task baseline.")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base pipeline (default: the one the checkpoint was trained from).")
    ] = None,
    parity: Annotated[
        Path | None, typer.Option(help="parity.json of `mtu-export parity`, quoted in the report.")
    ] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (2: phone-class).")] = 2,
    repeats: Annotated[int, typer.Option(help="Interleaved A/B pairs (end to end, quantization modes).")] = 25,
    rounds: Annotated[int, typer.Option(help="UNet latency: rounds, each opening both graphs afresh.")] = 8,
    pairs: Annotated[int, typer.Option(help="UNet latency: interleaved A/B calls per round.")] = 100,
    warmup: Annotated[int, typer.Option(help="Warm-up runs of each graph.")] = 3,
    steps: Annotated[int, typer.Option(help="Sampling steps of the end-to-end latency.")] = 10,
    modes: Annotated[str, typer.Option(help="Quantization modes timed against fp32 (comma list, or none).")] = ",".join(
        ("dynamic-int8", "static-int8", "fp16")
    ),
    image_count: Annotated[int, typer.Option(min=0, help="Images per task in each export's quality check.")] = 2,
    check: Annotated[Path | None, typer.Option(help="Fail (exit 7) on any violation of this baseline JSON.")] = None,
    results: Annotated[Path | None, typer.Option(help="Check this bench.json instead of measuring.")] = None,
    save_baseline: Annotated[Path | None, typer.Option(help="Write a CI baseline from this run.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing bench.json/.md/.png in --out and --save-baseline.")
    ] = False,
) -> None:
    """Folded MTU vs single-task UNets side by side (latency, GFLOPs, size, memory, quality) -> JSON, Markdown,
    PNG; with --check, a CI gate on ratios measured in the same run."""
    from mtu_export.bench.gate import enforce, make_baseline, read_baseline
    from mtu_export.bench.run import BenchConfig, bench
    from mtu_export.errors import ConfigError
    from mtu_export.storage import check_output, read_json, write_json

    gate = read_baseline(check) if check is not None else None  # a broken baseline fails now, not after measuring
    if save_baseline is not None:  # refused now, not after measuring
        _separate(save_baseline, check, results, option="--save-baseline")
        check_output(save_baseline, overwrite)
    if results is not None:
        report = read_json(results)
    else:
        if checkpoint is None:
            raise ConfigError("give an MTU checkpoint to measure, or --results bench.json to check")
        chosen = tuple(m.strip() for m in modes.split(",") if m.strip() and m.strip() != "none")
        config = BenchConfig(
            threads=threads,
            repeats=repeats,
            rounds=rounds,
            pairs=pairs,
            warmup=warmup,
            e2e_steps=steps,
            modes=chosen,
            image_count=image_count,
        )
        baselines = dict(_task_path(item) for item in baseline or [])
        report = bench(
            checkpoint,
            out,
            config,
            baselines,
            base,
            parity,
            log=lambda m: console.print(escape(m)),
            overwrite=overwrite,
        )
        console.print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
        for task, row in report["tasks"].items():
            lat = row["unet_latency"]["mtu_vs_single"]
            console.print(f"{task}: folded / single-task UNet latency {lat['ratio']:.3f}, {row['gflops']:.4f} GFLOPs")
        console.print(f"bundle bytes / one model: {report['bundle']['size_ratio']:.3f}")
    if save_baseline is not None:
        check_output(save_baseline, overwrite)
        write_json(save_baseline, make_baseline(report))
        console.print(f"wrote {save_baseline}")
    if check is not None:
        violation = lambda p: stderr.print(f"[bold red]violation:[/] {escape(p)}", highlight=False)  # noqa: E731
        enforce(report, gate, check, on_violation=violation)
        console.print(f"bench check passed against {check}")


@app.command("bench-train")
@handles_errors
def bench_train(
    base: Annotated[Path, typer.Argument(help="Base pipeline folder (e.g. models/shapes-base).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON to write.")] = Path(
        "benchmarks/results/train_step.json"
    ),
    batch_size: Annotated[int, typer.Option(min=4, help="Rows per step (mixed tasks).")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved step pairs.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Training throughput: an MTU step (experts, routers, task LNs, conv_ins) ÷ a full fine-tune step, same batch."""
    from mtu_export.bench.train_step import train_step_ratio
    from mtu_export.storage import check_output, write_json

    _separate(out, base)
    check_output(out, overwrite)  # refused now, not after measuring
    result = train_step_ratio(base, batch_size, repeats, log=lambda m: console.print(escape(m)))
    check_output(out, overwrite)
    write_json(out, result)
    t = result["mtu_vs_full"]
    console.print(
        f"MTU step {t['a_median_ms']:.0f} ms vs full fine-tune {t['b_median_ms']:.0f} ms: ratio {t['ratio']:.3f} "
        f"({result['trainable_parameters']['mtu']:,} vs {result['trainable_parameters']['full']:,} trainable); "
        f"wrote {out}"
    )


def _task_path(item: str) -> tuple[str, Path]:
    from mtu_export.errors import ConfigError

    task, _, path = item.partition("=")
    if not path:
        raise ConfigError(f"--baseline {item!r} is not TASK=CHECKPOINT, as in 'edit=models/shapes-single-edit'")
    return task, Path(path)


def _routing_table(summary: dict) -> Table:
    tasks = [t["name"] for t in summary["tasks"]]
    table = Table(title="routing probabilities per layer, % per expert 1..N")
    table.add_column("layer")
    for task in tasks:
        table.add_column(task, justify="right")
    for layer, per_task in summary["routing"].items():
        table.add_row(_short_layer(layer), *(" ".join(f"{100 * p:2.0f}" for p in per_task[task]) for task in tasks))
    return table


def _short_layer(name: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.2.ff` -> `down1.a0.t2`."""
    pairs = (("transformer_blocks.", "t"), ("down_blocks.", "down"), ("up_blocks.", "up"), ("attentions.", "a"))
    for long, short in pairs:
        name = name.replace(long, short)
    return name.replace("mid_block.", "mid.").removesuffix(".ff")


def main() -> None:
    app(prog_name="mtu-export")  # also under `python -m mtu_export.cli` (accelerate launch), for the hints


if __name__ == "__main__":
    main()
