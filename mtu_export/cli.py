"""The `mtu-export` command line: parse options -> config -> one library call -> a short report (display.py).

Defaults and checks live in the configs and library functions, so Python callers get the same behaviour. Known
problems (MtuError) print one `error:` line and exit with the error's code, and so do usage errors (an unknown
option, a missing argument, a value of the wrong type: exit 3, as ConfigError); nothing imports this module.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

# diffusers logs a warning at import time about optimum's two distributions; keep the CLI's output to results.
# Users who want diffusers' logs back set DIFFUSERS_VERBOSITY themselves.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from mtu_export import display
from mtu_export.config import MoEConfig
from mtu_export.display import OneLineUsageErrors, console, handles_errors, stderr
from mtu_export.errors import ConfigError

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
PruneBelowOption = Annotated[
    float,
    typer.Option(help="Sparse fold: drop experts whose routing probability is under this (0: only weight-0 experts)."),
]
FfnBudgetOption = Annotated[
    float, typer.Option(help="Sparse fold: keep each FFN's heaviest experts, at most this fraction of its width.")
]
RenormalizeOption = Annotated[
    bool, typer.Option(help="Sparse fold: rescale the kept experts' weights to the full mixture's sum.")
]
ColumnOption = Annotated[
    list[str] | None,
    typer.Option("--column", help="TASK.ROLE=NAME: read ROLE (image, prompt, source, mask, low_res) from column NAME."),
]


def _data(data: list[str] | None, columns: list[str] | None) -> dict:
    from mtu_export.data import parse_data

    return parse_data(data, columns)


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
    from mtu_export.checkpoint import upcycle_folder
    from mtu_export.data import model_tasks_for
    from mtu_export.upcycle import describe

    config = MoEConfig(model_tasks_for(tasks, source), experts, task_embed_dim, router_hidden_dim)
    with console.status(f"upcycling {source} ..."):
        ckpt = upcycle_folder(source, out, config, overwrite=overwrite)
    display.print_upcycled(ckpt, describe(ckpt.model))


@app.command()
@handles_errors
def fold(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder (from `mtu-export upcycle` or train).")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task to fold.")],
    out: OutOption,
    prune_below: PruneBelowOption = 0.0,
    ffn_budget: FfnBudgetOption = 1.0,
    renormalize: RenormalizeOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold one task into a vanilla diffusers UNet (or a full pipeline folder when the checkpoint has one); with
    --prune-below / --ffn-budget, or a --route top-k model, into one with narrower FFNs."""
    from mtu_export.config import SparseFold
    from mtu_export.fold import fold_checkpoint

    sparse = SparseFold(prune_below, ffn_budget, renormalize)
    with console.status(f"folding task {task!r} of {checkpoint} ..."):
        result = fold_checkpoint(checkpoint, task, out, overwrite=overwrite, sparse=sparse)
    display.print_folded(result, task)


@app.command()
@handles_errors
def info(
    checkpoint: Annotated[Path, typer.Argument(help="MTU checkpoint folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show what an MTU checkpoint holds: tasks, experts, parameters and per-layer routing weights."""
    from mtu_export.checkpoint import load_checkpoint
    from mtu_export.upcycle import describe

    display.print_info(checkpoint, describe(load_checkpoint(checkpoint).model), as_json)


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
    if (out is None) == (export_dataset is None):
        raise ConfigError("give --out PNG (a grid) or --export-dataset DIR (a dataset), one of the two")
    if export_dataset is not None:
        from mtu_export.data import export_world_dataset

        path = export_world_dataset(export_dataset, task, split, count, overwrite=overwrite, start=start)
        return display.print_world_dataset(path, task, split, count, start)
    from mtu_export.shapes.world_grid import write_grid

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
    trained_only: Annotated[
        bool,
        typer.Option(
            help="Keep only the tensors training changed; the rest is read from the shared pipeline's UNet, "
            "whose SHA-256 is recorded and checked on load."
        ),
    ] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Re-save a checkpoint for shipping: weights in --dtype, the base pipeline shared by reference, not copied."""
    from mtu_export.checkpoint import pack_checkpoint

    console.print(f"wrote {pack_checkpoint(checkpoint, out, pipeline_ref, dtype, overwrite, trained_only)}")


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
    from mtu_export.shapes.pretrain import pretrain as run

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
    route: Annotated[
        str, typer.Option(help="dense (soft mixture) or top-k: each task uses its k heaviest experts.")
    ] = ("dense"),
    single_task: Annotated[str | None, typer.Option(help="Train the single-task baseline of this task.")] = None,
    trainable: Annotated[str | None, typer.Option(help="mtu (the paper's split) or full (baselines).")] = None,
    task_weights: Annotated[str | None, typer.Option(help="Sampling weights, e.g. t2i=1,edit=2,sr=1.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Rows per step, split across tasks by weight.")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    input_lr_scale: Annotated[float, typer.Option(help="lr multiplier of conv_in (new channels start at zero).")] = 1.0,
    cfg_dropout: Annotated[float, typer.Option(help="InstructPix2Pix-style condition dropout p.")] = 0.05,
    min_snr_gamma: Annotated[float, typer.Option(help="Min-SNR weighting gamma; 0 weighs all timesteps alike.")] = 5.0,
    cache_size: Annotated[int, typer.Option(help="Train examples per task, VAE-encoded once.")] = 4000,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 250,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and noise.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --work.")] = False,
    stop_at: Annotated[int | None, typer.Option(help="End this call after this step (resume later).")] = None,
    data: DataOption = None,
    column: ColumnOption = None,
    resolution: Annotated[int | None, typer.Option(help="Pixels (default: UNet sample size x VAE factor).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="accelerate autocast: no, fp16 (GPU) or bf16.")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations: less memory, slower.")] = False,
    eval_every: Annotated[int, typer.Option(help="Score held-out scenes every N steps into curve.jsonl (0: off).")] = 0,
    eval_count: Annotated[int, typer.Option(help="Held-out scenes per task in each evaluation.")] = 32,
    eval_steps: Annotated[int, typer.Option(help="Sampling steps of each evaluation.")] = 10,
    eval_first: Annotated[int, typer.Option(help="First held-out index scored (parity reports 0-199).")] = 2000,
    eval_guidance: Annotated[float, typer.Option(help="Text guidance scale of each evaluation.")] = 3.0,
    overwrite: OverwriteOption = False,
) -> None:
    """Train an MTU checkpoint (or a single-task baseline) on your --data datasets or the shapes world, on
    accelerate; `accelerate launch` runs the same command on several processes."""
    from mtu_export.config import TrainConfig, parse_task_weights
    from mtu_export.data import model_tasks_for
    from mtu_export.train import train as run

    specs = model_tasks_for(tasks, base)
    config = TrainConfig(
        tasks=specs,
        num_experts=experts,
        route=route,
        single_task=single_task,
        trainable=trainable,
        task_weights=parse_task_weights(task_weights, [t.name for t in specs]) if task_weights else None,
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
        data=tuple(_data(data, column).values()),
        resolution=resolution,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        eval_every=eval_every,
        eval_count=eval_count,
        eval_steps=eval_steps,
        eval_first=eval_first,
        eval_guidance=eval_guidance,
    )
    path = run(config, base, work, out, resume=resume, overwrite=overwrite)
    console.print(f"wrote {path}" if path else f"stopped at step {stop_at}; continue with --resume")


@app.command()
@handles_errors
def curves(
    runs: Annotated[list[str], typer.Argument(help="NAME=WORK of a run trained with --eval-every (repeat).")],
    out: OutOption,
    overwrite: OverwriteOption = False,
) -> None:
    """Learning curves of training runs, each task's runs side by side: curves.json, curves.md, curves.png."""
    from mtu_export.curves import parse_runs, report_lines, write_curves

    for line in report_lines(write_curves(parse_runs(runs), out, overwrite)):
        console.print(escape(line))
    console.print(f"wrote {out / 'curves.md'}, {out / 'curves.json'}, {out / 'curves.png'}")


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
    prune_below: PruneBelowOption = 0.0,
    ffn_budget: FfnBudgetOption = 1.0,
    renormalize: RenormalizeOption = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing --json / --grid files.")] = False,
) -> None:
    """Measure a shapes-world pipeline (VAE PSNR, text-to-image scene-reader accuracy) or every task of an MTU
    checkpoint (PSNR / SSIM to ground truth, scene-reader accuracy, the bicubic floor for sr); with --prune-below /
    --ffn-budget, each task as its sparse fold runs."""
    from mtu_export.config import SparseFold
    from mtu_export.evaluate import EvalConfig, eval_outputs, evaluate_base
    from mtu_export.sample import SamplerConfig

    sparse = SparseFold(prune_below, ffn_budget, renormalize)
    sampler = SamplerConfig(steps, guidance, image_guidance, seed)
    config = EvalConfig(split, count, first, sampler=sampler, sparse=sparse if sparse.drops_weight else None)
    specs = _data(data, column)
    is_checkpoint = (pipeline / "mtu_config.json").is_file()
    if not is_checkpoint and specs:
        raise ConfigError("--data evaluates a checkpoint's tasks; a base pipeline is scored on the shapes world")
    if not is_checkpoint and config.sparse is not None:
        raise ConfigError("--prune-below / --ffn-budget drop an MTU checkpoint's experts; a base pipeline has none")
    with eval_outputs(pipeline, json_out, grid, overwrite, specs) as write:  # refused before any sampling
        if is_checkpoint:
            written = _evaluate_checkpoint(pipeline, task, config, specs, write)
        else:
            result, images = evaluate_base(pipeline, config, grid_count=32 if grid else 0)
            display.print_base_eval(result, split, count, steps, guidance)
            written = write(result, images)
    for path in written:
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
    config = EvalConfig(split=split, count=count, sampler=SamplerConfig(steps, guidance, image_guidance, seed))
    display.print_parity(write_report(mtu, baselines, config, out, overwrite, specs), out)


def _evaluate_checkpoint(path: Path, task: str, config, data, write) -> list[Path]:
    from mtu_export.evaluate import evaluate_checkpoint, grid_rows

    results, images, examples = evaluate_checkpoint(path, config, None if task == "all" else (task,), data=data)
    display.print_checkpoint_eval(path, results, config.split, config.count, config.sampler.steps, data)
    settings = config.base_record() | {"image_guidance": config.sampler.image_guidance}
    settings["data"] = {t: d.path for t, d in data.items()}
    settings["sparse"] = None if config.sparse is None else asdict(config.sparse)
    report = {"checkpoint": str(path), **settings, "tasks": results}
    return write(report, grid_rows(images, examples), 3)


# ---------------------------------------------------------------------------------------------------------- export
TaskArg = Annotated[str, typer.Option("--task", help="A task of the checkpoint, or all (one bundle, shared weights).")]


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
    quantize: Annotated[str, typer.Option(help="UNet: none, dynamic-int8, static-int8, w8a16 or fp16.")] = "none",
    reduce_range: Annotated[
        bool | None,
        typer.Option(help="int8: 7-bit weights, for x86 CPUs without VNNI (default: on when this machine is one)."),
    ] = None,
    attention: Annotated[
        str, typer.Option(help="UNet attention: default (exported ops) or fused (onnxruntime MultiHeadAttention).")
    ] = "default",
    optimize: Annotated[
        bool, typer.Option(help="Save each graph as onnxruntime's CPU session optimizes it (its fusions done once).")
    ] = False,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx (model.onnx), ort (ONNX Runtime Mobile's model.ort + required_operators.config, no .onnx) "
            "or both.",
        ),
    ] = "onnx",
    batch: Annotated[
        int | None,
        typer.Option(help="1: every graph at fixed shapes, one row per call, as NPUs take them (default: dynamic)."),
    ] = None,
    allow_drift: Annotated[bool, typer.Option(help="Keep an export whose graphs drift from torch.")] = False,
    prune_below: PruneBelowOption = 0.0,
    ffn_budget: FfnBudgetOption = 1.0,
    renormalize: RenormalizeOption = False,
    image_count: Annotated[int, typer.Option(min=0, help="Images per task in the end-to-end check (0: skip).")] = 2,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold and export to ONNX in optimum's folder layout, validating every graph against torch."""
    from mtu_export.config import OnnxConfig, SparseFold
    from mtu_export.export.onnx import export_onnx

    config = OnnxConfig(
        tasks=task,
        opset=opset,
        dynamo=dynamo,
        fixed_shapes=fixed_shapes,
        height=height,
        width=width,
        external_data=external_data,
        quantize=quantize,
        reduce_range=reduce_range,
        attention=attention,
        optimize=optimize,
        format=format,
        batch=batch,
        allow_drift=allow_drift,
        image_count=image_count,
        sparse=SparseFold(prune_below, ffn_budget, renormalize),
    )
    manifest = export_onnx(checkpoint, config, out, overwrite=overwrite, data=_data(data, column))
    display.print_onnx_report(manifest)
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
    attention: Annotated[str, typer.Option(help="UNet attention: default, split-einsum (Apple ANE).")] = "default",
    allow_drift: Annotated[bool, typer.Option(help="Keep packages that drift from torch (macOS check).")] = False,
    layout: Annotated[
        str,
        typer.Option(
            help="default (our packages) or apple (per task, the Resources folder of Apple's Swift StableDiffusion "
            "package: its file names and I/O)."
        ),
    ] = "default",
    prune_below: PruneBelowOption = 0.0,
    ffn_budget: FfnBudgetOption = 1.0,
    renormalize: RenormalizeOption = False,
    data: DataOption = None,
    column: ColumnOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fold and convert to Core ML .mlpackages (a multifunction UNet for all tasks); structure checked here,
    numbers compared with torch on macOS."""
    from mtu_export.config import CoreMLConfig, SparseFold
    from mtu_export.export.coreml import export_coreml

    config = CoreMLConfig(
        tasks=task,
        target=target or None,  # the config's default: iOS18 for all tasks (a multifunction UNet), else iOS17
        compute_precision=compute_precision,
        height=height,
        width=width,
        quantize=quantize,
        attention=attention,
        allow_drift=allow_drift,
        layout=layout,
        sparse=SparseFold(prune_below, ffn_budget, renormalize),
    )
    manifest = export_coreml(checkpoint, config, out, overwrite=overwrite, data=_data(data, column))
    display.print_coreml_report(manifest)
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
    resize: Annotated[
        str,
        typer.Option(
            help="How --image / --mask meet the model: fit (keep the size and aspect, sides rounded to what the "
            "UNet takes) or crop (shorter side to the export's size, centre crop, as training)."
        ),
    ] = "fit",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Run an exported task end to end on onnxruntime and write an image (same seed, same image)."""
    from mtu_export.generate import GenerateRequest, generate

    request = GenerateRequest(
        task, prompt, image, mask, steps, guidance, image_guidance, seed, threads, optimum, resize
    )
    with display.progress(f"{task}: sampling", steps) as advance:
        runner = generate(export_dir, request, out, progress=advance, overwrite=overwrite)
    console.print(f"wrote {out} ({runner}, {steps} steps, seed {seed})")


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
    sparse: Annotated[
        Path | None, typer.Option(help="A --route top-k checkpoint: time each task's sparse fold against single-task.")
    ] = None,
    sparse_eval: Annotated[
        Path | None, typer.Option(help="`mtu-export eval --json` of --sparse, set against --parity's dense MTU.")
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
    from mtu_export.storage import atomic_output, read_json, refuse_output, write_json

    gate = read_baseline(check) if check is not None else None  # a broken baseline fails now, not after measuring
    if save_baseline is not None:  # refused now, not after measuring (written from the report, below)
        refuse_output(save_baseline, [check, results], overwrite, option="--save-baseline")
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
            overwrite=overwrite,
            sparse=sparse,
            sparse_eval=sparse_eval,
        )
        console.print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
        for task, row in report["tasks"].items():
            lat, fused = (row["unet_latency"][k]["ratio"] for k in ("mtu_vs_single", "optimized_vs_plain"))
            shown = f"folded / single {lat:.3f}, optimized / plain {fused:.3f}; {row['gflops']:.4f} GFLOPs"
            if "sparse" in row:
                sparse_row = row["sparse"]
                shown += f"; sparse / single {sparse_row['latency_vs_single']['ratio']:.3f}"
                shown += f" at {sparse_row['gflops_ratio']:.3f}x the GFLOPs"
            console.print(f"{task}: UNet latency {shown}")
        console.print(f"bundle bytes / one model: {report['bundle']['size_ratio']:.3f}")
    if save_baseline is not None:
        with atomic_output(save_baseline, [check, results], overwrite, option="--save-baseline", file=True) as tmp:
            write_json(tmp, make_baseline(report))
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
    from mtu_export.storage import atomic_output, write_json

    with atomic_output(out, [base], overwrite, file=True) as tmp:  # refused now, not after measuring
        result = train_step_ratio(base, batch_size, repeats)
        write_json(tmp, result)
    t = result["mtu_vs_full"]
    console.print(
        f"MTU step {t['a_median_ms']:.0f} ms vs full fine-tune {t['b_median_ms']:.0f} ms: ratio {t['ratio']:.3f} "
        f"({result['trainable_parameters']['mtu']:,} vs {result['trainable_parameters']['full']:,} trainable); "
        f"wrote {out}"
    )


def _task_path(item: str) -> tuple[str, Path]:
    task, _, path = item.partition("=")
    if not path:
        raise ConfigError(f"--baseline {item!r} is not TASK=CHECKPOINT, as in 'edit=models/shapes-single-edit'")
    return task, Path(path)


def main() -> None:
    app(prog_name="mtu-export")  # also under `python -m mtu_export.cli` (accelerate launch), for the hints


if __name__ == "__main__":
    main()
