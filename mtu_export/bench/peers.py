"""`make bench-sd15` (second half): our exported UNet graphs against what a user would otherwise run, side by side at
Stable Diffusion v1.5 scale (random weights: weights change neither FLOPs nor latency).

One folded task (t2i, from a seeded MTU model with non-uniform routing) is saved as a diffusers pipeline folder (the
SD1.5 UNet with a small text encoder and VAE: only the UNet is measured) and exported five ways:

- `optimum`: optimum-onnx's own export of the folder (`main_export`), the reference every ratio divides by;
- `optimum+ort-opt`: that graph after onnxruntime's transformer optimizer with CPU settings (model_type "unet");
- `ours`: `mtu-export onnx`'s fp32 graph; `ours-fused`: with `--attention fused` (MultiHeadAttention);
- `ours-fused+ort-opt`: the fused graph after the same optimizer (its LayerNorm / Gelu / bias fusions);
- `ours-fused+dynamic-int8`: the fused graph with dynamic int8 MatMul/Gemm weights;
- `ours-fused+static-int8`: the fused graph as `--quantize static-int8` writes it (QDQ int8 Conv, MatMul and Gemm;
  calibrated on a guided trajectory with another seed than the one PSNR is measured on).

Per graph: latency ÷ optimum's (interleaved pairs on `threads` threads, CFG batch 2, 64×64 latents, 77 tokens),
achieved GFLOP/s ÷ this machine's peak fp32 GEMM GFLOP/s (a large MatMul in onnxruntime, same run, same threads),
peak RSS of a process that loads it and runs one call, bytes on disk, per-call PSNR against the fp32 torch UNet on
inputs recorded along a short guided sampling trajectory, and which operators run in int8 (counted in the graph
onnxruntime actually runs: its session's optimized model, after the QDQ fusions into QLinearConv and friends).

Run: `python -m mtu_export.bench.peers --out benchmarks/results` (about 25 minutes and 12 GB RAM on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtu_export.bench.memory import release
from mtu_export.bench.sd15 import BATCH, LATENT, TOKENS, build_mtu
from mtu_export.export.runtime import ops_run

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

    from mtu_export.tiny import char_tokenizer

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


def export_ours(pipeline: Path, out: Path, fused: bool) -> Path:
    """The pipeline's UNet as `mtu-export onnx` writes it (loaded from disk, as the command does)."""
    from mtu_export.config import ExportConfig
    from mtu_export.export.attention import fuse_attention_
    from mtu_export.export.graphs import UNET, UNetGraph
    from mtu_export.export.onnx import write_graph
    from mtu_export.upcycle import load_unet

    unet = load_unet(pipeline).float().eval()
    if fused:
        fuse_attention_(unet)
    with tempfile.TemporaryDirectory(prefix="mtu-peers-") as scratch:
        return write_graph(UNET, UNetGraph(unet), feed(), out, ExportConfig(external_data=True), Path(scratch))


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
    from mtu_export.quantize import quantize_onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_onnx("dynamic-int8", src, dst)
    return dst


def quantize_static(src: Path, calibration: Path, dst: Path) -> Path:
    """Static QDQ int8 of `src` (`--quantize static-int8`'s handler), calibrated on the UNet inputs saved in
    `calibration` (an .npz of one guided trajectory with another seed than the one PSNR is measured on)."""
    from mtu_export.quantize import quantize_onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_onnx("static-int8", src, dst, load_feeds(calibration))
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
def peak_gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of one large MatMul in onnxruntime on `threads` threads (best of `repeats`)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ab"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        sess.run(None, {"a": a, "b": a})
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def psnr_per_call(path: Path, feeds: list[dict], references: list[np.ndarray], threads: int) -> float | None:
    from mtu_export.export.runtime import session
    from mtu_export.metrics import psnr_db

    sess = session(path, threads)
    got = np.concatenate([sess.run(None, f)[0].ravel() for f in feeds])
    return psnr_db(np.concatenate([r.ravel() for r in references]), got)


def op_census(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def time_against(reference: Path, other: Path, threads: int, repeats: int) -> dict:
    from mtu_export.bench.timing import interleaved
    from mtu_export.export.runtime import session

    inputs = {k: v.numpy() for k, v in feed().items()}
    sessions = {"a": session(other, threads), "b": session(reference, threads)}
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


def run(out: Path, threads: int, repeats: int, log=print, smoke: bool = False) -> dict:
    from mtu_export.bench.flops import torch_flops
    from mtu_export.bench.memory import peak_rss_mb
    from mtu_export.storage import tree_bytes

    work = Path(tempfile.mkdtemp(prefix="mtu-peers-"))
    unet = folded_unet(smoke)
    gflops = torch_flops(unet, feed()) / 1e9
    log(f"folded t2i: {gflops:.1f} GFLOPs per call (batch {BATCH}); recording trajectory inputs")
    feeds, references = trajectory_feeds(unet)
    calibration = save_feeds(trajectory_feeds(unet, steps=4, seed=CALIBRATION_SEED)[0], work / "calibration.npz")
    write_pipeline(unet, work / "pipeline")
    del unet
    release()
    graphs: dict[str, Path] = {}
    log("exporting in child processes: ours, ours-fused, optimum (main_export)")
    graphs["ours"] = in_child("export_ours", work / "pipeline", work / "ours" / "unet", False)
    graphs["ours-fused"] = in_child("export_ours", work / "pipeline", work / "ours-fused" / "unet", True)
    graphs[REFERENCE] = in_child("export_optimum", work / "pipeline", work / "optimum")
    log("onnxruntime's transformer optimizer on optimum's graph and on ours-fused; dynamic int8 of ours-fused")
    graphs["optimum+ort-opt"] = in_child("ort_optimize", graphs[REFERENCE], work / "optimum-opt" / "model.onnx")
    graphs["ours-fused+ort-opt"] = in_child("ort_optimize", graphs["ours-fused"], work / "fused-opt" / "model.onnx")
    graphs["ours-fused+dynamic-int8"] = in_child("quantize_dynamic", graphs["ours-fused"], work / "int8" / "model.onnx")
    log("static int8 (QDQ) of ours-fused, calibrated on a 4-step guided trajectory (another seed)")
    graphs["ours-fused+static-int8"] = in_child(
        "quantize_static", graphs["ours-fused"], calibration, work / "static-int8" / "model.onnx"
    )
    peak = peak_gemm_gflops(threads)
    log(f"peak fp32 GEMM on {threads} threads: {peak:.0f} GFLOP/s")
    rows = {}
    for name, path in graphs.items():
        row = {"bytes": tree_bytes(path.parent), "peak_rss_bytes": int(peak_rss_mb(path, feed(), threads) * 2**20)}
        row["psnr_per_call_db"] = psnr_per_call(path, feeds, references, threads)
        census = op_census(path)
        if "int8" in name:
            ran = ops_run(path, threads)
            row["int8_ops"] = {op: n for op, n in ran.items() if op in INT8_OPS}
            row["float_gemm_ops"] = {op: n for op, n in ran.items() if op in FLOAT_GEMM_OPS}
        else:
            row["int8_ops"] = {}
        row["attention_ops"] = {op: census[op] for op in ("MultiHeadAttention", "Attention", "Softmax") if op in census}
        if name != REFERENCE:
            log(f"timing {name} against {REFERENCE} ({repeats} interleaved pairs)")
            row["latency"] = time_against(graphs[REFERENCE], path, threads, repeats)
            row["ratio_to_optimum"] = row["latency"]["ratio"]
        rows[name] = row
        log(f"{name}: ratio {row.get('ratio_to_optimum', 1.0):.3f}, PSNR {row['psnr_per_call_db']}")
    # optimum's time per call: the median over its pairings; every other row is its ratio times that (the ratio is
    # what was measured side by side; absolute times drift with the machine's load between pairings)
    reference_ms = float(np.median([r["latency"]["b_median_ms"] for r in rows.values() if "latency" in r]))
    rows[REFERENCE]["ratio_to_optimum"] = 1.0
    for row in rows.values():
        row["ms"] = row["ratio_to_optimum"] * reference_ms
        row["gflops_per_s"] = gflops / (row["ms"] / 1e3)
        row["fraction_of_peak_gemm"] = row["gflops_per_s"] / peak
    result = {
        "config": {"batch": BATCH, "latent": LATENT, "tokens": TOKENS, "threads": threads, "repeats": repeats},
        "gflops_per_call": gflops,
        "peak_gemm_gflops": peak,
        "graphs": rows,
    }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd15_peers.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "sd15_peers.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Our exported UNet graphs vs the peers' at Stable Diffusion v1.5 scale (random weights)",
        "",
        f"Made by `make bench-sd15` (`python -m mtu_export.bench.peers`). Folded t2i UNet, batch {c['batch']} "
        f"(classifier-free guidance), {c['latent']}×{c['latent']} latents, {c['tokens']} tokens, onnxruntime CPU "
        f"on {c['threads']} threads; {c['repeats']} interleaved pairs against optimum's export per row. "
        f"{r['gflops_per_call']:.0f} GFLOPs per call; peak fp32 GEMM measured in the same run: "
        f"{r['peak_gemm_gflops']:.0f} GFLOP/s.",
        "",
        "| graph | ms per call | ÷ optimum | GFLOP/s ÷ peak GEMM | per-call PSNR dB | peak RSS GB | disk GB | "
        "attention ops | int8 ops (as onnxruntime runs them) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, row in r["graphs"].items():
        psnr = "exact" if row["psnr_per_call_db"] is None else f"{row['psnr_per_call_db']:.1f}"
        attention = ", ".join(f"{k} {v}" for k, v in row["attention_ops"].items()) or "-"
        int8 = ", ".join(f"{k} {v}" for k, v in row["int8_ops"].items()) or "-"
        if row.get("float_gemm_ops"):
            int8 += " (float: " + ", ".join(f"{k} {v}" for k, v in row["float_gemm_ops"].items()) + ")"
        lines.append(
            f"| {name} | {row['ms']:.0f} | **{row['ratio_to_optimum']:.3f}** | {row['fraction_of_peak_gemm']:.2f} | "
            f"{psnr} | {row['peak_rss_bytes'] / 1e9:.2f} | {row['bytes'] / 1e9:.2f} | {attention} | {int8} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="A narrow UNet: checks the plumbing, not the numbers.")
    args = parser.parse_args()
    result = run(args.out, args.threads, args.repeats, smoke=args.smoke)
    best = min(v["ratio_to_optimum"] for k, v in result["graphs"].items() if k.startswith("ours"))
    print(f"wrote {args.out / 'sd15_peers.md'}: best of ours ÷ optimum {best:.3f}")


if __name__ == "__main__":
    main()
