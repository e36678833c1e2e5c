"""`mtu-export bench`: what a folded MTU task costs next to a single-task model, measured side by side in one run.

For each task, the folded MTU UNet and the single-task baseline's UNet (a trained baseline checkpoint, or — when
none is given — the base UNet with the task's conv_in, which has the same architecture) are exported to ONNX with
fixed shapes and timed on onnxruntime call by call in *interleaved* rounds (A B, B A, …, fresh non-spinning
sessions each round), so machine noise hits both alike; the headline is the median of the round ratios, beside an
A/A control (the single-task graph against itself) and a structural comparison of the two graphs. End to end
(text encoder, `steps` guided UNet calls, VAE decoder) and each quantization mode against fp32 are timed in
interleaved samples of at least 0.25 s. GFLOPs per UNet call
come from torch's FlopCounterMode (with CPU SDPA counted) and are cross-checked against a count of the exported
graph's Conv / MatMul / Gemm ops; parameters, bytes on disk, peak memory (a child process per graph) and quality
(exported-vs-torch PSNR per task and mode; the trainer's parity table when given) complete the report.

`check` compares a result with a committed baseline (ratios only, never absolute times) and lists every violation.

Imports config, errors, storage, upcycle, fold, export and the samplers; nothing imports bench but cli.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mtu_export import __version__
from mtu_export.config import ExportConfig
from mtu_export.errors import ConfigError, InputError
from mtu_export.export.graphs import UNET, UNetGraph
from mtu_export.export.onnx import export_onnx
from mtu_export.export.runtime import session
from mtu_export.fold import fold_task
from mtu_export.storage import check_output, check_separate, read_json, write_json
from mtu_export.tasks import BUILTIN, declared
from mtu_export.upcycle import load_checkpoint, load_unet, task_conv_in

Log = Callable[[str], None]
QUANT_MODES = ("dynamic-int8", "static-int8", "fp16")


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


# ------------------------------------------------------------------------------------------------------- FLOPs
def _register_cpu_sdpa() -> None:
    """FlopCounterMode skips CPU SDPA (16 % of SD1.5's FLOPs); count it as the two matmuls it is (DESIGN.md §3)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def torch_flops(unet, feed: dict) -> int:
    """FLOPs (2 × MACs) of one UNet call on `feed`, by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa()
    counter = FlopCounterMode(display=False)
    with counter:
        unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
    return int(counter.get_total_flops())


def onnx_flops(path: Path) -> int:
    """FLOPs (2 × MACs) of the Conv, MatMul and Gemm nodes of a fixed-shape ONNX graph.

    Shapes come from onnxruntime's symbolic shape inference (ONNX's own leaves the traced UNet's reshapes unknown);
    weights stay on disk, only their dims are read. A node whose shapes stay unknown is an error, never a zero."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)
    # Weights kept in external data become shaped graph inputs, so inference never reads them (nor needs the file).
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    kept = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in external)
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if any(s is None or None in s for s in (a, b, out)):
            raise RuntimeError(f"cannot count FLOPs of {node.name} in {path}: its shapes are not static")
        if node.op_type == "Conv":
            total += 2 * math.prod(out) * math.prod(b[1:])  # (C_in / groups) · kH · kW MACs per output
        elif node.op_type == "MatMul":
            total += 2 * math.prod(out) * a[-1]
        else:
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += 2 * math.prod(out) * (a[0] if trans_a else a[1])
    return total


def graph_signature(path: Path) -> str:
    """A hash of an ONNX graph's structure with its weight values left out: every node's op, attributes and wiring
    (tensors numbered in order of appearance, weights by dims and dtype). Two graphs with the same signature run
    the same kernels on the same shapes; only the numbers in their weights differ."""
    import hashlib

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name: ("weight", tuple(i.dims), i.data_type) for i in graph.initializer}
    numbering: dict[str, int] = {}

    def tensor(name: str):
        return weights[name] if name in weights else numbering.setdefault(name, len(numbering))

    parts = [[tensor(i.name) for i in graph.input]]
    for node in graph.node:
        attributes = sorted(a.SerializeToString() for a in node.attribute)
        parts.append([node.op_type, node.domain, [tensor(n) for n in node.input], [tensor(n) for n in node.output]])
        parts.append([a.hex() for a in attributes])
    parts.append([tensor(o.name) for o in graph.output])
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------- latency
MIN_SAMPLE_SECONDS = 0.25  # a timed sample repeats a short call until it lasts this long (timer and noise floor)


def interleaved(
    run_a: Callable[[], object], run_b: Callable[[], object], repeats: int, warmup: int, min_seconds: float = 0.0
) -> dict:
    """Time A and B alternately (A B, B A, …). The headline `ratio` is median(A) ÷ median(B); the median of
    per-pair ratios and the ratio of minimums are kept beside it (on a shared machine the per-pair ratio of two
    identical graphs scattered by ±10 %, the ratio of medians by ±1 %).

    With `min_seconds`, each sample runs the call `inner` times (the same count for A and B, from the warm-up's
    timing) so that a sample lasts at least that long; times are then per call."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        run_a(), run_b()
    per_pair = (time.perf_counter() - start) / max(1, warmup)
    inner = max(1, math.ceil(2 * min_seconds / per_pair)) if min_seconds else 1
    times_a, times_b = [], []
    for i in range(repeats):
        order = ((run_a, times_a), (run_b, times_b)) if i % 2 == 0 else ((run_b, times_b), (run_a, times_a))
        for fn, sink in order:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sink.append((time.perf_counter() - start) / inner)
    ratios = [a / b for a, b in zip(times_a, times_b, strict=True)]
    return {
        "a_median_ms": 1e3 * statistics.median(times_a),
        "b_median_ms": 1e3 * statistics.median(times_b),
        "a_spread_ms": 1e3 * (max(times_a) - min(times_a)),
        "b_spread_ms": 1e3 * (max(times_b) - min(times_b)),
        "ratio": statistics.median(times_a) / statistics.median(times_b),
        "pair_ratio_median": statistics.median(ratios),
        "ratio_of_minimums": min(times_a) / min(times_b),
        "repeats": repeats,
        "calls_per_sample": inner,
    }


def unet_feed(unet_config: dict, task_channels: int, batch: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    size = unet_config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, task_channels, size, size, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, tokens, unet_config["cross_attention_dim"], generator=g),
    }


def peak_rss_mb(path: Path, feed: dict[str, torch.Tensor], threads: int) -> float:
    """Peak resident memory of a fresh process that loads `path` in onnxruntime and runs it once."""
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feed.npz", **{k: v.numpy() for k, v in feed.items()})
        code = (
            "import resource, sys, numpy as np, onnxruntime as ort\n"
            "o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[3])\n"
            "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
            "f = dict(np.load(sys.argv[2])); s.run(None, f)\n"
            # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (it survives fork and exec).
            "linux = sys.platform == 'linux'\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')] if linux else []\n"
            "print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(path), str(Path(tmp) / "feed.npz"), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
    return int(result.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class _Models:
    """The torch UNets compared for one task: the folded MTU task and its single-task reference."""

    mtu: torch.nn.Module
    single: torch.nn.Module
    single_kind: str  # "trained baseline <path>" or "architecture stand-in (base UNet + task conv_in)"
    base: torch.nn.Module | None = None  # t2i: the untouched base UNet


def bench(
    checkpoint: Path,
    out: Path,
    config: BenchConfig,
    baselines: dict[str, Path] | None = None,
    base: Path | None = None,
    parity: Path | None = None,
    log: Log = print,
    overwrite: bool = False,
) -> dict:
    """Measure everything for every task of `checkpoint`; write bench.json, bench.md and plots into `out` (existing
    ones are refused unless `overwrite`, before anything is measured)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_result_files(out, overwrite)
    ckpt = load_checkpoint(checkpoint, dtype=torch.float32)
    base = Path(base) if base else _base_of(ckpt)
    baselines = {k: Path(v) for k, v in (baselines or {}).items()}
    _check_result_files(out, overwrite, checkpoint, base, parity, *baselines.values())
    for task in baselines:
        ckpt.model.config.task(task)  # unknown task -> one-line error
    base_unet = load_unet(base).float().eval()
    tokens = _tokens(ckpt)
    results: dict = {
        "format": "mtu-export-bench/1",
        "checkpoint": str(checkpoint),
        "base": str(base),
        "config": asdict(config),
        "machine": _machine(config),
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="mtu-bench-") as scratch:
        scratch = Path(scratch)
        results["bundle"] = _bench_bundle(checkpoint, scratch, config, log)
        pipeline = _PipelineParts(scratch / "bundle-none", config.threads)
        for task in ckpt.model.config.task_names:
            models = _models(ckpt, task, base_unet, baselines.get(task))
            results["tasks"][task] = _bench_task(task, models, scratch / task, config, tokens, pipeline, log)
    results["parity"] = read_json(parity) if parity and Path(parity).is_file() else None
    results["coreml"] = _coreml_row()
    _check_result_files(out, overwrite)  # again: something may have appeared there while measuring
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=out) as staging:  # all three, or none, replaced
        write_json(Path(staging) / "bench.json", results)
        (Path(staging) / "bench.md").write_text(render_markdown(results))
        _plots(results, Path(staging))
        for name in RESULT_FILES:
            os.replace(Path(staging) / name, out / name)
    return results


RESULT_FILES = ("bench.json", "bench.md", "bench.png")


def _check_result_files(out: Path, overwrite: bool, *inputs: Path | None) -> None:
    """Refuse result files in `out` that exist (unless `overwrite`) or overlap what the bench reads (`inputs`)."""
    for name in RESULT_FILES:
        check_separate(out / name, *inputs)
        check_output(out / name, overwrite)


def _base_of(ckpt) -> Path:
    recorded = ckpt.meta.get("training", {}).get("base")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    raise InputError(
        f"{ckpt.path} does not record a usable base pipeline (it was not made by `mtu-export train` here); "
        "pass --base path/to/base-pipeline"
    )


def _tokens(ckpt) -> int:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ckpt.pipeline_dir / "tokenizer").model_max_length


def _models(ckpt, task: str, base_unet, baseline: Path | None) -> _Models:
    mtu = fold_task(ckpt.model, task).eval()
    if baseline is not None:
        single_ckpt = load_checkpoint(baseline, dtype=torch.float32)
        single = fold_task(single_ckpt.model, single_ckpt.model.config.task(task).name).eval()
        kind = f"trained baseline {baseline}"
    else:
        single = _stand_in(base_unet, ckpt.model.config.task(task))
        kind = "architecture stand-in (base UNet with the task's conv_in, untrained)"
    return _Models(mtu, single, kind, base_unet if task == "t2i" else None)


def _stand_in(base_unet, spec):
    import copy

    unet = copy.deepcopy(base_unet)
    unet.conv_in = task_conv_in(base_unet.conv_in, spec)
    unet.register_to_config(in_channels=spec.in_channels)
    return unet.eval()


def interleaved_rounds(
    open_a: Callable[[], Callable[[], object]],
    open_b: Callable[[], Callable[[], object]],
    rounds: int,
    pairs: int,
    warmup: int,
) -> dict:
    """Time two graphs call by call, alternating (A B, B A, …), in `rounds` rounds that each open both afresh
    (`open_x()` returns a fresh session's call; the side opened first alternates too). Per round the ratio is
    median(A) ÷ median(B) over its `pairs` pairs; the headline `ratio` is the median of the round ratios.

    The sessions must not spin (`session(..., spinning=False)`): with onnxruntime's default, the threads of the
    session that just ran busy-wait while the other one runs, and the same graph timed against itself scattered by
    ±10 % per round on 2 cores (±1 % without). Fresh sessions per round keep one session's memory placement from
    biasing a whole comparison; timing each call alone keeps a burst of machine noise from spreading over a sample."""
    round_ratios, medians_a, medians_b = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            run_a, run_b = open_a(), open_b()
        else:
            run_b, run_a = open_b(), open_a()
        for _ in range(max(1, warmup)):
            run_a(), run_b()
        times_a, times_b = [], []
        for i in range(pairs):
            order = ((run_a, times_a), (run_b, times_b)) if (i + r) % 2 == 0 else ((run_b, times_b), (run_a, times_a))
            for fn, sink in order:
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
        medians_a.append(statistics.median(times_a))
        medians_b.append(statistics.median(times_b))
        round_ratios.append(medians_a[-1] / medians_b[-1])
        del run_a, run_b
    return {
        "ratio": statistics.median(round_ratios),
        "round_ratios": round_ratios,
        "a_median_ms": 1e3 * statistics.median(medians_a),
        "b_median_ms": 1e3 * statistics.median(medians_b),
        "rounds": rounds,
        "pairs_per_round": pairs,
    }


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
    task: str, models: _Models, scratch: Path, config: BenchConfig, tokens: int, pipeline: _PipelineParts, log: Log
) -> dict:
    batch = 3 if BUILTIN.get(task, declared(task)).image_guidance else 2  # the guidance batch of its sampler
    channels = models.mtu.config.in_channels
    feed = unet_feed(dict(models.mtu.config), channels, batch, tokens, config.seed)
    one = {k: (v[:1] if v.dim() else v) for k, v in feed.items()}
    unets = {
        name: u for name, u in (("mtu", models.mtu), ("single", models.single), ("base", models.base)) if u is not None
    }
    graphs = {name: _export_fixed(unet, feed, scratch / name) for name, unet in unets.items()}
    row: dict = {"single_kind": models.single_kind, "batch": batch, "in_channels": channels}
    row["parameters"] = {"mtu": _params(models.mtu), "single": _params(models.single)}
    row["bytes"] = {name: _file_bytes(path) for name, path in graphs.items()}
    signatures = {name: graph_signature(path) for name, path in graphs.items()}
    row["same_structure"] = signatures["mtu"] == signatures["single"]  # same ops, wiring and shapes; weights aside
    flops = {
        name: {"torch": torch_flops(unet, one), "onnx": onnx_flops(_export_fixed(unet, one, scratch / f"{name}-b1"))}
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
    log(f"{task}: timing the folded MTU UNet against the single-task UNet, and that against itself ({rounds})")
    pair = lambda a, b: interleaved_rounds(opener(a), opener(b), config.rounds, config.pairs, config.warmup)  # noqa: E731
    # single vs single: the same graph against itself shows how far this protocol on this machine can resolve.
    row["unet_latency"] = {"mtu_vs_single": pair("mtu", "single"), "single_vs_single": pair("single", "single")}
    if "base" in graphs:
        row["unet_latency"]["mtu_vs_base"] = pair("mtu", "base")
    sessions = {name: session(path, config.threads, spinning=False) for name, path in graphs.items()}
    if config.e2e_repeats:
        mtu_run, single_run = (pipeline.end_to_end(sessions[k], feeds, config.e2e_steps) for k in ("mtu", "single"))
        row["e2e_latency"] = interleaved(mtu_run, single_run, config.e2e_repeats, 1)
        row["e2e_latency"]["steps"] = config.e2e_steps
    row["peak_rss_mb"] = {name: peak_rss_mb(path, feed, config.threads) for name, path in graphs.items()}
    row["coreml_latency"] = _coreml_latency(models, feed, scratch, config, log)
    ratio = row["unet_latency"]["mtu_vs_single"]["ratio"]
    log(f"{task}: {row['gflops']:.3f} GFLOPs/call (batch 1); folded / single latency {ratio:.3f}")
    return row


def _export_fixed(unet, feed: dict, folder: Path) -> Path:
    """A fixed-shape fp32 ONNX graph of `unet` (TorchScript exporter, opset 18), external data past 2 GB."""
    import warnings

    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if path.exists():
        return path
    args = tuple(feed[name] for name in UNET.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            UNetGraph(unet),
            args,
            str(path),
            input_names=list(UNET.inputs),
            output_names=list(UNET.outputs),
            opset_version=18,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


def _bench_bundle(checkpoint: Path, scratch: Path, config: BenchConfig, log: Log) -> dict:
    """Export the all-task bundle in fp32 and each quantization mode; sizes, quality, latency of mode ÷ fp32."""
    rows: dict = {}
    folders = {}
    for mode in ("none", *config.modes):
        log(f"exporting the all-task bundle ({mode})")
        export_config = ExportConfig(quantize=mode, image_count=config.image_count, seed=config.seed)
        folders[mode] = scratch / f"bundle-{mode}"
        manifest = export_onnx(checkpoint, export_config, folders[mode], log=lambda m: None)
        unet_rows = [
            r for r in manifest["graph_parity"] if r["component"] == ("unet" if mode == "none" else f"unet[{mode}]")
        ]
        rows[mode] = {
            "unet_bytes": _file_bytes(folders[mode] / "unet" / "model.onnx"),
            "graph_psnr_db": {r["task"]: r["psnr_db"] for r in unet_rows},
            "image_psnr_db": {r["task"]: r["psnr_db"] for r in manifest["image_parity"]},
            "sizes": manifest["sizes"],
        }
    fp32 = session(folders["none"] / "unet" / "model.onnx", config.threads, spinning=False)
    feeds = _bundle_feed(folders["none"], config.seed)
    for mode in config.modes:
        quantized = session(folders[mode] / "unet" / "model.onnx", config.threads, spinning=False)
        log(f"timing the {mode} bundle UNet against fp32 ({config.repeats} interleaved pairs)")
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


def _params(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def _machine(config: BenchConfig) -> dict:
    import os
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


def _coreml_row() -> dict:
    return {"skipped": COREML_SKIPPED} if sys.platform != "darwin" else {"rows": "per task, under coreml_latency"}


def _coreml_latency(models: _Models, feed: dict, scratch: Path, config: BenchConfig, log: Log) -> dict:
    """macOS: the folded and single-task UNets as mlpackages (fp16 compute, fixed batch), timed interleaved."""
    if sys.platform != "darwin":
        return {"skipped": COREML_SKIPPED}
    from mtu_export.export.coreml import _Converter, require_coremltools

    try:
        ct = require_coremltools()
    except ConfigError as exc:
        return {"skipped": str(exc)}
    converter = _Converter(ct, ExportConfig(), "iOS17", scratch, log)
    coreml_feed = dict(feed, timestep=feed["timestep"].reshape(1).expand(feed["sample"].shape[0]).contiguous())
    loaded = {}
    for name, unet in (("mtu", models.mtu), ("single", models.single)):
        path = scratch / f"{name}.mlpackage"
        converter.convert_module(UNetGraph(unet), coreml_feed, ["out_sample"]).save(str(path))
        loaded[name] = ct.models.MLModel(str(path))
    inputs = {k: v.numpy() for k, v in coreml_feed.items()}
    mtu_run, single_run = (lambda m=loaded[k]: m.predict(inputs) for k in ("mtu", "single"))
    return interleaved(mtu_run, single_run, config.repeats, config.warmup)


# -------------------------------------------------------------------------------------------------- training step
def train_step_ratio(base: Path, batch_size: int = 64, repeats: int = 8, warmup: int = 2, log: Log = print) -> dict:
    """MTU training step (the paper's trainable split) ÷ full fine-tune step of the same model on the same batch,
    timed in interleaved pairs (forward, backward, AdamW step)."""
    from mtu_export.config import TrainConfig
    from mtu_export.loop import process_state
    from mtu_export.train import TaskLoss, build_caches, load_base, make_batches, prepare_model, training_sources
    from mtu_export.vocab import tokenize

    vae, text_encoder, tokenizer, unet, scheduler = load_base(Path(base))
    cache_size = min(200, 4 * batch_size)
    configs = {
        kind: TrainConfig(batch_size=batch_size, cache_size=cache_size, trainable=kind) for kind in ("mtu", "full")
    }
    with tempfile.TemporaryDirectory(prefix="mtu-train-bench-") as work:
        sources = training_sources(configs["mtu"], Path(base))
        caches = build_caches(Path(work), sources, vae, tokenizer, process_state())
        batch = make_batches(
            configs["mtu"],
            caches,
            text_encoder,
            tokenize(tokenizer, [""]),
            scheduler,
            vae.config.scaling_factor,
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
        )
    steps = {}
    counts = {}
    for kind, config in configs.items():
        model = TaskLoss(prepare_model(config, unet), config.min_snr_gamma, scheduler).train()
        params = [p for p in model.parameters() if p.requires_grad]
        counts[kind] = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-6)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()

        steps[kind] = step
    log(f"timing MTU vs full fine-tune training steps (batch {batch_size}, {repeats} interleaved pairs)")
    timing = interleaved(steps["mtu"], steps["full"], repeats, warmup)
    return {
        "batch_size": batch_size,
        "trainable_parameters": counts,
        "mtu_vs_full": timing,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------- check
DEFAULT_TOLERANCES = {"latency_ratio_max": 1.10, "bundle_ratio_slack": 0.0, "graph_psnr_min_db": 60.0}
BASELINE_FORMAT = "mtu-export-bench-baseline/1"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# key -> (a table keyed by task / mode?, what each value must be, the test)
BASELINE_SCHEMA = {
    "latency_ratio_max": (False, "a number", _is_number),
    "bundle_ratio_max": (False, "a number", _is_number),
    "graph_psnr_min_db": (False, "a number", _is_number),
    "flops": (True, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "image_psnr_min_db": (True, "a number or null", lambda v: v is None or _is_number(v)),
}


def baseline_problems(baseline: dict) -> list[str]:
    """Every way `baseline` departs from what `make_baseline` writes: unknown format, keys missing, wrong types."""
    problems = []
    if baseline.get("format") != BASELINE_FORMAT:
        found = f"found {baseline['format']!r}" if "format" in baseline else "it is missing"
        problems.append(f"'format' should be {BASELINE_FORMAT!r}, {found}")
    for key, (table, expected, ok) in BASELINE_SCHEMA.items():
        value = baseline.get(key)
        if key not in baseline:
            problems.append(f"'{key}' is missing")
        elif table and not isinstance(value, dict):
            problems.append(f"'{key}' should be an object of {expected} per entry, found {_json_type(value)}")
        elif table:
            problems += [
                f"'{key}.{k}' should be {expected}, found {_json_type(v)}" for k, v in value.items() if not ok(v)
            ]
        elif not ok(value):
            problems.append(f"'{key}' should be {expected}, found {_json_type(value)}")
    modes = baseline.get("image_psnr_min_db")
    unknown = [m for m in modes if m not in ("none", *QUANT_MODES)] if isinstance(modes, dict) else []
    if unknown:
        problems.append(
            f"'image_psnr_min_db' has unknown mode(s) {', '.join(unknown)} (known: none, {', '.join(QUANT_MODES)})"
        )
    return problems


def _json_type(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    shown = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
    return "null" if value is None else f"{names.get(type(value), type(value).__name__)} {shown}"


def read_baseline(path: Path) -> dict:
    """A `--check` baseline, validated in full before any measuring; one ConfigError lists every problem."""
    baseline = read_json(Path(path))
    _require_valid(baseline, str(path))
    return baseline


def _require_valid(baseline: dict, where: str) -> None:
    problems = baseline_problems(baseline)
    if problems:
        raise ConfigError(
            f"{where} is not a valid bench baseline: {'; '.join(problems)} — fix it, or regenerate it with "
            "`mtu-export bench CHECKPOINT --save-baseline FILE`"
        )


def make_baseline(results: dict, tolerances: dict | None = None) -> dict:
    """A CI baseline from a run: exact FLOPs per task, the bundle ratio, PSNR floors, ratio tolerances."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    return {
        "format": BASELINE_FORMAT,
        "latency_ratio_max": tol["latency_ratio_max"],
        "flops": {task: row["flops_per_call_batch1"]["mtu"]["torch"] for task, row in results["tasks"].items()},
        "bundle_ratio_max": results["bundle"]["size_ratio"] + tol["bundle_ratio_slack"],
        "graph_psnr_min_db": tol["graph_psnr_min_db"],
        "image_psnr_min_db": {
            mode: math.floor(min(v for v in row["image_psnr_db"].values() if v is not None) - 3.0)
            if any(v is not None for v in row["image_psnr_db"].values())
            else None
            for mode, row in results["bundle"]["modes"].items()
        },
    }


def check(results: dict, baseline: dict) -> list[str]:
    """Every way `results` violates `baseline` (empty: the gate passes). Ratios only; no absolute times. A malformed
    baseline raises ConfigError listing all its problems."""
    _require_valid(baseline, "the baseline")
    problems = []
    limit = baseline["latency_ratio_max"]
    for task, row in results["tasks"].items():
        ratio = row["unet_latency"]["mtu_vs_single"]["ratio"]
        if ratio > limit:
            problems.append(f"{task}: folded / single-task UNet latency {ratio:.3f} exceeds {limit:.3f}")
        if row.get("same_structure") is not True:
            found = "not recorded (rerun bench)" if "same_structure" not in row else "differ"
            problems.append(f"{task}: folded and single-task graph structures {found}")
        flops = row["flops_per_call_batch1"]
        want = baseline["flops"].get(task)
        if want is None:
            problems.append(f"{task}: no FLOPs in the baseline; regenerate it with --save-baseline")
        elif flops["mtu"]["torch"] != want:
            problems.append(
                f"{task}: GFLOPs per call changed: {flops['mtu']['torch'] / 1e9:.6f}, baseline {want / 1e9:.6f}"
            )
        if flops["mtu"]["torch"] != flops["mtu"]["onnx"]:
            problems.append(
                f"{task}: torch counts {flops['mtu']['torch']} FLOPs, the ONNX graph {flops['mtu']['onnx']}"
            )
        if flops["mtu"]["torch"] != flops["single"]["torch"]:
            pair = f"{flops['mtu']['torch']} vs {flops['single']['torch']}"
            problems.append(f"{task}: folded MTU and single-task FLOPs differ ({pair})")
    bundle = results["bundle"]
    if bundle["size_ratio"] > baseline["bundle_ratio_max"]:
        problems.append(
            f"bundle bytes / one model {bundle['size_ratio']:.4f} exceeds {baseline['bundle_ratio_max']:.4f}"
        )
    for mode, row in bundle["modes"].items():
        if mode == "none":
            for task, value in row["graph_psnr_db"].items():
                if value is not None and value < baseline["graph_psnr_min_db"]:
                    problems.append(
                        f"{task}: exported UNet PSNR {value:.1f} dB below {baseline['graph_psnr_min_db']} dB"
                    )
        floor = baseline["image_psnr_min_db"].get(mode)
        for task, value in row["image_psnr_db"].items():
            if floor is not None and value is not None and value < floor:
                problems.append(f"{task} [{mode}]: end-to-end image PSNR {value:.1f} dB below its floor {floor} dB")
    return problems


# -------------------------------------------------------------------------------------------------------- report
def _rounds(config: dict) -> str:
    return (
        f"{config.get('rounds', 1)} rounds, each opening both graphs afresh and timing {config.get('pairs', 0)} "
        "interleaved single calls of each; ratio = median over rounds of median A ÷ median B"
    )


def _spread(latency: dict) -> str:
    return f"{min(latency['round_ratios']):.3f}–{max(latency['round_ratios']):.3f}"


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# mtu-export bench",
        "",
        f"`{results['checkpoint']}` on {m['processor']} ({m['cpus']} CPUs), onnxruntime {m['onnxruntime']} with "
        f"{m['threads']} threads. UNet latency: {_rounds(results['config'])}; the single-task UNet is also timed "
        "against itself (A/A), which shows how finely this machine resolves a ratio. Quantization modes: "
        f"{results['config']['repeats']} interleaved pairs after {results['config']['warmup']} warm-up runs, each "
        "timed sample at least 0.25 s, median A ÷ median B. End to end: "
        f"{results['config'].get('e2e_repeats', 0)} interleaved pairs of whole generations after 1 warm-up, median "
        "A ÷ median B (a coarse check; the UNet rows are the measurement). Everything is measured side by side in "
        "this run.",
        "",
        "## Folded MTU task vs single-task UNet",
        "",
        "| task | single-task reference | GFLOPs/call (torch = ONNX) | params MTU / single | ONNX graph structure | "
        "UNet ms MTU / single | ratio (rounds) | A/A: single ÷ single | end-to-end ratio | t2i: ratio vs base | "
        "peak RSS MB MTU / single |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, row in results["tasks"].items():
        flops = row["flops_per_call_batch1"]["mtu"]
        same = "=" if flops["torch"] == flops["onnx"] else "≠"
        lat = row["unet_latency"]["mtu_vs_single"]
        null = row["unet_latency"].get("single_vs_single")
        base = row["unet_latency"].get("mtu_vs_base")
        e2e = row.get("e2e_latency")
        cells = [
            task,
            row["single_kind"],
            f"{flops['torch'] / 1e9:.4f} {same} {flops['onnx'] / 1e9:.4f}",
            f"{row['parameters']['mtu']:,} / {row['parameters']['single']:,}",
            {True: "identical", False: "**differs**"}.get(row.get("same_structure"), "–"),
            f"{lat['a_median_ms']:.2f} / {lat['b_median_ms']:.2f}",
            f"**{lat['ratio']:.3f}**" + (f" ({_spread(lat)})" if "round_ratios" in lat else ""),
            f"{null['ratio']:.3f} ({_spread(null)})" if null else "–",
            f"{e2e['ratio']:.3f} ({e2e['steps']} steps)" if e2e else "–",
            f"{base['ratio']:.3f}" if base else "–",
            f"{row['peak_rss_mb']['mtu']:.0f} / {row['peak_rss_mb']['single']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    bundle = results["bundle"]
    sizes = bundle["modes"]["none"]["sizes"]
    lines += [
        "",
        "## All-task bundle and quantization",
        "",
        f"Bundle of {sizes['tasks']} tasks: {sizes['bundle_bytes'] / 1e6:.2f} MB = **{sizes['ratio']:.3f}** × one "
        f"single-task export ({sizes['single_task_bytes'] / 1e6:.2f} MB); UNet alone {sizes['unet_ratio']:.3f} ×.",
        "",
        "| mode | UNet MB | UNet latency ÷ fp32 | " + " | ".join(f"{t} image PSNR dB" for t in results["tasks"]) + " |",
        "|---|---|---|" + "---|" * len(results["tasks"]),
    ]
    for mode, row in bundle["modes"].items():
        latency = row.get("latency_vs_fp32")
        psnr = ["identical" if v is None else f"{v:.1f}" for v in row["image_psnr_db"].values()]
        name = "fp32" if mode == "none" else mode
        ratio = f"{latency['ratio']:.3f}" if latency else "1"
        lines.append(f"| {name} | {row['unet_bytes'] / 1e6:.2f} | {ratio} | " + " | ".join(psnr) + " |")
    if results.get("parity"):
        lines += [
            "",
            "## Quality parity (trainer, held-out split)",
            "",
            "| task | metric | MTU | single | ratio |",
            "|---|---|---|---|---|",
        ]
        for task, entry in results["parity"]["parity"].items():
            row = entry["metrics"][entry["primary"]]
            lines.append(
                f"| {task} | {entry['primary']} | {row['mtu']:.4f} | {row['single']:.4f} | {row['ratio']:.4f} |"
            )
    coreml = [
        f"{task} {row['coreml_latency']['ratio']:.3f}"
        for task, row in results["tasks"].items()
        if "ratio" in row.get("coreml_latency", {})
    ]
    status = "folded / single-task latency " + ", ".join(coreml) if coreml else results["coreml"].get("skipped", "")
    lines += ["", f"Core ML: {status}", ""]
    return "\n".join(lines)


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    mtu = [results["tasks"][t]["unet_latency"]["mtu_vs_single"]["a_median_ms"] for t in tasks]
    single = [results["tasks"][t]["unet_latency"]["mtu_vs_single"]["b_median_ms"] for t in tasks]
    x = np.arange(len(tasks))
    axes[0].bar(x - 0.2, mtu, 0.4, label="folded MTU")
    axes[0].bar(x + 0.2, single, 0.4, label="single-task")
    axes[0].set_xticks(x, tasks)
    axes[0].set_ylabel("UNet call, ms (median)")
    axes[0].legend()
    modes = results["bundle"]["modes"]
    for mode, row in modes.items():
        values = [v for v in row["image_psnr_db"].values() if v is not None]
        quality = min(values) if values else 100.0
        axes[1].scatter(row["unet_bytes"] / 1e6, quality, label=mode if mode != "none" else "fp32")
    axes[1].set_xlabel("bundle UNet, MB")
    axes[1].set_ylabel("worst task image PSNR vs torch, dB")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
