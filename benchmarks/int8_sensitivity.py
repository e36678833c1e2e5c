"""Static int8 on the shipped model, layer by layer: which quantized layers cost text-to-image the most.

For one task of an MTU checkpoint, the folded UNet is exported (fp32, fixed shapes) and its inputs recorded along the
task's own guided sampling trajectories, exactly as `mtu-export onnx --quantize static-int8` records them: calibration
on train-split examples, probes on held-out ones. `mtu_export.quantize.layer_sensitivity` then quantizes each layer
static int8 would quantize alone (ranges calibrated once) and measures its per-call error on the probes; the report
lists the layers by cost, and what keeping the costliest ones in float would leave.

    python benchmarks/int8_sensitivity.py models/shapes-mtu --task t2i --out benchmarks/results/int8_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import OnnxConfig
from mtu_export.export.graphs import UNET, UNetGraph
from mtu_export.export.onnx import write_graph
from mtu_export.export.prepare import checkpoint_components, example_sources, fold_tasks, image_size
from mtu_export.export.probes import trajectory_probes
from mtu_export.quantize import layer_sensitivity
from mtu_export.sample import SamplerConfig


def record(checkpoint: Path, task: str, calibration: int, probes: int):
    ckpt = load_checkpoint(checkpoint, dtype=torch.float32)
    config = OnnxConfig(tasks=task)
    components = checkpoint_components(ckpt)
    size = image_size(ckpt, components.vae, config)
    sources = example_sources(ckpt, (task,), {}, size)
    unet = fold_tasks(ckpt, (task,))[task]
    sampler = SamplerConfig(config.probe_steps, config.guidance, config.image_guidance, config.seed)

    def feeds(examples):
        recorded = trajectory_probes(unet, sources.tasks[task], examples, components, sampler)
        return [{k: v.numpy() for k, v in f.items()} for f in recorded.feeds["unet"]]

    train, held_out = feeds(sources.calibration(task, calibration)), feeds(sources.validation(task, probes))
    return unet, train, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--task", default="t2i")
    parser.add_argument("--calibration", type=int, default=4, help="Train examples (as the exporter uses).")
    parser.add_argument("--probes", type=int, default=4, help="Held-out examples whose UNet calls are measured.")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights (x86 CPUs without VNNI).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    unet, train, held_out = record(args.checkpoint, args.task, args.calibration, args.probes)
    with tempfile.TemporaryDirectory(prefix="mtu-sensitivity-") as scratch:
        example = {k: torch.from_numpy(np.asarray(v)) for k, v in held_out[0].items()}
        src = write_graph(UNET, UNetGraph(unet), example, Path(scratch) / "fp32", OnnxConfig(), Path(scratch))
        errors = layer_sensitivity(src, train, held_out, Path(scratch), reduce_range=args.reduce_range)
    total = errors.pop("(all)")
    ranked = sorted(errors.items(), key=lambda kv: -kv[1])
    summed = sum(errors.values())
    keep_float, left = [], []
    remaining = summed
    for name, error in ranked[:10]:
        remaining -= error
        keep_float.append(name)
        left.append({"kept_in_float": len(keep_float), "predicted_snr_db": -10 * math.log10(max(remaining, 1e-30))})
    result = {
        "checkpoint": str(args.checkpoint),
        "task": args.task,
        "reduce_range": args.reduce_range,
        "calibration_calls": len(train),
        "probe_calls": len(held_out),
        "all_layers": {"relative_error": total, "per_call_snr_db": -10 * math.log10(total)},
        "sum_of_single_layer_errors": summed,
        "layers": [{"node": n, "relative_error": e, "share": e / summed} for n, e in ranked],
        "keeping_the_costliest_in_float": left,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"all layers int8: SNR {result['all_layers']['per_call_snr_db']:.1f} dB per call; costliest layers:")
    for row in result["layers"][:8]:
        print(f"  {row['share']:6.1%}  {row['node']}")


if __name__ == "__main__":
    main()
