"""`make bench-sd15`'s third part: one 512x512, 20-step text-to-image generation at Stable Diffusion 1.5 scale on a
phone's memory budget, through the torch-free on-device pipeline (`python -m mtu_export.ondevice`), against optimum's
`ORTStableDiffusionPipeline` on the fp32 folder, in the same run.

The pipeline is SD1.5's architecture with seeded random weights (weights change neither memory nor time): its UNet
config, CLIP ViT-L/14's text encoder (12 layers, 49,408-token embedding table; a character tokenizer feeds it) and
SD1.5's VAE. optimum exports it (fp32, its own TorchScript export), and its UNet is exported again as `mtu-export
onnx --attention fused` writes it (onnxruntime's MultiHeadAttention: at 64x64 latents, unfused attention scores are
what exhausts the memory, and onnxruntime's static calibrator, which keeps every intermediate tensor, needs the fused
graph to fit in 24 GB). The on-device folders are optimum's folder as it is (fp32, optimum's UNet graph: the same
graphs as optimum's row, so the pipelines alone differ), with our fused fp32 UNet, and with that UNet in static int8
and w8a16 (this project's `--quantize` handlers, calibrated on one guided trajectory of the torch UNet, 7-bit int8
weights on x86 CPUs without VNNI as the exporter's default).
Each generation runs in a fresh process that reports its own peak RSS (VmHWM) and the parent times it from start to
the written image (imports and session creation included). Per-call PSNR of each quantized UNet against the torch
UNet on another trajectory, and each on-device image's PSNR against the fp32 on-device image, go beside them.

Run: `python -m mtu_export.bench.phone --out benchmarks/results` (writes sd15_phone.{json,md}; about 30 minutes and
12 GB on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtu_export import logs
from mtu_export.bench.memory import release
from mtu_export.bench.peers import CALIBRATION_SEED, in_child, save_feeds, trajectory_feeds
from mtu_export.bench.sd15 import describe, machine, now_utc

logger = logging.getLogger(__name__)

SIZE, STEPS, SEED, TOKENS = 512, 20, 0, 77
PROMPT = "a photo of a red car on a street"
GUIDANCE = 7.5  # diffusers' default, passed to both pipelines (the on-device CLI's default is generate's 3.0)
MODES = {"static-int8": "quantize_static", "w8a16": "quantize_w8a16"}  # mode -> its bench.peers child function
PEAK_GOAL_GB = 2.5  # the budget for the int8 generation, and at most half of optimum's fp32 peak
PEAK_GOAL_RATIO = 0.5
GOAL_ROW = "on-device static-int8 low-memory"  # the way a phone app runs it: one graph in memory at a time
SD15_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text tower, as SD1.5's text_encoder/config.json
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=TOKENS,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_VAE = dict(  # SD1.5's vae/config.json
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=SIZE,
    scaling_factor=0.18215,
)

# The optimum child: torch, diffusers and optimum, as a desktop user runs an exported folder.
OPTIMUM_CHILD = r"""
import sys
from pathlib import Path
import numpy as np, onnxruntime, torch
from PIL import Image
from optimum.onnxruntime import ORTStableDiffusionPipeline
folder, out, prompt, size, steps, seed, threads, guidance = sys.argv[1:9]
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = int(threads)
pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=options)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps),
             guidance_scale=float(guidance), generator=torch.Generator().manual_seed(int(seed)),
             output_type="np").images[0]
Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(out)
"""
# The on-device child: `python -m mtu_export.ondevice`, which must not import torch (checked here).
ONDEVICE_CHILD = r"""
import runpy, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None
sys.argv = ["mtu_export.ondevice", *sys.argv[1:]]
try:
    runpy.run_module("mtu_export.ondevice", run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
"""
PEAK = "\nfrom mtu_export.bench.memory import own_peak_rss_mb\nprint('peak_mib', own_peak_rss_mb())\n"


# ---------------------------------------------------------------------------------------------------- the folders
def write_pipeline(folder: Path, seed: int = 0) -> Path:
    """An SD1.5-sized StableDiffusionPipeline folder with seeded random weights (see the module docstring)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mtu_export.config import SD15_UNET_CONFIG
    from mtu_export.shapes.tiny import char_tokenizer

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = TOKENS
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )  # SD1.5's betas, DPM-Solver++ (2M)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def on_device_folder(optimum: Path, out: Path, unet: Path | None = None) -> Path:
    """The optimum folder as the on-device pipeline reads it: hard links of every file, a `manifest.json` of one
    t2i task, and the UNet graph replaced by the one in the folder `unet` (a quantized graph) when given."""
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's links, in a kept --work folder
    shutil.copytree(optimum, out, copy_function=os.link)
    if unet is not None:
        for path in (out / "unet").glob("model.onnx*"):
            path.unlink()
        for path in unet.glob("model.onnx*"):
            shutil.copy2(path, out / "unet" / path.name)
    manifest = {"format": "mtu-export-onnx/1", "kind": "task", "unet_input_channels": 4,
                "tasks": {"t2i": {"task_id": None, "in_channels": 4}}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# ------------------------------------------------------------------------------------------------------ measuring
def run_child(code: str, args: list[str]) -> dict:
    """A fresh interpreter running `code` with `args`; its wall time and its own peak RSS."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"generation failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    peak = next(float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak_mib"))
    row = {"seconds": round(seconds, 1), "peak_rss_gb": round(peak * 2**20 / 1e9, 3)}
    logger.info(f"  {row}")
    return row


def image_psnr(reference: Path, other: Path) -> float | None:
    from PIL import Image

    from mtu_export.metrics import UINT8_PEAK, psnr_db

    return psnr_db(np.asarray(Image.open(reference)), np.asarray(Image.open(other)), UINT8_PEAK)


def build(work: Path, threads: int) -> tuple[dict[str, Path], dict[str, float | None]]:
    """The folders the generations run on, and each quantized UNet's per-call PSNR against the torch UNet. A stage
    whose output is already in `work` (a `--work` folder of an earlier run) is not run again."""
    from mtu_export.bench.peers import psnr_per_call

    pipeline, optimum, ours = work / "pipeline", work / "optimum", work / "fused" / "model.onnx"
    if not (optimum / "unet" / "model.onnx").is_file():
        logger.info("writing the SD1.5-sized pipeline and exporting it with optimum")
        write_pipeline(pipeline)
        release()  # the pipeline built in this process: its memory back to the OS before the children run
        in_child("export_optimum", pipeline, optimum)
    if not ours.is_file():
        logger.info("exporting its UNet as `mtu-export onnx --attention fused` writes it")
        in_child("export_ours", pipeline, ours.parent, True)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    calibration, _ = trajectory_feeds(unet, steps=2, seed=CALIBRATION_SEED)
    probes, references = trajectory_feeds(unet, steps=2)
    del unet
    release()
    save_feeds(calibration, work / "calibration.npz")
    psnr = {}
    for mode in MODES:
        graph = work / mode / "model.onnx"
        if not graph.is_file():
            logger.info(f"quantizing the UNet: {mode}")
            in_child(MODES[mode], ours, work / "calibration.npz", graph)
        psnr[mode] = psnr_per_call(graph, probes, references, threads)
        release()
    # hard links, made after every export: onnx's loader (optimum's, the quantizer's) refuses external data with
    # several links
    folders = {"fp32": on_device_folder(optimum, work / "ondevice-fp32")}
    folders["fused fp32"] = on_device_folder(optimum, work / "ondevice-fused", ours.parent)
    folders |= {m: on_device_folder(optimum, work / f"ondevice-{m}", work / m) for m in MODES}
    return folders, psnr


def generate_rows(work: Path, folders: dict[str, Path], threads: int, steps: int) -> dict[str, dict]:
    """One generation per row, each in a fresh process, with the same prompt, seed and guidance."""
    logger.info("generating with optimum's ORTStableDiffusionPipeline (fp32)")
    args = [PROMPT, str(SIZE), str(steps), str(SEED), str(threads), str(GUIDANCE)]
    rows = {"optimum fp32": run_child(OPTIMUM_CHILD, [str(work / "optimum"), str(work / "optimum.png"), *args])}
    for mode, folder in folders.items():
        for low_memory in (False, True):
            name = f"on-device {mode}" + (" low-memory" if low_memory else "")
            if low_memory and mode not in MODES:
                continue
            logger.info(f"generating: {name}")
            rows[name] = run_child(ONDEVICE_CHILD, [
                str(folder), "--task", "t2i", "--prompt", PROMPT, "--steps", str(steps), "--seed", str(SEED),
                "--guidance", str(GUIDANCE), "--threads", str(threads), "--out", str(work / f"{slug(name)}.png"),
                "--overwrite",  # an earlier run's image in a kept --work folder
                *(["--low-memory"] if low_memory else [])])  # fmt: skip
    for name, row in rows.items():
        if name not in ("optimum fp32", "on-device fp32"):
            row["image_psnr_db_vs_on_device_fp32"] = image_psnr(work / "on-device-fp32.png", work / f"{slug(name)}.png")
    rows["on-device fp32"]["image_psnr_db_vs_optimum"] = image_psnr(work / "optimum.png", work / "on-device-fp32.png")
    return rows


def slug(name: str) -> str:
    return name.replace(" ", "-")


def run(out: Path, threads: int, steps: int = STEPS, work: Path | None = None) -> dict:
    """Build the folders (in `work`, kept, or in a temporary folder), generate, write sd15_phone.{json,md}."""
    scratch = work is None
    work = Path(tempfile.mkdtemp(prefix="mtu-phone-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    try:
        folders, psnr = build(work, threads)
        rows = generate_rows(work, folders, threads, steps)
        sizes = {mode: sum(p.stat().st_size for p in (f / "unet").glob("model.onnx*")) for mode, f in folders.items()}
    finally:
        if scratch:
            shutil.rmtree(work, ignore_errors=True)
    reference = rows["optimum fp32"]["peak_rss_gb"]
    for row in rows.values():
        row["peak_vs_optimum_fp32"] = round(row["peak_rss_gb"] / reference, 3)
    goal_row = GOAL_ROW if GOAL_ROW in rows else "on-device static-int8"
    int8 = rows[goal_row]
    result = {
        "finished": now_utc(),
        "machine": machine(),
        "threads": threads,
        "generation": {
            "size": SIZE,
            "steps": steps,
            "seed": SEED,
            "guidance": GUIDANCE,
            "scheduler": "DPMSolverMultistepScheduler",
        },
        "rows": rows,
        "unet_bytes": sizes,
        "unet_psnr_per_call_db": psnr,
        "goals": {
            "row": goal_row,
            "int8_peak_gb": PEAK_GOAL_GB,
            "int8_peak_ratio": PEAK_GOAL_RATIO,
            "int8_peak_met": int8["peak_rss_gb"] <= PEAK_GOAL_GB,
            "int8_ratio_met": int8["peak_vs_optimum_fp32"] <= PEAK_GOAL_RATIO,
        },
    }
    write_results(out, result)
    return result


def write_results(out: Path, result: dict) -> None:
    from mtu_export.storage import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sd15_phone.json", result)
    (out / "sd15_phone.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    g = r["generation"]
    lines = [
        f"# SD1.5 scale on a phone's memory budget ({r['finished']})",
        "",
        f"One {g['size']}x{g['size']}, {g['steps']}-step text-to-image generation ({g['scheduler']}, guidance "
        f"{g['guidance']}), random weights, "
        f"{r['threads']} threads, {describe(r['machine'])}. Peak RSS of a fresh process per row (its own VmHWM); time "
        "from process start to the written image (imports and session creation included).",
        "",
        "| pipeline | peak RSS GB | ÷ optimum fp32 | seconds | image PSNR dB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in r["rows"].items():
        keys = [k for k in ("image_psnr_db_vs_on_device_fp32", "image_psnr_db_vs_optimum") if k in row]
        image = row[keys[0]] if keys else None
        shown = "" if not keys else "identical" if image is None else f"{image:.1f}"
        lines.append(f"| {name} | {row['peak_rss_gb']:.2f} | {row['peak_vs_optimum_fp32']:.3f} | "
                     f"{row['seconds']:.0f} | {shown} |")  # fmt: skip
    lines += [
        "",
        "Image PSNR: the fused and quantized rows against the on-device fp32 image, the on-device fp32 row against "
        "optimum's (same seed, same graphs). UNet graphs: optimum's for `optimum fp32` and `on-device fp32`, ours "
        "(`--attention fused`) for the others. `low-memory`: `python -m mtu_export.ondevice --low-memory`, one graph "
        "in memory at a time and no onnxruntime arena.",
        "",
        "UNet per call against the torch UNet (another trajectory): "
        + ", ".join(f"{m} {'exact' if v is None else f'{v:.1f} dB'}" for m, v in r["unet_psnr_per_call_db"].items())
        + "; UNet bytes: "
        + ", ".join(f"{m} {b / 1e9:.2f} GB" for m, b in r["unet_bytes"].items())
        + ".",
        "",
        f"Goal: the static-int8 generation (`{r['goals']['row']}`) at most {r['goals']['int8_peak_gb']} GB "
        f"({'met' if r['goals']['int8_peak_met'] else 'missed'}) and at most {r['goals']['int8_peak_ratio']} x "
        f"optimum's fp32 peak ({'met' if r['goals']['int8_ratio_met'] else 'missed'}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help="sampling steps (peak memory is reached in the first)")
    parser.add_argument("--work", type=Path, help="keep the exported folders here and reuse them on the next run")
    args = parser.parse_args()
    logs.install(logs.plain_handler())  # progress lines on stderr
    print(markdown(run(args.out, args.threads, args.steps, args.work)))


if __name__ == "__main__":
    main()
