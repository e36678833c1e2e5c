"""`mtu-export bench`: what a folded MTU task costs next to a single-task model, measured side by side in one run.

For each task, the folded MTU UNet and the single-task baseline's UNet (a trained baseline checkpoint, or — when
none is given — the base UNet with the task's conv_in, which has the same architecture) are exported to ONNX with
fixed shapes and timed on onnxruntime call by call in *interleaved* rounds (A B, B A, …, fresh non-spinning sessions
each round; timing.py), so machine noise hits both alike; the headline is the median of the round ratios, beside an
A/A control (the single-task graph against itself) and a structural comparison of the two graphs. The folded UNet's
optimized export (`--attention fused --optimize`: onnxruntime's MultiHeadAttention, the graph saved as onnxruntime's
session optimizes it, which every other graph here gets at session load) is timed the same way against its plain
export and compared with torch (PSNR), so the gate can hold both its speed-up and its quality. End to end (text
encoder, `steps` guided UNet calls, VAE decoder) and each quantization mode against fp32 are timed in interleaved
samples of at least `MIN_SAMPLE_SECONDS`. GFLOPs per UNet call come from torch's FlopCounterMode and are
cross-checked against the exported graph (flops.py); parameters, bytes on disk, peak memory (a child process per
graph; memory.py) and quality (exported-vs-torch PSNR per task and mode; the trainer's parity table when given)
complete the report (report.py).
The gate that checks a result against a baseline is gate.py.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mtu_export import __version__, logs
from mtu_export.bench.flops import onnx_flops, torch_flops
from mtu_export.bench.graphs import export_fixed, graph_bytes, graph_signature, parameter_count, unet_feed
from mtu_export.bench.memory import peak_rss_mb
from mtu_export.bench.report import render_markdown, write_plots
from mtu_export.bench.timing import MIN_SAMPLE_SECONDS, interleaved, interleaved_rounds
from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import ONNX_QUANTIZE, CoreMLConfig, OnnxConfig
from mtu_export.errors import ConfigError, InputError
from mtu_export.export.graphs import UNET, UNetGraph
from mtu_export.export.onnx import GRAPH_PSNR_FLOOR, export_onnx, validate_graph
from mtu_export.export.runtime import session
from mtu_export.fold import ffn_kept, fold_task, verify_fold
from mtu_export.storage import CHECKPOINT_CONFIG, atomic_output, read_json, write_json
from mtu_export.tasks import BUILTIN, declared
from mtu_export.upcycle import load_unet, task_conv_in

logger = logging.getLogger(__name__)
QUANT_MODES = tuple(m for m in ONNX_QUANTIZE if m != "none")  # timed against fp32
GRAPH_PSNR_FLOOR_DB = GRAPH_PSNR_FLOOR["none"]  # the optimized fp32 graph against torch, as any fp32 export


@dataclass(frozen=True)
class BenchConfig:
    threads: int = 2  # onnxruntime intra-op threads (2 ≈ a phone's big cores)
    repeats: int = 25  # timed A/B pairs per comparison (end to end, quantization modes)
    rounds: int = 8  # UNet latency: rounds, each with fresh sessions of both graphs ...
    pairs: int = 100  # ... and this many A/B pairs of single calls
    warmup: int = 3
    e2e_steps: int = 10  # sampling steps of the end-to-end latency (text encoder, guided UNet calls, VAE decoder)
    e2e_repeats: int = 3
    modes: tuple[str, ...] = QUANT_MODES  # quantization modes timed against fp32 (all-task bundle)
    image_count: int = 2  # end-to-end images per task in each export's quality check
    seed: int = 0

    def __post_init__(self) -> None:
        counts = (self.threads, self.repeats, self.rounds, self.pairs, self.e2e_steps)
        if min(counts) < 1 or self.warmup < 0 or self.e2e_repeats < 0:
            raise ConfigError("bench needs --threads, --repeats, --rounds, --pairs, --steps >= 1 and --warmup >= 0")
        unknown = [m for m in self.modes if m not in QUANT_MODES]
        if unknown:
            raise ConfigError(
                f"unknown quantization mode(s) {', '.join(unknown)}; choose from {', '.join(QUANT_MODES)}"
            )


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class _Models:
    """The torch UNets compared for one task: the folded MTU task and its single-task reference."""

    mtu: torch.nn.Module
    single: torch.nn.Module
    single_kind: str  # "trained baseline <path>" or "architecture stand-in (base UNet + task conv_in)"
    base: torch.nn.Module | None = None  # a task without an image condition (t2i): the untouched base UNet
    sparse: torch.nn.Module | None = None  # the task's sparse fold (of a `--route top-k` checkpoint), when benched
    sparse_kept: float = 1.0  # its FFN hidden units ÷ the base's


def bench(
    checkpoint: Path,
    out: Path,
    config: BenchConfig,
    baselines: dict[str, Path] | None = None,
    base: Path | None = None,
    parity: Path | None = None,
    overwrite: bool = False,
    sparse: Path | None = None,
    sparse_eval: Path | None = None,
) -> dict:
    """Measure everything for every task of `checkpoint`; write bench.json, bench.md and plots into `out` (existing
    ones are refused unless `overwrite`, before anything is measured). `sparse`: a checkpoint (trained with
    `--route top-k`) whose sparse fold of each task is timed against the same single-task UNet; `sparse_eval`: its
    `mtu-export eval --json`, whose primary metrics are set against the dense MTU's in `parity`."""
    checkpoint, out = Path(checkpoint), Path(out)
    baselines = {k: Path(v) for k, v in (baselines or {}).items()}
    base = Path(base) if base else _recorded_base(checkpoint)
    reads = [checkpoint, base, parity, sparse, sparse_eval, *baselines.values()]
    with atomic_output(out, reads, overwrite, members=RESULT_FILES) as staging:  # refused before any measuring
        results = _measure(checkpoint, base, config, baselines, parity, sparse, sparse_eval)
        write_json(staging / "bench.json", results)
        (staging / "bench.md").write_text(render_markdown(results))
        write_plots(results, staging)
    return results


def _measure(checkpoint: Path, base: Path | None, config: BenchConfig, baselines: dict, parity, sparse, sparse_eval):
    ckpt = load_checkpoint(checkpoint, dtype=torch.float32)
    if base is None:
        raise InputError(
            f"{ckpt.path} does not record a usable base pipeline (it was not made by `mtu-export train` here); "
            "pass --base path/to/base-pipeline"
        )
    sparse_ckpt = None if sparse is None else _sparse_checkpoint(Path(sparse), ckpt)
    if sparse_eval and not (sparse and parity):
        raise ConfigError(
            "--sparse-eval is set against the dense MTU's --parity results: give --sparse and --parity too"
        )
    quality = sparse_quality(read_json(parity), read_json(sparse_eval)) if sparse_eval else None
    for task in baselines:
        ckpt.model.config.task(task)  # unknown task -> one-line error
    base_unet = load_unet(base).float().eval()
    tokens = prompt_tokens(ckpt)
    results: dict = {
        "format": "mtu-export-bench/1",
        "checkpoint": str(checkpoint),
        "base": str(base),
        "config": asdict(config),
        "sparse_checkpoint": None if sparse is None else str(sparse),
        "machine": _machine(config),
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="mtu-bench-") as scratch:
        scratch = Path(scratch)
        results["bundle"] = _bench_bundle(checkpoint, scratch, config)
        pipeline = _PipelineParts(scratch / "bundle-none", config.threads)
        for task in ckpt.model.config.task_names:
            models = _models(ckpt, task, base_unet, baselines.get(task), sparse_ckpt)
            results["tasks"][task] = _bench_task(task, models, scratch / task, config, tokens, pipeline)
    results["parity"] = read_json(parity) if parity and Path(parity).is_file() else None
    results["sparse_quality"] = quality
    return results


RESULT_FILES = ("bench.json", "bench.md", "bench.png")


def _recorded_base(checkpoint: Path) -> Path | None:
    """The base pipeline a checkpoint's training run recorded, when it is a folder here (read before loading)."""
    config = checkpoint / CHECKPOINT_CONFIG
    try:
        recorded = read_json(config).get("training", {}).get("base") if config.is_file() else None
    except Exception:  # loading the checkpoint says what is wrong with it
        return None
    return Path(recorded) if isinstance(recorded, str) and recorded and Path(recorded).is_dir() else None


def prompt_tokens(ckpt) -> int:
    """The prompt length the checkpoint's tokenizer pads to (the text input of every benched UNet call)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ckpt.pipeline_dir / "tokenizer").model_max_length


def sparse_quality(parity: dict, evaluation: dict) -> dict[str, dict]:
    """Per task, the sparse model's primary metric (`mtu-export eval --json`) ÷ the dense MTU's (`parity.json`),
    refused unless both scored the same examples with the same sampler."""
    settings = parity["config"]
    differ = [k for k in ("split", "count", "steps", "seed") if evaluation.get(k) != settings.get(k)]
    if evaluation.get("first", 0) != 0:
        differ.append("first")
    if differ:
        shown = ", ".join(f"{k} {evaluation.get(k)!r} vs {settings.get(k)!r}" for k in differ)
        raise InputError(f"--sparse-eval was not scored as the parity run was ({shown}); rerun eval with its settings")
    rows = {}
    for task, entry in parity["parity"].items():
        metric = entry["primary"]
        scored = evaluation["tasks"].get(task, {}).get(metric)
        if scored is not None:
            dense = entry["metrics"][metric]["mtu"]
            rows[task] = {"metric": metric, "sparse": scored, "dense": dense, "ratio": scored / dense}
    return rows


def _sparse_checkpoint(path: Path, ckpt):
    """The checkpoint whose sparse folds are benched: the same tasks as the MTU's, routed top-k."""
    sparse = load_checkpoint(path, dtype=torch.float32)
    missing = [t for t in ckpt.model.config.task_names if t not in sparse.model.config.task_names]
    if missing:
        raise InputError(
            f"--sparse {path} lacks task(s) {', '.join(missing)} of {ckpt.path}; give a model of the same tasks"
        )
    return sparse


def _models(ckpt, task: str, base_unet, baseline: Path | None, sparse_ckpt=None) -> _Models:
    mtu = fold_task(ckpt.model, task).eval()
    if baseline is not None:
        single_ckpt = load_checkpoint(baseline, dtype=torch.float32)
        single = fold_task(single_ckpt.model, single_ckpt.model.config.task(task).name).eval()
        kind = f"trained baseline {baseline}"
    else:
        single = _stand_in(base_unet, ckpt.model.config.task(task))
        kind = "architecture stand-in (base UNet with the task's conv_in, untrained)"
    takes_base = ckpt.model.config.task(task).in_channels == base_unet.config.in_channels  # no image condition
    models = _Models(mtu, single, kind, base_unet if takes_base else None)
    if sparse_ckpt is not None:
        models.sparse = fold_task(sparse_ckpt.model, task).eval()
        verify_fold(sparse_ckpt.model, models.sparse, task)
        models.sparse_kept = ffn_kept(sparse_ckpt.model, models.sparse)
    return models


def _stand_in(base_unet, spec):
    import copy

    unet = copy.deepcopy(base_unet)
    unet.conv_in = task_conv_in(base_unet.conv_in, spec)
    unet.register_to_config(in_channels=spec.in_channels)
    return unet.eval()


class _PipelineParts:
    """The exported text encoder and VAE decoder, shared by both sides of an end-to-end comparison."""

    def __init__(self, folder: Path, threads: int) -> None:
        self.text_encoder = session(folder / "text_encoder" / "model.onnx", threads, spinning=False)
        self.vae_decoder = session(folder / "vae_decoder" / "model.onnx", threads, spinning=False)
        tokens = read_json(folder / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77)
        latent = read_json(folder / "unet" / "config.json")["sample_size"]
        latent = latent[0] if isinstance(latent, list) else latent
        self.ids = np.zeros((1, tokens), np.int64)
        self.latent = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)

    def end_to_end(self, unet, feeds: dict, steps: int) -> Callable[[], None]:
        """Prompt and empty prompt through the text encoder, `steps` guided UNet calls, one VAE decode."""

        def run() -> None:
            self.text_encoder.run(None, {"input_ids": self.ids})
            self.text_encoder.run(None, {"input_ids": self.ids})
            for _ in range(steps):
                unet.run(None, feeds)
            self.vae_decoder.run(None, {"latent_sample": self.latent})

        return run


def _bench_task(
    task: str, models: _Models, scratch: Path, config: BenchConfig, tokens: int, pipeline: _PipelineParts
) -> dict:
    batch = 3 if BUILTIN.get(task, declared(task)).image_guidance else 2  # the guidance batch of its sampler
    channels = models.mtu.config.in_channels
    feed = unet_feed(dict(models.mtu.config), channels, batch, tokens, config.seed)
    one = {k: (v[:1] if v.dim() else v) for k, v in feed.items()}
    named = (("mtu", models.mtu), ("single", models.single), ("base", models.base), ("sparse", models.sparse))
    unets = {name: u for name, u in named if u is not None}
    graphs = {name: export_fixed(unet, feed, scratch / name) for name, unet in unets.items()}
    # The fastest fp32 graph we ship (`mtu-export onnx --attention fused --optimize`), validated against torch as
    # exports are.
    graphs["optimized"] = export_fixed(models.mtu, feed, scratch / "optimized", attention="fused", optimize=True)
    (agreement,) = validate_graph(UNET, UNetGraph(models.mtu), graphs["optimized"], [feed], task, GRAPH_PSNR_FLOOR_DB)
    row: dict = {"single_kind": models.single_kind, "batch": batch, "in_channels": channels}
    row["parameters"] = {"mtu": parameter_count(models.mtu), "single": parameter_count(models.single)}
    row["bytes"] = {name: graph_bytes(path) for name, path in graphs.items()}
    signatures = {name: graph_signature(graphs[name]) for name in unets}
    row["same_structure"] = signatures["mtu"] == signatures["single"]  # same ops, wiring and shapes; weights aside
    row["optimized"] = {
        "attention": "fused",
        "optimize": True,
        "psnr_db": agreement.psnr_db,
        "max_abs_diff": agreement.max_abs_diff,
    }
    flops = {
        name: {"torch": torch_flops(unet, one), "onnx": onnx_flops(export_fixed(unet, one, scratch / f"{name}-b1"))}
        for name, unet in unets.items()
    }
    row["flops_per_call_batch1"] = flops
    row["gflops"] = flops["mtu"]["torch"] / 1e9
    feeds = {k: v.numpy() for k, v in feed.items()}

    def opener(name: str) -> Callable[[], Callable[[], object]]:
        def open_session() -> Callable[[], object]:
            graph = session(graphs[name], config.threads, spinning=False)
            return lambda: graph.run(None, feeds)

        return open_session

    rounds = f"{config.rounds} rounds of {config.pairs} interleaved calls"
    logger.info(f"{task}: timing the folded MTU UNet against the single-task UNet, and that against itself ({rounds})")
    pair = lambda a, b: interleaved_rounds(opener(a), opener(b), config.rounds, config.pairs, config.warmup)  # noqa: E731
    # single vs single: the same graph against itself shows how far this protocol on this machine can resolve.
    row["unet_latency"] = {"mtu_vs_single": pair("mtu", "single"), "single_vs_single": pair("single", "single")}
    if "base" in graphs:
        row["unet_latency"]["mtu_vs_base"] = pair("mtu", "base")
    logger.info(f"{task}: timing the optimized folded UNet (fused, --optimize) against its plain export ({rounds})")
    row["unet_latency"]["optimized_vs_plain"] = pair("optimized", "mtu")
    if "sparse" in graphs:
        logger.info(f"{task}: timing the sparse fold against the single-task UNet ({rounds})")
        row["sparse"] = {
            "ffn_kept": models.sparse_kept,
            "gflops_ratio": flops["sparse"]["torch"] / flops["single"]["torch"],
            "latency_vs_single": pair("sparse", "single"),
        }
    sessions = {name: session(graphs[name], config.threads, spinning=False) for name in ("mtu", "single")}
    if config.e2e_repeats:
        mtu_run, single_run = (pipeline.end_to_end(sessions[k], feeds, config.e2e_steps) for k in ("mtu", "single"))
        row["e2e_latency"] = interleaved(mtu_run, single_run, config.e2e_repeats, 1)
        row["e2e_latency"]["steps"] = config.e2e_steps
    row["peak_rss_mb"] = {name: peak_rss_mb(path, feed, config.threads) for name, path in graphs.items()}
    row["coreml_latency"] = _coreml_latency(models, feed, scratch, config)
    ratio, optimized = (row["unet_latency"][k]["ratio"] for k in ("mtu_vs_single", "optimized_vs_plain"))
    shown = f"folded / single {ratio:.3f}, optimized / plain {optimized:.3f}"
    if "sparse" in row:
        shown += f", sparse / single {row['sparse']['latency_vs_single']['ratio']:.3f}"
        shown += f" at {row['sparse']['gflops_ratio']:.3f}x the GFLOPs"
    logger.info(f"{task}: {row['gflops']:.3f} GFLOPs/call (batch 1); UNet latency {shown}")
    return row


def _bench_bundle(checkpoint: Path, scratch: Path, config: BenchConfig) -> dict:
    """Export the all-task bundle in fp32 and each quantization mode; sizes, quality, latency of mode ÷ fp32."""
    rows: dict = {}
    folders = {}
    for mode in ("none", *config.modes):
        logger.info(f"exporting the all-task bundle ({mode})")
        export_config = OnnxConfig(quantize=mode, image_count=config.image_count, seed=config.seed)
        folders[mode] = scratch / f"bundle-{mode}"
        with logs.quiet("mtu_export.export"):  # the line above says what runs
            manifest = export_onnx(checkpoint, export_config, folders[mode])
        unet_rows = [
            r for r in manifest["graph_agreement"] if r["component"] == ("unet" if mode == "none" else f"unet[{mode}]")
        ]
        rows[mode] = {
            "unet_bytes": graph_bytes(folders[mode] / "unet" / "model.onnx"),
            "graph_psnr_db": {r["task"]: r["psnr_db"] for r in unet_rows},
            "image_psnr_db": {r["task"]: r["psnr_db"] for r in manifest["image_agreement"]},
            "sizes": manifest["sizes"],
        }
    fp32 = session(folders["none"] / "unet" / "model.onnx", config.threads, spinning=False)
    feeds = _bundle_feed(folders["none"], config.seed)
    for mode in config.modes:
        quantized = session(folders[mode] / "unet" / "model.onnx", config.threads, spinning=False)
        logger.info(f"timing the {mode} bundle UNet against fp32 ({config.repeats} interleaved pairs)")
        rows[mode]["latency_vs_fp32"] = interleaved(
            lambda q=quantized: q.run(None, feeds),
            lambda: fp32.run(None, feeds),
            config.repeats,
            config.warmup,
            MIN_SAMPLE_SECONDS,
        )
    return {"modes": rows, "size_ratio": rows["none"]["sizes"]["ratio"]}


def _bundle_feed(folder: Path, seed: int) -> dict[str, np.ndarray]:
    manifest = read_json(folder / "manifest.json")
    unet_config = read_json(folder / "unet" / "config.json")
    tokens = read_json(folder / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77)
    feed = unet_feed(unet_config, manifest["unet_input_channels"], 2, tokens, seed)
    feed["task_id"] = torch.tensor(0, dtype=torch.int64)
    return {k: v.numpy() for k, v in feed.items()}


def _machine(config: BenchConfig) -> dict:
    import platform

    import onnxruntime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": config.threads,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__.split("+")[0],
        "mtu_export": __version__,
    }


COREML_SKIPPED = "Core ML latency needs macOS (coremltools cannot run models on this platform)"


def _coreml_latency(models: _Models, feed: dict, scratch: Path, config: BenchConfig) -> dict:
    """macOS: the folded and single-task UNets as mlpackages (fp16 compute, fixed batch), timed interleaved."""
    if sys.platform != "darwin":
        return {"skipped": COREML_SKIPPED}
    from mtu_export.export.coreml import convert_module, require_coremltools

    try:
        ct = require_coremltools()
    except ConfigError as exc:
        return {"skipped": str(exc)}
    coreml_feed = dict(feed, timestep=feed["timestep"].reshape(1).expand(feed["sample"].shape[0]).contiguous())
    loaded = {}
    for name, unet in (("mtu", models.mtu), ("single", models.single)):
        path = scratch / f"{name}.mlpackage"
        convert_module(ct, UNetGraph(unet), coreml_feed, ["out_sample"], CoreMLConfig(), "iOS17").save(str(path))
        loaded[name] = ct.models.MLModel(str(path))
    inputs = {k: v.numpy() for k, v in coreml_feed.items()}
    mtu_run, single_run = (lambda m=loaded[k]: m.predict(inputs) for k in ("mtu", "single"))
    return interleaved(mtu_run, single_run, config.repeats, config.warmup)
