"""What the `mtu-export` commands show: the two consoles; every known problem (MtuError) and usage error as one
`error:` line and an exit code; rich tables and summary lines of the results library calls return (checkpoint info,
evaluations, export reports). Nothing here computes or decides; only `cli` imports it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # older typer depends on click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from mtu_export import logs
from mtu_export.errors import ConfigError, MtuError

console = Console(soft_wrap=True)  # one result line per message, however narrow the terminal
stderr = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def show_logs() -> None:
    """The package's progress lines (logs.py) on stderr: through rich's logging handler on a terminal, as plain lines
    otherwise (a nohup log, a pipe, CI), so that stdout holds a command's results only."""
    if stderr.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=stderr, show_time=False, show_level=False, show_path=False, markup=False
        )
        handler.setFormatter(logs.formatter())
    else:
        handler = logs.plain_handler()
    logs.install(handler)


@contextlib.contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields the `progress(i, n)` callback a library call reports to."""
    from rich.progress import Progress

    with Progress(console=stderr, transient=True) as bar:
        job = bar.add_task(label, total=total)
        yield lambda i, n: bar.update(job, completed=min(i, n))


# ---------------------------------------------------------------------------------------------------------- errors
def print_error(message: str) -> None:
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
            print_error(f"{message[:1].lower()}{message[1:]}{where}")
            sys.exit(ConfigError.exit_code)
        except ClickException as exc:
            print_error(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def handles_errors(command: F) -> F:
    """Turn an MtuError into one line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        show_logs()
        try:
            return command(*args, **kwargs)
        except MtuError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # disk full, permissions, a path that became a file: no traceback either
            where = f" ({exc.filename})" if exc.filename else ""
            print_error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ checkpoints
def print_upcycled(ckpt, summary: dict) -> None:
    """`mtu-export upcycle`: what was written, from `upcycle.describe` of the new checkpoint."""
    params = summary["parameters"]
    console.print(
        f"wrote {ckpt.path}: {summary['moe_layers']} FFNs -> {summary['num_experts']} experts each, tasks "
        f"{', '.join(t['name'] for t in summary['tasks'])}; {params['total']:,} parameters "
        f"({params['trainable']:,} trainable)" + ("; pipeline components kept" if ckpt.pipeline_dir else "")
    )


def print_folded(result, task: str) -> None:
    kind = "a plain diffusers UNet2DConditionModel"
    if result.ffn_kept < 1.0:
        kind = f"a diffusers UNet with narrowed FFNs ({result.ffn_kept:.0%} of the FFN width kept)"
    console.print(f"wrote {result.path}: task {task!r} as {kind} (max |folded - routed| = {result.max_abs_diff:.2e})")
    if result.dense_deviation is not None:
        console.print(
            f"the dropped experts change the output by {result.dense_deviation:.2e} of its largest value on a random "
            "input: measure the task's metric (mtu-export eval) before shipping it"
        )


def print_info(checkpoint: Path, summary: dict, as_json: bool = False) -> None:
    """`mtu-export info`: tasks, experts, parameter counts and the routing table of `upcycle.describe`."""
    if as_json:
        return console.print_json(json.dumps(summary))
    params = summary["parameters"]
    console.print(f"[bold]{checkpoint}[/]")
    console.print("tasks: " + ", ".join(f"{t['name']} ({t['in_channels']} ch)" for t in summary["tasks"]))
    console.print(
        f"experts per FFN: {summary['num_experts']} ({summary.get('route', 'dense')}), "
        f"MoE layers: {summary['moe_layers']}, task embedding {summary['task_embed_dim']}, "
        f"router hidden {summary['router_hidden_dim']}"
    )
    console.print(
        f"parameters: {params['total']:,} total, {params['trainable']:,} trainable, {params['frozen']:,} frozen"
    )
    console.print(routing_table(summary))


def routing_table(summary: dict) -> Table:
    tasks = [t["name"] for t in summary["tasks"]]
    table = Table(title="routing probabilities per layer, % per expert 1..N")
    table.add_column("layer")
    for task in tasks:
        table.add_column(task, justify="right")
    for layer, per_task in summary["routing"].items():
        table.add_row(short_layer(layer), *(" ".join(f"{100 * p:2.0f}" for p in per_task[task]) for task in tasks))
    return table


def short_layer(name: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.2.ff` -> `down1.a0.t2`."""
    pairs = (("transformer_blocks.", "t"), ("down_blocks.", "down"), ("up_blocks.", "up"), ("attentions.", "a"))
    for long, short in pairs:
        name = name.replace(long, short)
    return name.replace("mid_block.", "mid.").removesuffix(".ff")


def print_world_dataset(path: Path, task: str, split: str, count: int, start: int) -> None:
    console.print(
        f"wrote {path}: {count} {task} examples of the {split} split from index {start} (images/ + metadata.jsonl)"
    )


# ------------------------------------------------------------------------------------------------------ evaluation
def print_base_eval(result: dict, split: str, count: int, steps: int, guidance: float) -> None:
    """`mtu-export eval` of a base pipeline: VAE reconstruction, the reader's ceiling, t2i attribute accuracy."""
    vae, acc = result["vae"], result["t2i_accuracy"]
    mean, worst = (_db(vae[k]) for k in ("psnr_mean_db", "psnr_min_db"))
    same = f", {vae['identical']} identical" if vae["identical"] else ""
    console.print(f"VAE reconstruction on {split}: {mean} mean, {worst} worst{same}")
    ceiling = vae["reader_accuracy_on_reconstructions"]
    shown = ", ".join(f"{k} {100 * v:.1f} %" for k, v in ceiling.items())
    console.print(f"scene reader on those reconstructions (the ceiling through this VAE): {shown}")
    table = Table(title=f"t2i attribute accuracy on {split} ({count} captions, {steps} steps, cfg {guidance})")
    for key in acc:
        table.add_column(key, justify="right")
    table.add_row(*(f"{100 * v:.1f} %" for v in acc.values()))
    console.print(table)


def print_checkpoint_eval(path: Path, results: dict, split: str, count: int, steps: int, data: dict) -> None:
    """`mtu-export eval` of a checkpoint: one row of metrics per task."""
    where = ", ".join(f"{t}: {spec.path}" for t, spec in data.items())
    shown = f"{split}" + (f" (--data {where})" if where else "")
    table = Table(title=f"{path} on {shown} ({count} examples, {steps} steps)")
    keys = eval_columns(results)
    for column in ("task", *keys):
        table.add_column(column, justify="right")
    for name, row in results.items():
        table.add_row(name, *(_cell(row.get(k)) for k in keys))
    console.print(table)


def eval_columns(results: dict[str, dict]) -> list[str]:
    """The metrics a table of these tasks shows: those some task has (identical-pair counts: when not 0)."""
    return [k for k in EVAL_COLUMNS if any(_shown_metric(row, k) for row in results.values())]


def _cell(value: float | int | None) -> str:
    return "" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}"


# eval's columns, in order; a column is shown when a task of the table has it (identical counts: when not 0)
EVAL_COLUMNS = (
    *("psnr", "psnr_set", "ssim", "psnr_mask", "reader_accuracy", "bicubic_psnr", "source_psnr"),
    *("gain_over_floor_db", "psnr_identical", "bicubic_psnr_identical", "source_psnr_identical"),
)


def _shown_metric(row: dict, key: str) -> bool:
    return bool(row.get(key)) if key.endswith("_identical") else row.get(key) is not None


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.2f} dB"


def print_parity(report: dict, out: Path) -> None:
    """`mtu-export parity`: each task's primary metric, MTU vs its single-task baseline."""
    for task, entry in report["parity"].items():
        row = entry["metrics"][entry["primary"]]
        ratio = f"MTU {row['mtu']:.4f} / single {row['single']:.4f} = {row['ratio']:.4f}"
        console.print(f"{task}: {entry['primary']} {ratio}")
    console.print(f"wrote {out}/parity.md")


# ---------------------------------------------------------------------------------------------------------- export
def print_onnx_report(manifest: dict) -> None:
    """`mtu-export onnx`: every graph's agreement with torch, the end-to-end images, the bundle's size."""
    table = Table(title="exported graphs vs torch (trajectory inputs)")
    for column in ("graph", "output", "feeds", "max |diff|", "PSNR dB", "floor", "ok"):
        table.add_column(column, justify="right" if column not in ("graph", "output") else "left")
    for row in manifest["graph_agreement"]:
        graph = escape(row["component"] + (f" {row['task']}" if row["task"] else ""))
        psnr = "exact" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        ok = "yes" if row["ok"] else "[red]NO[/]"
        table.add_row(
            graph, row["output"], str(row["feeds"]), f"{row['max_abs_diff']:.2e}", psnr, f"{row['floor_db']:.0f}", ok
        )
    console.print(table)
    for row in manifest["image_agreement"]:
        psnr = "identical" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB"
        goal = "" if row["meets_goal"] else f" [red]below the {manifest['image_psnr_goal_db']:.0f} dB goal[/]"
        console.print(f"{row['task']}: end-to-end images vs torch fp32: {psnr}{goal}")
    if manifest.get("ort"):
        ort = manifest["ort"]
        worst = min((r["psnr_db"] for g in ort["graphs"].values() for r in g.get("agreement", [])), default=None,
                    key=lambda v: float("inf") if v is None else v)  # fmt: skip
        shown = "identical" if worst is None else f"{worst:.1f} dB"
        console.print(
            f".ort ({ort['optimization_style']} optimizations): {len(ort['graphs'])} graphs, "
            f"{sum(g['bytes'] for g in ort['graphs'].values()) / 1e6:.2f} MB, lowest agreement with their .onnx "
            f"{shown}; {ort['required_operators']['operators']} operators in {ort['required_operators']['path']}"
        )
    if manifest.get("sizes"):
        s = manifest["sizes"]
        console.print(
            f"bundle of {s['tasks']} tasks: {s['bundle_bytes'] / 1e6:.2f} MB = {s['ratio']:.3f} x one single-task "
            f"export ({s['single_task_bytes'] / 1e6:.2f} MB); UNet {s['unet_ratio']:.3f} x"
        )


def print_coreml_report(manifest: dict) -> None:
    """`mtu-export coreml`: each package's functions, I/O, op count and size, then the macOS comparison."""
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
    skipped = manifest["graph_agreement_skipped"]
    console.print(escape(skipped) if skipped else f"{len(manifest['graph_agreement'])} outputs compared")
