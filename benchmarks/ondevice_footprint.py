"""What the torch-free on-device pipeline saves (`make bench-ondevice`): installed size and import-to-image time.

- Installed size: the files of every distribution the on-device pipeline needs (requirements-ondevice.txt and what
  those require, transitively, markers evaluated) against those `mtu-export generate` needs (torch, diffusers,
  transformers, optimum and the rest) and against all of pyproject's dependencies, read from this environment's
  installed distributions.
- Import to first image: `python -m mtu_export.ondevice` and `mtu-export generate` on the same export folder and
  request, each a fresh process timed from its start to the written image (imports and session creation
  included) with its own peak RSS (VmHWM), interleaved in pairs (A B, B A, ...); the figure is the ratio of medians.

    python benchmarks/ondevice_footprint.py --export out/demo/onnx --out benchmarks/results/ondevice.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATE_ROOTS = ("torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnxruntime", "numpy", "pillow",
                  "typer", "rich", "safetensors", "huggingface-hub")  # fmt: skip
PEAK = "\nfor line in open('/proc/self/status'):\n    line.startswith('VmHWM:') and print('peak_kb', line.split()[1])\n"
CHILDREN = {  # fresh interpreters; the on-device one cannot import torch, diffusers or transformers
    "on-device": "import runpy, sys\nfor m in ('torch', 'diffusers', 'transformers'):\n    sys.modules[m] = None\n"
    "sys.argv = ['ondevice', *sys.argv[1:]]\ntry:\n    runpy.run_module('mtu_export.ondevice', run_name='__main__')\n"
    "except SystemExit as exc:\n    assert not exc.code, exc.code\n",
    "generate": "import sys\nsys.argv = ['mtu-export', 'generate', *sys.argv[1:]]\nfrom mtu_export.cli import main\n"
    "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n",
}


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(roots: list[str]) -> set[str]:
    """The installed distributions `roots` need, transitively (requirement markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    installed = {_name(d.metadata["Name"]): d for d in metadata.distributions()}
    seen, todo = set(), [_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for text in installed[name].requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_name(requirement.name))
    return seen


def installed_bytes(names: set[str]) -> int:
    total = 0
    for dist in metadata.distributions():
        if _name(dist.metadata["Name"]) in names:
            total += sum(p.locate().stat().st_size for p in dist.files or [] if p.locate().is_file())
    return total


def sizes() -> dict:
    from packaging.requirements import Requirement

    ondevice = [Requirement(line).name for line in (ROOT / "requirements-ondevice.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    project = [Requirement(t) for t in metadata.distribution("mtu-export").requires or []]
    full = [r.name for r in project if r.marker is None or r.marker.evaluate({"extra": ""})]
    rows = {}
    for label, roots in (("on-device", ondevice), ("generate", list(GENERATE_ROOTS)), ("pyproject", full)):
        names = closure(roots)
        rows[label] = {"distributions": len(names), "bytes": installed_bytes(names), "roots": sorted(roots)}
    rows["on-device"]["ratio_to_generate"] = rows["on-device"]["bytes"] / rows["generate"]["bytes"]
    rows["on-device"]["ratio_to_pyproject"] = rows["on-device"]["bytes"] / rows["pyproject"]["bytes"]
    return rows


def one_run(kind: str, args: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILDREN[kind] + PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{kind} failed: {done.stderr.strip().splitlines()[-3:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak_kb"))
    return {"seconds": seconds, "peak_rss_mb": peak / 1024}


def timings(export: Path, task: str, steps: int, pairs: int) -> dict:
    runs: dict[str, list[dict]] = {"on-device": [], "generate": []}
    with tempfile.TemporaryDirectory(prefix="mtu-footprint-") as scratch:
        for pair in range(pairs):
            for kind in ("on-device", "generate") if pair % 2 == 0 else ("generate", "on-device"):
                out = Path(scratch) / f"{kind}-{pair}.png"
                args = [str(export), "--task", task, "--prompt", "a red circle", "--steps", str(steps),
                        "--out", str(out)]  # fmt: skip
                runs[kind].append(one_run(kind, args))
    medians = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_rss_mb")} for k, v in runs.items()}
    return {
        "task": task,
        "steps": steps,
        "pairs": pairs,
        "median": medians,
        "seconds_ratio": medians["on-device"]["seconds"] / medians["generate"]["seconds"],
        "peak_ratio": medians["on-device"]["peak_rss_mb"] / medians["generate"]["peak_rss_mb"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="an `mtu-export onnx` folder")
    parser.add_argument("--task", default="t2i")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ondevice.json")
    args = parser.parse_args()
    result = {"sizes": sizes(), "import_to_image": timings(args.export, args.task, args.steps, args.pairs)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s, t = result["sizes"], result["import_to_image"]
    mib = {k: v["bytes"] / 2**20 for k, v in s.items()}
    print(f"installed: on-device {mib['on-device']:.0f} MiB, generate {mib['generate']:.0f} MiB "
          f"({s['on-device']['ratio_to_generate']:.3f} x), all of pyproject {mib['pyproject']:.0f} MiB")  # fmt: skip
    on, gen = t["median"]["on-device"], t["median"]["generate"]
    print(f"import to image ({t['task']}, {t['steps']} steps, median of {t['pairs']}): on-device "
          f"{on['seconds']:.1f} s / {on['peak_rss_mb']:.0f} MB, generate {gen['seconds']:.1f} s / "
          f"{gen['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
