"""w8a16 against static int8 on the shipped model, per UNet call and end to end (`make bench-w8a16`).

For each task, `mtu-export onnx MODEL --task T --quantize MODE --image-count 4` (its validation: the quantized UNet
against the torch UNet on the task's trajectory probes, and 4 images of the full sampling loop against the fp32 torch
pipeline), then both figures are read from each export's manifest. `--reuse` reads an export folder already at
`WORK/MODE-TASK` instead of exporting again.

    python benchmarks/quantized_psnr.py --model models/shapes-mtu --work out/quantized --out benchmarks/results/int8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TASKS = ("t2i", "edit", "sr", "inpaint")
MODES = ("w8a16", "static-int8")


def export(model: Path, task: str, mode: str, folder: Path, reuse: bool) -> dict:
    if not (reuse and (folder / "manifest.json").is_file()):
        command = [sys.executable, "-m", "mtu_export.cli", "onnx", str(model), "--task", task, "--quantize", mode,
                   "--image-count", "4", "--out", str(folder), "--overwrite"]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((folder / "manifest.json").read_text())
    call = next(r for r in manifest["graph_agreement"] if r["component"] == f"unet[{mode}]")
    image = manifest["image_agreement"][0]
    return {
        "per_call_psnr_db": call["psnr_db"],
        "end_to_end_psnr_db": image["psnr_db"],
        "images": image["images"],
        "steps": image["steps"],
        "reduce_range": manifest["quantized"]["reduce_range"],
        "unet_bytes": sum(p.stat().st_size for p in (folder / "unet").glob("model.onnx*")),
    }


def markdown(rows: dict) -> str:
    lines = [
        "w8a16 vs static int8 on the shipped model (`benchmarks/quantized_psnr.py`): PSNR against fp32 torch, per UNet "
        "call on the task's trajectory probes and end to end over 4 images of 25 steps.",
        "",
        "| task | w8a16 per call | static int8 per call | w8a16 end to end | static int8 end to end |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for task, row in rows.items():
        w, s = row["w8a16"], row["static-int8"]
        lines.append(f"| {task} | {w['per_call_psnr_db']:.1f} | {s['per_call_psnr_db']:.1f} | "
                     f"{w['end_to_end_psnr_db']:.1f} | {s['end_to_end_psnr_db']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/shapes-mtu"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    rows = {t: {m: export(args.model, t, m, args.work / f"{m}-{t}", args.reuse) for m in MODES} for t in TASKS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "w8a16_vs_static_int8.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "w8a16_vs_static_int8.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
