"""`make bench` where only the on-device runtime is installed (onnxruntime, numpy, Pillow, tokenizers; no torch): the
latency rows that need no torch, measured on folders that `mtu-export onnx` wrote on another machine (`.onnx` or
`.ort` graphs, any quantization, `--batch 1` too), side by side in one run.

For every task all the folders hold, the first folder is the reference and each other folder is timed against it:
- UNet per call: the guidance batch its sampler sends (2 rows; 3 for image-guided tasks) at the export's size, seeded,
  in interleaved rounds (timing.interleaved_rounds: fresh sessions each round, idle threads sleeping, single calls
  alternating), beside an A/A control (the reference against itself), whose spread is the run's noise;
- end to end: one image through the torch-free pipeline (text encoder, `steps` guided UNet calls, VAE decoder; the
  VAE encoder too for image-conditioned tasks), in interleaved samples (timing.interleaved).
Only ratios of one run are results; absolute times are printed for orientation. `device.json` and `device.md` are
written together into --out.

Run: `python -m mtu_export.bench.device FOLDER [FOLDER ...] --out DIR` (or `make bench` without torch installed).
Must not import torch, transformers or diffusers (tested in a process that cannot).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mtu_export import logs
from mtu_export.bench.timing import interleaved, interleaved_rounds
from mtu_export.errors import ConfigError, InputError, OutputExistsError
from mtu_export.ondevice.graphs import graph_path
from mtu_export.ondevice.pipeline import OnDevicePipeline, TaskPlan
from mtu_export.storage import atomic_output, read_json, write_json

logger = logging.getLogger(__name__)

RESULT_FILES = ("device.json", "device.md")
PROMPT = "a red circle on a blue background"
TIMESTEP = 500  # a mid-trajectory timestep for the per-call feed


@dataclass(frozen=True)
class DeviceBenchConfig:
    threads: int = 2  # onnxruntime intra-op threads (2 ~ a phone's big cores)
    rounds: int = 6  # UNet per call: rounds, each with fresh sessions of both graphs ...
    pairs: int = 40  # ... and this many A/B pairs of single calls
    warmup: int = 2
    steps: int = 10  # end to end: sampling steps per image ...
    repeats: int = 5  # ... and A/B pairs of images
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.threads, self.rounds, self.pairs, self.steps, self.repeats) < 1 or self.warmup < 0:
            raise ConfigError("bench needs --threads, --rounds, --pairs, --steps, --repeats >= 1 and --warmup >= 0")


# ---------------------------------------------------------------------------------------------------- the folders
def open_folder(folder: Path, config: DeviceBenchConfig) -> OnDevicePipeline:
    """The folder's torch-free pipeline (idle threads sleeping); one-line errors for what is not an export."""
    try:
        pipeline = OnDevicePipeline.from_folder(folder, threads=config.threads, spinning=False)
        graph_path(folder / "unet")
    except FileNotFoundError as exc:
        raise InputError(f"{folder}: {exc}") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return pipeline


def graph_kind(folder: Path) -> str:
    """What the UNet of a folder is: its file format, quantization and batch, as the manifest says."""
    manifest = read_json(folder / "manifest.json")
    export = manifest.get("export", {})
    quantize = export.get("quantize") or manifest.get("quantize") or "none"
    batch = export.get("batch")
    parts = [graph_path(folder / "unet").suffix.lstrip("."), "fp32" if quantize == "none" else quantize]
    return " ".join(parts + ([f"batch {batch}"] if batch else []))


def shared_tasks(pipelines: Sequence[OnDevicePipeline], wanted: Sequence[str] | None) -> list[str]:
    common = [t for t in pipelines[0].tasks if all(t in p.tasks for p in pipelines[1:])]
    if wanted:
        missing = [t for t in wanted if t not in common]
        if missing:
            raise InputError(
                f"task(s) {', '.join(missing)} not in every folder; they all hold {', '.join(common) or 'none'}"
            )
        return list(wanted)
    if not common:
        raise InputError("the folders share no task; pass exports of the same model and task")
    return common


# ----------------------------------------------------------------------------------------------------- the feeds
def unet_call(pipeline: OnDevicePipeline, plan: TaskPlan, seed: int) -> Callable[[], object]:
    """One UNet call of `plan` as its sampler makes it (guidance batch, the task's channels, the export's size)."""
    rng = np.random.default_rng(seed)
    unet = read_json(pipeline.folder / "unet" / "config.json")
    tokens = read_json(pipeline.folder / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77)
    side = pipeline.geometry.pixels // pipeline.geometry.factor
    batch = 3 if plan.image_guidance else 2
    channels = pipeline.manifest["tasks"][plan.name]["in_channels"]
    sample = rng.standard_normal((batch, channels, side, side), dtype=np.float32)
    hidden = rng.standard_normal((batch, tokens, unet["cross_attention_dim"]), dtype=np.float32)
    denoise = pipeline._unet(plan)
    return lambda: denoise(sample, TIMESTEP, hidden)


def request_inputs(pipeline: OnDevicePipeline, plan: TaskPlan, seed: int) -> dict[str, Image.Image]:
    """Seeded input images for an image-conditioned task: its input at the size the export expects, and a mask."""
    if not plan.needs:
        return {}
    side = pipeline.geometry.pixels // plan.input_scale(pipeline.geometry.factor)
    rng = np.random.default_rng(seed)
    inputs = {"image": Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))}
    if "mask" in plan.needs:
        hole = np.zeros((side, side), np.uint8)
        hole[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        inputs["mask"] = Image.fromarray(hole)
    return inputs


def one_image(pipeline: OnDevicePipeline, plan: TaskPlan, config: DeviceBenchConfig) -> Callable[[], object]:
    inputs = request_inputs(pipeline, plan, config.seed)
    return lambda: pipeline(PROMPT, task=plan.name, steps=config.steps, seed=config.seed, **inputs)


# ------------------------------------------------------------------------------------------------------- the run
def _rounds(folder_a: Path, folder_b: Path, task: str, config: DeviceBenchConfig) -> dict:
    def opener(folder: Path) -> Callable[[], Callable[[], object]]:
        def open_call() -> Callable[[], object]:
            pipeline = open_folder(folder, config)  # fresh sessions each round
            return unet_call(pipeline, pipeline.tasks[task], config.seed)

        return open_call

    return interleaved_rounds(opener(folder_a), opener(folder_b), config.rounds, config.pairs, config.warmup)


def bench_task(folders: Sequence[Path], task: str, config: DeviceBenchConfig) -> dict:
    reference = folders[0]
    logger.info(f"{task}: UNet per call, {reference} against itself (A/A control)")
    row: dict = {"control": _rounds(reference, reference, task, config), "folders": {}}
    images = {folder: open_folder(folder, config) for folder in folders}
    run_reference = one_image(images[reference], images[reference].tasks[task], config)
    for folder in folders[1:]:
        logger.info(f"{task}: {folder} against {reference}")
        per_call = _rounds(folder, reference, task, config)
        pipeline = images[folder]
        end_to_end = interleaved(
            one_image(pipeline, pipeline.tasks[task], config), run_reference, config.repeats, config.warmup
        )
        row["folders"][str(folder)] = {"unet_per_call": per_call, "end_to_end": end_to_end}
        logger.info(f"  UNet per call {per_call['ratio']:.3f}, end to end {end_to_end['ratio']:.3f} of the reference")
    return row


def bench_device(
    folders: Sequence[Path],
    out: Path,
    config: DeviceBenchConfig,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Time every shared task of `folders` against the first; write device.json and device.md into `out`."""
    folders, out = [Path(f) for f in folders], Path(out)
    with atomic_output(out, folders, overwrite, members=RESULT_FILES) as staging:  # both files, or neither
        names = shared_tasks([open_folder(f, config) for f in folders], tasks)
        results = _measure(folders, names, config)
        write_json(staging / "device.json", results)
        (staging / "device.md").write_text(markdown(results))
    return results


def _measure(folders: list[Path], names: list[str], config: DeviceBenchConfig) -> dict:
    import onnxruntime

    return {
        "format": "mtu-export-bench-device/1",
        "config": asdict(config),
        "onnxruntime": onnxruntime.__version__,
        "reference": str(folders[0]),
        "kinds": {str(f): graph_kind(f) for f in folders},
        "tasks": {task: bench_task(folders, task, config) for task in names},
    }


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# On-device latency: exported folders side by side (no torch)",
        "",
        f"Reference: `{r['reference']}` ({r['kinds'][r['reference']]}). onnxruntime {r['onnxruntime']}, "
        f"{c['threads']} threads. UNet per call: median of {c['rounds']} rounds' ratios ({c['pairs']} interleaved "
        f"pairs each, fresh sessions per round). End to end: one image of {c['steps']} steps, median of "
        f"{c['repeats']} interleaved pairs. Ratios below 1 are faster than the reference.",
        "",
        "| task | folder | graphs | UNet per call ÷ ref | ms / call | end to end ÷ ref | s / image |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for task, row in r["tasks"].items():
        control = row["control"]
        lines.append(
            f"| {task} | A/A control | {r['kinds'][r['reference']]} | {control['ratio']:.3f} "
            f"({min(control['round_ratios']):.3f}–{max(control['round_ratios']):.3f}) | "
            f"{control['b_median_ms']:.1f} | | |"
        )
        for folder, timed in row["folders"].items():
            call, e2e = timed["unet_per_call"], timed["end_to_end"]
            lines.append(
                f"| {task} | `{folder}` | {r['kinds'][folder]} | {call['ratio']:.3f} | {call['a_median_ms']:.1f} | "
                f"{e2e['ratio']:.3f} | {e2e['a_median_ms'] / 1e3:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="`mtu-export onnx` folders; the first is the reference")
    parser.add_argument("--out", type=Path, required=True, help="folder for device.json and device.md")
    parser.add_argument("--task", action="append", dest="tasks", help="a task to time (repeat; default: all shared)")
    defaults = DeviceBenchConfig()
    for name in ("threads", "rounds", "pairs", "warmup", "steps", "repeats", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--overwrite", action="store_true", help="replace device.json / device.md in --out")
    args = parser.parse_args(argv)
    logs.install(logs.plain_handler())  # progress lines on stderr
    try:
        config = DeviceBenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})
        result = bench_device(args.folders, args.out, config, args.tasks, args.overwrite)
    except (ConfigError, InputError, OutputExistsError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
