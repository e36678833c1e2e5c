"""`make bench-sd15` (second half): our exported UNet graphs against what a user would otherwise run, side by side at
Stable Diffusion v1.5 scale (random weights: weights change neither FLOPs nor latency).

One folded task (t2i, from a seeded MTU model with non-uniform routing) is saved as a diffusers pipeline folder (the
SD1.5 UNet with a small text encoder and VAE: only the UNet is measured) and exported eight ways:

- `optimum`: optimum-onnx's own export of the folder (`main_export`), the reference every ratio divides by;
- `optimum+ort-opt`: that graph after onnxruntime's transformer optimizer with CPU settings (model_type "unet");
- `ours`: `mtu-export onnx`'s fp32 graph; `ours-fused`: with `--attention fused` (MultiHeadAttention);
- `ours-fused+ort-opt`: the fused graph after the same optimizer (its LayerNorm / Gelu / bias fusions);
- `ours-fused+optimize`: the fused graph as `--optimize` saves it (onnxruntime's own session optimizations, done
  once at export instead of at every load);
- `ours-fused+dynamic-int8`: the fused graph with dynamic int8 MatMul/Gemm weights;
- `ours-fused+static-int8`: the fused graph as `--quantize static-int8` writes it (QDQ int8 Conv, MatMul and Gemm;
  calibrated on a guided trajectory with another seed than the one PSNR is measured on).

Per graph: latency ÷ optimum's (interleaved pairs on `threads` threads, CFG batch 2, 64×64 latents, 77 tokens;
optimum's graph is timed against a second session of itself, the control that shows this run's noise),
achieved GFLOP/s ÷ this machine's peak fp32 GEMM GFLOP/s (the best of large MatMuls and the UNet's own 3×3
convolutions in onnxruntime, same run, same threads, before and after the timing), for the fp32 graphs also the
GFLOP/s of their convolution and MatMul layers alone (onnxruntime's profiler: the GEMM-bound layers), peak RSS of
a process that loads it and runs one call, the seconds an onnxruntime session takes to load it, bytes on disk,
per-call PSNR against the fp32 torch UNet on inputs recorded along a short guided sampling trajectory, and which
operators run in int8 (counted in the graph onnxruntime actually runs: its session's optimized model, after the QDQ
fusions into QLinearConv and friends).

The results go into `sd15.{json,md}` as their "peers" section, beside the fold half (`sd15.py`), with the speed
issue's goals judged against the control's noise.

Run: `python -m mtu_export.bench.peers --out benchmarks/results` (about 45 minutes and 20 GB RAM on 2 cores).
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
from pathlib import Path

import numpy as np
import torch

from mtu_export import logs
from mtu_export.bench.memory import release
from mtu_export.bench.sd15 import BATCH, LATENT, TOKENS, build_mtu, describe, machine, now_utc
from mtu_export.export.runtime import op_census, ops_run

logger = logging.getLogger(__name__)

REFERENCE = "optimum"
INT8_OPS = (
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
)
FLOAT_GEMM_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
CALIBRATION_SEED = 11


# ---------------------------------------------------------------------------------------------------- the folder
def write_pipeline(unet, folder: Path) -> Path:
    """A StableDiffusionPipeline folder around `unet`: a 1-layer text encoder of SD's width and a small factor-8
    VAE (they only need to export; the UNet is what is measured)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from mtu_export.shapes.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.model_max_length = TOKENS
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=512,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=TOKENS,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=LATENT * 8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# -------------------------------------------------------------------------------------------------------- graphs
def export_optimum(pipeline: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(str(pipeline), str(out), task="text-to-image", library_name="diffusers", device="cpu",
                do_validation=False)  # fmt: skip
    return out / "unet" / "model.onnx"


def ort_optimize(src: Path, dst: Path) -> Path:
    """onnxruntime's transformer optimizer with the CPU settings of its Stable Diffusion guide (no CUDA-only ops)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):  # fmt: skip
        setattr(options, name, False)
    model = optimize_model(str(src), model_type="unet", opt_level=0, use_gpu=False, optimization_options=options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=True, all_tensors_to_one_file=True)
    return dst


def save_optimize(src: Path, dst: Path) -> Path:
    """`src` as `mtu-export onnx --optimize` saves a graph (its weights external, as at this size they must be)."""
    from mtu_export.export.onnx import OPTIMIZE_LEVEL
    from mtu_export.export.runtime import save_optimized

    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_optimized(src, dst, OPTIMIZE_LEVEL, external=True)


def export_ours(pipeline: Path, out: Path, fused: bool) -> Path:
    """The pipeline's UNet as `mtu-export onnx` writes it (loaded from disk, as the command does)."""
    from mtu_export.config import OnnxConfig
    from mtu_export.export.attention import fuse_attention_
    from mtu_export.export.graphs import UNET, UNetGraph
    from mtu_export.export.onnx import write_graph
    from mtu_export.upcycle import load_unet

    unet = load_unet(pipeline).float().eval()
    if fused:
        fuse_attention_(unet)
    with tempfile.TemporaryDirectory(prefix="mtu-peers-") as scratch:
        return write_graph(UNET, UNetGraph(unet), feed(), out, OnnxConfig(external_data=True), Path(scratch))


def in_child(function: str, *args: Path | bool) -> Path:
    """Run `function(*args)` of this module in a fresh process (each export, optimization and quantization of a
    3.4 GB graph peaks at several times that; a child returns it all to the OS) and return the path it prints."""
    code = (
        "import sys\nfrom pathlib import Path\nimport mtu_export.bench.peers as b\n"
        "args = [a == 'True' if a in ('True', 'False') else Path(a) for a in sys.argv[2:]]\n"
        "print(getattr(b, sys.argv[1])(*args))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, function, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{function} failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def quantize_dynamic(src: Path, dst: Path) -> Path:
    """Dynamic int8 of `src` (`--quantize dynamic-int8`'s handler) with the exporter's default weights (7-bit on an
    x86 CPU without VNNI)."""
    from mtu_export.quantize import quantize_onnx, saturating_int8_cpu

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_onnx("dynamic-int8", src, dst, reduce_range=saturating_int8_cpu())
    return dst


def quantize_static(src: Path, calibration: Path, dst: Path) -> Path:
    """Static QDQ int8 of `src` (`--quantize static-int8`'s handler), calibrated on the UNet inputs saved in
    `calibration` (an .npz of one guided trajectory with another seed than the one PSNR is measured on), with the
    exporter's default weights (7-bit on an x86 CPU without VNNI)."""
    from mtu_export.quantize import quantize_onnx, saturating_int8_cpu

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_onnx("static-int8", src, dst, load_feeds(calibration), reduce_range=saturating_int8_cpu())
    return dst


def quantize_w8a16(src: Path, calibration: Path, dst: Path) -> Path:
    """QDQ with 8-bit weights and 16-bit activations (`--quantize w8a16`'s handler), calibrated as quantize_static."""
    from mtu_export.quantize import quantize_onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_onnx("w8a16", src, dst, load_feeds(calibration))
    return dst


def save_feeds(feeds: list[dict], path: Path) -> Path:
    np.savez(path, **{f"{i}/{k}": v for i, one in enumerate(feeds) for k, v in one.items()})
    return path


def load_feeds(path: Path) -> list[dict]:
    data = np.load(path)
    feeds: dict[int, dict] = {}
    for key in data.files:
        index, name = key.split("/")
        feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def feed(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(BATCH, TOKENS, 768, generator=g),
    }


@torch.no_grad()
def trajectory_feeds(unet, steps: int = 2, seed: int = 3) -> tuple[list[dict], list[np.ndarray]]:
    """UNet inputs along a short classifier-free-guided DDIM trajectory (text and empty embeddings), with the torch
    outputs as references."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=g)
    hidden = torch.cat([torch.randn(1, TOKENS, 768, generator=g), torch.zeros(1, TOKENS, 768)])
    feeds, outputs = [], []
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2)
        one = {"sample": x, "timestep": t.float(), "encoder_hidden_states": hidden}
        out = unet(x, t, hidden).sample
        feeds.append({k: v.numpy() for k, v in one.items()})
        outputs.append(out.numpy())
        text, empty = out.chunk(2)
        latents = scheduler.step(empty + 7.5 * (text - empty), t, latents).prev_sample
    return feeds, outputs


# ------------------------------------------------------------------------------------------------------ measuring
PEAK_PROBES = (("MatMul", 1024), ("MatMul", 2048), ("Conv3x3", 640), ("Conv3x3", 1280))


def peak_gemm_gflops(threads: int, repeats: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of GEMM-bound kernels in onnxruntime on `threads` threads, best of `repeats` runs each: square
    MatMuls and the UNet's own 3×3 convolutions (640 channels at 32×32, 1280 at 16×16, batch 2; onnxruntime runs
    them in its NCHWc kernels, which here reach more than its MatMul does). The peak is the best of them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    found = {}
    for op, n in PEAK_PROBES:
        if op == "MatMul":
            shape = out = [n, n]
            flops = 2 * n**3
            weights = [numpy_helper.from_array(rng.standard_normal((n, n), np.float32), "w")]
            node = helper.make_node("MatMul", ["x", "w"], ["y"])
        else:
            side = {640: 32, 1280: 16}[n]
            shape, out = [2, n, side, side], [2, n, side, side]
            flops = 2 * 2 * n * n * 9 * side * side
            weights = [numpy_helper.from_array(0.01 * rng.standard_normal((n, n, 3, 3), np.float32), "w")]
            node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
        graph = helper.make_graph([node], "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], weights)  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = rng.standard_normal(shape, dtype=np.float32)
        best = 0.0
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sess.run(None, {"x": x})
            best = max(best, flops / (time.perf_counter() - start) / 1e9)
        found[f"{op} {n}"] = best
    return found


def gemm_throughput(path: Path, feed: dict, threads: int, runs: int = 2) -> dict[str, dict]:
    """Per operator kind, the GEMM-bound work of one call as onnxruntime runs it (Conv, FusedConv and their NCHWc
    forms; MatMul, FusedMatMul, Gemm): node count, GFLOPs (from the shapes onnxruntime's profiler records per node:
    2 × output elements × weight elements ÷ output channels for a convolution, 2·M·K·N for a product), the seconds
    its kernels took (each node's fastest of `runs` profiled calls) and the GFLOP/s that makes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="mtu-profile-") as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    fastest: dict[str, tuple[float, str, float]] = {}
    for event in events:
        args = event.get("args", {})
        kind = {"Conv": "Conv", "FusedConv": "Conv", "MatMul": "MatMul", "FusedMatMul": "MatMul", "Gemm": "MatMul"}
        if event.get("cat") != "Node" or args.get("op_name") not in kind:
            continue
        flops = _node_flops(args["op_name"], args.get("input_type_shape", []), args.get("output_type_shape", []))
        name, seconds = event["name"], event["dur"] / 1e6
        if flops and (name not in fastest or seconds < fastest[name][0]):
            fastest[name] = (seconds, kind[args["op_name"]], flops)
    totals: dict[str, dict] = {}
    for seconds, op, flops in fastest.values():
        row = totals.setdefault(op, {"nodes": 0, "gflops": 0.0, "seconds": 0.0})
        row["nodes"] += 1
        row["gflops"] += flops / 1e9
        row["seconds"] += seconds
    for row in totals.values():
        row["gflops_per_s"] = row["gflops"] / row["seconds"]
    return totals


def _node_flops(op: str, inputs: list[dict], outputs: list[dict]) -> float:
    shapes = [next(iter(d.values())) for d in inputs]
    out = next(iter(outputs[0].values())) if outputs else []
    if not shapes or not out:
        return 0.0
    if op in ("Conv", "FusedConv"):
        channels = out[1] * (out[4] if len(out) == 5 else 1)  # NCHWc: [N, C/8, H, W, 8]
        return 2.0 * float(np.prod(out)) * float(np.prod(shapes[1])) / channels
    return 2.0 * float(np.prod(out)) * shapes[0][-1]  # K of [.., M, K] · [K, N] (Gemm: transB keeps A as is)


def psnr_per_call(path: Path, feeds: list[dict], references: list[np.ndarray], threads: int) -> float | None:
    from mtu_export.export.runtime import session
    from mtu_export.metrics import psnr_db

    sess = session(path, threads)
    got = np.concatenate([sess.run(None, f)[0].ravel() for f in feeds])
    return psnr_db(np.concatenate([r.ravel() for r in references]), got)


def load_seconds(path: Path, threads: int, repeats: int = 2) -> float:
    """The fastest of `repeats` onnxruntime session creations for `path` (reading, optimizing, preparing kernels)."""
    from mtu_export.export.runtime import session

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sess = session(path, threads)
        best = min(best, time.perf_counter() - start)
        del sess
        release()
    return best


def time_against(reference: Path, other: Path, threads: int, repeats: int) -> dict:
    """`other` ÷ `reference` in `repeats` interleaved pairs of single calls, each graph in its own session with
    onnxruntime's thread spinning off (two sessions take turns on the same cores; `other` may be `reference` again:
    the control)."""
    from mtu_export.bench.timing import interleaved
    from mtu_export.export.runtime import session

    inputs = {k: v.numpy() for k, v in feed().items()}
    sessions = {"a": session(other, threads, spinning=False), "b": session(reference, threads, spinning=False)}
    result = interleaved(lambda: sessions["a"].run(None, inputs), lambda: sessions["b"].run(None, inputs), repeats, 1)
    sessions.clear()  # 3.4 GB each
    release()
    return result


# ------------------------------------------------------------------------------------------------------------ run
def folded_unet(smoke: bool = False):
    """The folded t2i UNet of the seeded SD1.5 MTU model; `smoke`: a narrow UNet of the same layout, to check the
    benchmark's plumbing in seconds (its numbers mean nothing)."""
    from mtu_export.fold import fold_task

    if smoke:
        from diffusers import UNet2DConditionModel

        from mtu_export.config import SD15_UNET_CONFIG

        torch.manual_seed(0)
        return UNet2DConditionModel(**{**SD15_UNET_CONFIG, "block_out_channels": (32, 32, 64, 64)}).eval()
    mtu = build_mtu()
    unet = fold_task(mtu, "t2i").eval()
    del mtu
    release()
    return unet


def run(out: Path, threads: int, repeats: int, smoke: bool = False) -> dict:
    from mtu_export.bench.flops import torch_flops
    from mtu_export.bench.memory import peak_rss_mb
    from mtu_export.storage import tree_bytes

    work = Path(tempfile.mkdtemp(prefix="mtu-peers-"))
    unet = folded_unet(smoke)
    gflops = torch_flops(unet, feed()) / 1e9
    logger.info(f"folded t2i: {gflops:.1f} GFLOPs per call (batch {BATCH}); recording trajectory inputs")
    feeds, references = trajectory_feeds(unet)
    calibration = save_feeds(trajectory_feeds(unet, steps=4, seed=CALIBRATION_SEED)[0], work / "calibration.npz")
    write_pipeline(unet, work / "pipeline")
    del unet
    release()
    graphs: dict[str, Path] = {}
    logger.info("exporting in child processes: ours, ours-fused, optimum (main_export)")
    graphs["ours"] = in_child("export_ours", work / "pipeline", work / "ours" / "unet", False)
    graphs["ours-fused"] = in_child("export_ours", work / "pipeline", work / "ours-fused" / "unet", True)
    graphs[REFERENCE] = in_child("export_optimum", work / "pipeline", work / "optimum")
    logger.info(
        "onnxruntime's transformer optimizer on optimum's graph and ours-fused; --optimize, dynamic int8 of ours-fused"
    )
    graphs["optimum+ort-opt"] = in_child("ort_optimize", graphs[REFERENCE], work / "optimum-opt" / "model.onnx")
    graphs["ours-fused+ort-opt"] = in_child("ort_optimize", graphs["ours-fused"], work / "fused-opt" / "model.onnx")
    graphs["ours-fused+optimize"] = in_child("save_optimize", graphs["ours-fused"], work / "fused-saved" / "model.onnx")
    graphs["ours-fused+dynamic-int8"] = in_child("quantize_dynamic", graphs["ours-fused"], work / "int8" / "model.onnx")
    logger.info("static int8 (QDQ) of ours-fused, calibrated on a 4-step guided trajectory (another seed)")
    graphs["ours-fused+static-int8"] = in_child(
        "quantize_static", graphs["ours-fused"], calibration, work / "static-int8" / "model.onnx"
    )
    probes = peak_gemm_gflops(threads)
    peak = max(probes.values())
    logger.info(
        f"peak fp32 GEMM on {threads} threads: {peak:.0f} GFLOP/s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in probes.items())
        + ")"
    )
    rows = {}
    for name, path in graphs.items():
        row = {"bytes": tree_bytes(path.parent), "peak_rss_bytes": int(peak_rss_mb(path, feed(), threads) * 2**20)}
        row["psnr_per_call_db"] = psnr_per_call(path, feeds, references, threads)
        row["load_s"] = load_seconds(path, threads)
        census = op_census(path)
        if "int8" not in name:  # where fp32 time goes, and how close its GEMM-bound layers come to the peak
            row["gemm_layers"] = gemm_throughput(path, {k: v.numpy() for k, v in feed().items()}, threads)
        if "int8" in name:
            ran = ops_run(path, threads)
            row["int8_ops"] = {op: n for op, n in ran.items() if op in INT8_OPS}
            row["float_gemm_ops"] = {op: n for op, n in ran.items() if op in FLOAT_GEMM_OPS}
        else:
            row["int8_ops"] = {}
        row["attention_ops"] = {op: census[op] for op in ("MultiHeadAttention", "Attention", "Softmax") if op in census}
        # the reference against a second session of itself: the control, how finely this run resolves a ratio
        logger.info(f"timing {name} against {REFERENCE} ({repeats} interleaved pairs)")
        row["latency"] = time_against(graphs[REFERENCE], path, threads, repeats)
        row["ratio_to_optimum"] = 1.0 if name == REFERENCE else row["latency"]["ratio"]
        rows[name] = row
        logger.info(f"{name}: ratio {row['latency']['ratio']:.3f}, PSNR {row['psnr_per_call_db']}")
    # optimum's time per call: the median over its pairings; every other row is its ratio times that (the ratio is
    # what was measured side by side; absolute times drift with the machine's load between pairings)
    later = peak_gemm_gflops(threads)  # again after the timing: the machine's best of both
    probes = {k: max(v, later[k]) for k, v in probes.items()}
    peak = max(probes.values())
    for row in rows.values():
        for layers in row.get("gemm_layers", {}).values():
            layers["fraction_of_peak_gemm"] = layers["gflops_per_s"] / peak
    reference_ms = float(np.median([r["latency"]["b_median_ms"] for r in rows.values()]))
    for row in rows.values():
        row["ms"] = row["ratio_to_optimum"] * reference_ms
        row["gflops_per_s"] = gflops / (row["ms"] / 1e3)
        row["fraction_of_peak_gemm"] = row["gflops_per_s"] / peak
    result = {
        "config": {"batch": BATCH, "latent": LATENT, "tokens": TOKENS, "threads": threads, "repeats": repeats},
        "machine": machine(),
        "gflops_per_call": gflops,
        "peak_gemm_gflops": peak,
        "peak_gemm_probes_gflops": probes,
        "graphs": rows,
        "finished": now_utc(),
    }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    write_results(out, result)
    return result


def write_results(out: Path, result: dict) -> None:
    """Add `result` as the "peers" section of `out`/sd15.json, beside the fold half that `sd15.run` wrote there in
    the same `make bench-sd15` (each half states when it finished), and rewrite sd15.md with both halves."""
    from mtu_export.bench import sd15
    from mtu_export.storage import read_json, write_json

    path = out / "sd15.json"
    both = read_json(path) if path.is_file() else {}
    both["peers"] = result
    write_json(path, both)
    text = (sd15.markdown(both) + "\n" if "tasks" in both else "") + markdown(result)
    tmp = out / ".sd15.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "sd15.md")


FP32_GOAL, INT8_GOAL, INT8_PSNR_MIN_DB = 0.85, 0.50, 30.0  # the speed issue's targets, ÷ optimum's fp32 export


def verdict(r: dict) -> dict:
    """Our best fp32 and int8 rows against the goals, and whether each still meets its goal when made slower by this
    run's noise: the control's largest relative distance from 1 (its headline ratio or any of its pairs)."""
    control = r["graphs"][REFERENCE]["latency"]
    noise = max(abs(control["ratio"] - 1), *(abs(x - 1) for x in control["pair_ratio_range"]))
    ours = {k: v for k, v in r["graphs"].items() if k.startswith("ours")}
    fp32 = min((k for k in ours if "int8" not in k), key=lambda k: ours[k]["ratio_to_optimum"])
    int8 = [k for k in ours if "int8" in k and (ours[k]["psnr_per_call_db"] or 0) >= INT8_PSNR_MIN_DB]
    found = {"noise": noise, "fp32": _against(fp32, ours[fp32]["ratio_to_optimum"], FP32_GOAL, noise)}
    if int8:
        best = min(int8, key=lambda k: ours[k]["ratio_to_optimum"])
        found["int8"] = _against(best, ours[best]["ratio_to_optimum"], INT8_GOAL, noise)
    return found


def _against(name: str, ratio: float, goal: float, noise: float) -> dict:
    # the noise is relative (the control's ratio scatters around 1), so it scales with the ratio it blurs
    return {
        "graph": name,
        "ratio": ratio,
        "goal": goal,
        "met": ratio <= goal,
        "beyond_noise": ratio * (1 + noise) <= goal,
    }


def markdown(r: dict) -> str:
    c = r["config"]
    control = r["graphs"][REFERENCE]["latency"]
    lines = [
        "## Our exported UNet graphs vs the peers' (random weights)",
        "",
        f"Made by `make bench-sd15` (`python -m mtu_export.bench.peers`). Folded t2i UNet, batch {c['batch']} "
        f"(classifier-free guidance), {c['latent']}×{c['latent']} latents, {c['tokens']} tokens, onnxruntime CPU "
        f"on {c['threads']} threads, thread spinning off; {c['repeats']} interleaved pairs against optimum's export "
        f"per row (optimum's own row: against a second session of itself, the control). "
        f"{r['gflops_per_call']:.0f} GFLOPs per call; peak fp32 GEMM measured in the same run: "
        f"{r['peak_gemm_gflops']:.0f} GFLOP/s (the best of "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_gemm_probes_gflops"].items())
        + f"). Finished {r.get('finished', '?')} on {describe(r['machine'])}.",
        "",
        "| graph | ms per call | ÷ optimum | pairs' ratios | GFLOP/s ÷ peak GEMM | Conv / MatMul layers ÷ peak | "
        "per-call PSNR dB | peak RSS GB | load s | disk GB | attention ops | int8 ops (as onnxruntime runs them) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, row in r["graphs"].items():
        psnr = "exact" if row["psnr_per_call_db"] is None else f"{row['psnr_per_call_db']:.1f}"
        attention = ", ".join(f"{k} {v}" for k, v in row["attention_ops"].items()) or "-"
        int8 = ", ".join(f"{k} {v}" for k, v in row["int8_ops"].items()) or "-"
        if row.get("float_gemm_ops"):
            int8 += " (float: " + ", ".join(f"{k} {v}" for k, v in row["float_gemm_ops"].items()) + ")"
        layers = row.get("gemm_layers", {})
        gemm = " / ".join(
            f"{layers[k]['fraction_of_peak_gemm']:.2f}" if k in layers else "-" for k in ("Conv", "MatMul")
        )
        low, high = row["latency"]["pair_ratio_range"]
        ratio = f"**{row['ratio_to_optimum']:.3f}**" + (
            f" (control {control['ratio']:.3f})" if name == REFERENCE else ""
        )
        lines.append(
            f"| {name} | {row['ms']:.0f} | {ratio} | {low:.3f}–{high:.3f} | {row['fraction_of_peak_gemm']:.2f} | "
            f"{gemm if layers else '-'} | {psnr} | {row['peak_rss_bytes'] / 1e9:.2f} | {row['load_s']:.1f} | "
            f"{row['bytes'] / 1e9:.2f} | {attention} | {int8} |"
        )
    v = verdict(r)
    lines += [
        "",
        f"This run's noise, the control's largest distance from 1: ±{100 * v['noise']:.1f} %. A goal is "
        "met beyond the noise when the ratio, made that much slower, still meets it.",
    ]
    for kind in ("fp32", "int8"):
        if kind not in v:
            lines.append(f"- best {kind}: no graph reached {INT8_PSNR_MIN_DB:.0f} dB per call.")
            continue
        g = v[kind]
        state = "met beyond the noise" if g["beyond_noise"] else "met, within the noise" if g["met"] else "missed"
        lines.append(f"- best {kind}: {g['graph']} {g['ratio']:.3f} ÷ optimum (goal ≤ {g['goal']:.2f}): {state}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="A narrow UNet: checks the plumbing, not the numbers.")
    args = parser.parse_args()
    logs.install(logs.plain_handler())  # progress lines on stderr
    result = run(args.out, args.threads, args.repeats, smoke=args.smoke)
    best = min(v["ratio_to_optimum"] for k, v in result["graphs"].items() if k.startswith("ours"))
    print(f"wrote the peers' section of {args.out / 'sd15.md'}: best of ours ÷ optimum {best:.3f}")


if __name__ == "__main__":
    main()
