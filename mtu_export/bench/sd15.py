"""`make bench-sd15`: the fold's cost claims at Stable Diffusion v1.5 scale, with random weights.

The architecture is what costs: weights change neither FLOPs nor latency. A UNet is built from the SD1.5 config
(seeded), upcycled to four tasks with N=4, and its routers are set to a seeded non-uniform state (so every task's
fold differs from the base, as after training). The MTU checkpoint and the base UNet are saved once; for each
task a child process loads the checkpoint as `mtu-export onnx` would, folds the task, frees the rest and exports
its UNet to ONNX (fixed shapes: the CFG batch of 2 at 64×64 latents, 77 tokens; external data), and the parent
records the child's wall time and peak RSS; the single-task reference (base UNet with the task's conv_in) is
exported the same way. Then, side by side in this process: GFLOPs per call (torch, cross-checked on the graph),
parameters, folded ÷ single-task latency in interleaved pairs on `threads` threads (sessions with onnxruntime's
thread spinning off, as every benchmark here), and the bytes of the all-task bundle (one graph with a task_id input)
÷ one task's graph. The results open `sd15.{json,md}`; `bench.peers`, the second half, adds its own section to both.

Run: `python -m mtu_export.bench.sd15 --out benchmarks/results` (about 25 minutes and 8 GB RAM on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mtu_export import logs
from mtu_export.bench.memory import own_peak_rss_mb, release
from mtu_export.config import SD15_UNET_CONFIG, MoEConfig, OnnxConfig
from mtu_export.export.graphs import BUNDLE, UNET, BundleGraph, UNetGraph
from mtu_export.storage import tree_bytes

logger = logging.getLogger(__name__)

TASKS = ("t2i", "edit", "sr", "inpaint")
BATCH, LATENT, TOKENS = 2, 64, 77


def machine() -> dict:
    """The CPU a run measured (its vector and matrix extensions decide what int8 and bf16 gain) and the runtimes."""
    import platform

    import onnxruntime

    from mtu_export.machine import cpu_flags

    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "extensions": [f for f in wanted if f in flags],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def describe(m: dict) -> str:
    """The machine in one phrase, for the reports' headers."""
    return f"{m['cpu']}, {m['cpus']} cores, {', '.join(m['extensions']) or 'no AVX2'}; onnxruntime {m['onnxruntime']}"


def build_base(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()


def build_mtu(seed: int = 0, top_k: int | None = None):
    """The seeded base, upcycled (the base's own tensors are released), with trained-like routing (`top_k`: each
    task routed through its k heaviest experts, as `train --route top-k` trains it)."""
    from mtu_export.upcycle import upcycle_unet

    mtu = upcycle_unet(build_base(seed), MoEConfig(top_k=top_k))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, moe in mtu.moe_layers():  # a non-uniform routing per task, as after training
            last = moe.router.net[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
        mtu.task_embedding.weight.copy_(torch.randn(mtu.task_embedding.weight.shape, generator=g))
    return mtu


def feed(in_channels: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "sample": torch.randn(batch, in_channels, LATENT, LATENT, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, TOKENS, 768, generator=g),
    }


def export_one(kind: str, task: str, out: Path, models: Path) -> None:
    """Child process, the user's path: load the saved checkpoint (or base UNet), fold (or stand in, or bundle),
    free the rest, export one UNet graph as `mtu-export onnx` writes it (weights in external data)."""
    from mtu_export.bundle import bundle_tasks
    from mtu_export.checkpoint import load_checkpoint
    from mtu_export.export.onnx import write_graph
    from mtu_export.fold import fold_task
    from mtu_export.upcycle import load_unet, task_conv_in

    spec = MoEConfig().task(task)
    if kind.startswith("top"):  # a top-k checkpoint's sparse fold
        mtu = load_checkpoint(models / kind).model
        module, io, args = UNetGraph(fold_task(mtu, task).eval()), UNET, feed(spec.in_channels)
        del mtu
    elif kind == "single":
        unet = load_unet(models / "base")
        unet.conv_in = task_conv_in(unet.conv_in, spec)
        unet.register_to_config(in_channels=spec.in_channels)
        module, io, args = UNetGraph(unet.eval()), UNET, feed(spec.in_channels)
    else:
        mtu = load_checkpoint(models / "mtu").model
        if kind == "mtu":
            module, io, args = UNetGraph(fold_task(mtu, task).eval()), UNET, feed(spec.in_channels)
        else:
            bundle = bundle_tasks(mtu)
            module, io = BundleGraph(bundle), BUNDLE
            args = {**feed(bundle.in_channels), "task_id": torch.tensor(0, dtype=torch.int64)}
        del mtu
    release()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".raw-", dir=out.parent) as scratch:  # beside `out`: same disk
        write_graph(io, module, args, out, OnnxConfig(fixed_shapes=True, external_data=True), Path(scratch))
    seconds = time.perf_counter() - start
    print(json.dumps({"export_seconds": seconds, "peak_rss_mb": own_peak_rss_mb()}))


def _child(kind: str, task: str, out: Path, models: Path) -> dict:
    start = time.perf_counter()
    command = ["--export", kind, "--task", task, "--out", str(out), "--models", str(models)]
    result = subprocess.run(
        [sys.executable, "-m", "mtu_export.bench.sd15", *command],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"export of {kind} {task} failed: {result.stderr.strip().splitlines()[-1:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    info["process_seconds"] = time.perf_counter() - start
    return info


def run(out: Path, threads: int, repeats: int, tasks: tuple[str, ...]) -> dict:
    from mtu_export.bench.flops import onnx_flops, torch_flops
    from mtu_export.bench.timing import interleaved
    from mtu_export.export.runtime import session
    from mtu_export.fold import fold_task

    work = Path(tempfile.mkdtemp(prefix="mtu-sd15-"))
    results: dict = {
        "config": {
            "batch": BATCH,
            "latent": LATENT,
            "tokens": TOKENS,
            "threads": threads,
            "repeats": repeats,
            "experts": 4,
            "tasks": list(tasks),
        },
        "tasks": {},
    }
    from mtu_export.checkpoint import save_checkpoint

    models = work / "models"  # the children load these, as a user's export loads a checkpoint
    base = build_base()
    one = {k: (v[:1] if v.dim() else v) for k, v in feed(4).items()}
    results["gflops_base_batch1"] = torch_flops(base, one) / 1e9
    base_parameters = sum(p.numel() for p in base.parameters())
    base.save_pretrained(models / "base", safe_serialization=True)
    del base
    release()
    mtu = build_mtu()
    save_checkpoint(mtu, models / "mtu")
    results["parameters"] = {"base": base_parameters, "mtu": sum(p.numel() for p in mtu.parameters())}
    logger.info(
        f"SD1.5 base: {results['parameters']['base']:,} parameters, {results['gflops_base_batch1']:.1f} GFLOPs/call"
    )
    folded = {}
    for task in tasks:
        spec = mtu.config.task(task)
        folded[task] = {"gflops_batch2_torch": torch_flops(fold_task(mtu, task).eval(), feed(spec.in_channels)) / 1e9}
        release()
    del mtu
    release()
    for task in tasks:
        row = folded[task]
        for kind in ("mtu", "single"):
            logger.info(f"{task}: exporting the {kind} UNet in a child process")
            row[f"export_{kind}"] = _child(kind, task, work / task / kind, models)
        row["gflops_batch2_onnx"] = onnx_flops(work / task / "mtu" / "model.onnx") / 1e9
        row["gflops_batch2_single_onnx"] = onnx_flops(work / task / "single" / "model.onnx") / 1e9
        row["bytes"] = {kind: tree_bytes(work / task / kind) for kind in ("mtu", "single")}
        sessions = {
            kind: session(work / task / kind / "model.onnx", threads, spinning=False) for kind in ("mtu", "single")
        }
        inputs = {k: v.numpy() for k, v in feed(MoEConfig().task(task).in_channels).items()}
        logger.info(
            f"{task}: timing folded vs single-task ({repeats} interleaved pairs, batch {BATCH}, {threads} threads)"
        )
        mtu_run, single_run = (lambda s=sessions[k], x=inputs: s.run(None, x) for k in ("mtu", "single"))
        row["latency"] = interleaved(mtu_run, single_run, repeats, 1)
        del mtu_run, single_run  # the closures hold the sessions (3.4 GB each) until released
        sessions.clear()
        release()
        results["tasks"][task] = row
        logger.info(
            f"{task}: ratio {row['latency']['ratio']:.3f}, export peak {row['export_mtu']['peak_rss_mb']:.0f} MiB"
        )
        for kind in ("mtu", "single"):
            if task != tasks[0] or kind != "mtu":
                _clear(work / task / kind)
    logger.info("exporting the all-task bundle in a child process")
    results["bundle"] = _child("bundle", tasks[0], work / "bundle", models)
    results["bundle"]["bytes"] = tree_bytes(work / "bundle")
    results["bundle"]["ratio_to_one_task"] = results["bundle"]["bytes"] / results["tasks"][tasks[0]]["bytes"]["mtu"]
    _clear(work / "bundle")
    _clear(work / tasks[0] / "mtu")
    _clear(models)
    results["machine"], results["finished"] = machine(), now_utc()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd15.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "sd15.md").write_text(markdown(results))
    return results


SPARSE_ROUTES = (2, 1)  # top-k routings measured by `--sparse`


def run_sparse(out: Path, threads: int, repeats: int, tasks: tuple[str, ...]) -> dict:
    """Sparse folds at SD1.5 scale: the base upcycled with top-k routing (random weights, seeded routers), each
    task folded with its zero-weight experts dropped. GFLOPs per call of every task's sparse fold ÷ its single-task
    UNet (torch, cross-checked on the exported graph for the first task), and that task's sparse ÷ single-task
    latency in interleaved pairs. Written as the "sparse" section of `out`/sd15.json and sd15.md."""
    from mtu_export.bench.flops import onnx_flops, torch_flops
    from mtu_export.bench.timing import interleaved
    from mtu_export.checkpoint import save_checkpoint
    from mtu_export.export.runtime import session
    from mtu_export.fold import ffn_kept, fold_task, verify_fold
    from mtu_export.upcycle import task_conv_in

    work = Path(tempfile.mkdtemp(prefix="mtu-sd15-sparse-"))
    models, first = work / "models", tasks[0]
    result: dict = {"config": {"batch": BATCH, "latent": LATENT, "threads": threads, "repeats": repeats}, "routes": {}}
    base = build_base()
    base.save_pretrained(models / "base", safe_serialization=True)
    single_flops = {}
    for task in tasks:
        spec = MoEConfig().task(task)
        conv_in = base.conv_in
        base.conv_in = task_conv_in(conv_in, spec)
        single_flops[task] = torch_flops(base, feed(spec.in_channels))
        base.conv_in = conv_in
    result["gflops_single_batch2"] = {t: f / 1e9 for t, f in single_flops.items()}
    del base
    release()
    logger.info(f"exporting the single-task {first} UNet in a child process")
    single = _child("single", first, work / "single", models)
    for k in SPARSE_ROUTES:
        mtu = build_mtu(top_k=k)
        row: dict = {"gflops_ratio": {}}
        for task in tasks:
            folded = fold_task(mtu, task).eval()
            if task == first:
                row["fold_max_abs_diff"] = verify_fold(mtu, folded, task)
                row["ffn_kept"] = ffn_kept(mtu, folded)
            row["gflops_ratio"][task] = (
                torch_flops(folded, feed(mtu.config.task(task).in_channels)) / single_flops[task]
            )
            del folded
            release()
        save_checkpoint(mtu, models / f"top{k}")
        del mtu
        release()
        logger.info(f"top-{k}: exporting the sparse {first} fold in a child process")
        row["export"] = _child(f"top{k}", first, work / f"top{k}", models)
        graph_flops = onnx_flops(work / f"top{k}" / "model.onnx")
        row["gflops_ratio_onnx"] = graph_flops / onnx_flops(work / "single" / "model.onnx")
        inputs = {name: v.numpy() for name, v in feed(MoEConfig().task(first).in_channels).items()}
        sessions = {
            kind: session(work / kind / "model.onnx", threads, spinning=False) for kind in (f"top{k}", "single")
        }
        logger.info(f"top-{k}: timing the sparse {first} fold vs single-task ({repeats} interleaved pairs)")
        sparse_run, single_run = (lambda s=sessions[x], i=inputs: s.run(None, i) for x in (f"top{k}", "single"))
        row["latency"] = interleaved(sparse_run, single_run, repeats, 1)
        del sparse_run, single_run
        sessions.clear()
        release()
        _clear(work / f"top{k}")
        result["routes"][f"top-{k}"] = row
        logger.info(
            f"top-{k}: GFLOPs {row['gflops_ratio'][first]:.3f}x, latency {row['latency']['ratio']:.3f}x single-task"
        )
    result["single_export"] = single
    _clear(work)
    result["machine"], result["finished"] = machine(), now_utc()
    write_sparse(out, result)
    return result


def write_sparse(out: Path, result: dict) -> None:
    """Add `result` as the "sparse" section of `out`/sd15.json (the other sections kept) and rewrite sd15.md."""
    from mtu_export.bench import peers
    from mtu_export.storage import read_json, write_json

    path = out / "sd15.json"
    both = read_json(path) if path.is_file() else {}
    both["sparse"] = result
    write_json(path, both)
    text = (markdown(both) + "\n" if "tasks" in both else sparse_markdown(result)) + (
        peers.markdown(both["peers"]) if "peers" in both else ""
    )
    tmp = out / ".sd15.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "sd15.md")


def sparse_markdown(r: dict) -> str:
    c = r["config"]
    tasks = list(r["gflops_single_batch2"])
    lines = [
        "## Sparse folds: top-k routing (random weights)",
        "",
        "Made by `python -m mtu_export.bench.sd15 --sparse` (in `make bench-sd15`). The SD1.5 UNet upcycled with N=4 "
        "and routed top-k (seeded routers); each task folded with its zero-weight experts dropped (exact: fold vs "
        "routed below), so every FFN keeps k/N of its hidden units. GFLOPs per call (batch "
        f"{c['batch']}, {c['latent']}×{c['latent']} latents) ÷ the single-task UNet (base with the task's conv_in), "
        f"counted by torch (ONNX graph count for {tasks[0]} in brackets); latency of {tasks[0]}'s sparse fold ÷ the "
        f"single-task graph, {c['repeats']} interleaved pairs on {c['threads']} threads. Finished {r['finished']} on "
        f"{describe(r['machine'])}.",
        "",
        "| routing | FFN width kept | fold vs routed max abs diff | "
        + " | ".join(f"{t} GFLOPs ÷ single" for t in tasks)
        + f" | {tasks[0]} sparse ms | single ms | latency ÷ single |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    for name, row in r["routes"].items():
        lat = row["latency"]
        ratios = [f"**{row['gflops_ratio'][t]:.4f}**" for t in tasks]
        ratios[0] += f" ({row['gflops_ratio_onnx']:.4f})"
        lines.append(
            f"| {name} | {row['ffn_kept']:.0%} | {row['fold_max_abs_diff']:.1e} | "
            + " | ".join(ratios)
            + f" | {lat['a_median_ms']:.0f} | {lat['b_median_ms']:.0f} | **{lat['ratio']:.3f}** |"
        )
    return "\n".join(lines) + "\n"


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Stable Diffusion v1.5 scale (random weights)",
        "",
        "Made by `make bench-sd15` (`python -m mtu_export.bench.sd15 --out benchmarks/results`). UNet from the SD1.5 "
        f"config, upcycled to {len(c['tasks'])} tasks with N={c['experts']}, routers set to a seeded non-uniform "
        f"state; each task folded and exported to ONNX (opset 18, fixed shapes: batch {c['batch']}, "
        f"{c['latent']}×{c['latent']} latents, {c['tokens']} tokens); onnxruntime on {c['threads']} threads, "
        f"{c['repeats']} interleaved pairs. "
        + (f"Finished {r['finished']} on {describe(r['machine'])}." if "machine" in r else "Machine not recorded."),
        "",
        f"Parameters: base {r['parameters']['base']:,}; MTU {r['parameters']['mtu']:,} "
        f"({r['parameters']['mtu'] / r['parameters']['base']:.5f} ×). GFLOPs per call (batch 1, torch with CPU SDPA "
        f"counted): **{r['gflops_base_batch1']:.1f}**.",
        "",
        "| task | GFLOPs batch 2 torch / ONNX (single ONNX) | folded ms | single ms | folded ÷ single | export s | "
        "export peak RSS MiB | graph GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, row in r["tasks"].items():
        lat = row["latency"]
        lines.append(
            f"| {task} | {row['gflops_batch2_torch']:.2f} / {row['gflops_batch2_onnx']:.2f} "
            f"({row['gflops_batch2_single_onnx']:.2f}) | {lat['a_median_ms']:.0f} | {lat['b_median_ms']:.0f} | "
            f"**{lat['ratio']:.3f}** | {row['export_mtu']['export_seconds']:.0f} | "
            f"{row['export_mtu']['peak_rss_mb']:.0f} | {row['bytes']['mtu'] / 1e9:.2f} |"
        )
    b = r["bundle"]
    lines += [
        "",
        f"All-task bundle (one graph, task_id input): {b['bytes'] / 1e9:.3f} GB = **{b['ratio_to_one_task']:.4f}** × "
        f"one task's graph; its export took {b['export_seconds']:.0f} s at {b['peak_rss_mb']:.0f} MiB peak RSS.",
        "",
    ]
    if "sparse" in r:
        lines += [sparse_markdown(r["sparse"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--sparse", action="store_true", help="Measure top-k sparse folds (the 'sparse' section).")
    parser.add_argument("--export", help=argparse.SUPPRESS)  # mtu, single, bundle or top<k>: one child export
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logs.install(logs.plain_handler())  # progress lines on stderr
    if args.export:
        export_one(args.export, args.task, args.out, args.models)
        return
    if args.sparse:
        sparse = run_sparse(args.out, args.threads, args.repeats, tuple(t for t in args.tasks.split(",") if t))
        shown = ", ".join(f"{name} {row['latency']['ratio']:.3f}" for name, row in sparse["routes"].items())
        print(f"wrote the sparse section of {args.out / 'sd15.md'}: latency ÷ single-task {shown}")
        return
    results = run(args.out, args.threads, args.repeats, tuple(t for t in args.tasks.split(",") if t))
    print(f"wrote {args.out / 'sd15.md'}: bundle {results['bundle']['ratio_to_one_task']:.4f} x one task")


if __name__ == "__main__":
    main()
