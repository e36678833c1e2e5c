"""Peak memory of `mtu-export train` against the size of an on-disk dataset (`make bench-data`).

Writes the shapes world's t2i examples as image-folder datasets of two sizes (2,000 and 20,000 rows by default),
then runs the same few training steps on each, every run in a fresh process that reports its own peak RSS (VmHWM)
including the VAE-encoding pass that builds the on-disk latent cache. The ratio large / small is the figure of
merit: with memory-mapped datasets and caches it stays near 1 however many rows there are.

    python benchmarks/data_memory.py --base models/shapes-base --out benchmarks/results/data_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import atexit, json, sys
REPORT = sys.argv[1]
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            json.dump({"peak_rss_bytes": int(line.split()[1]) * 1024}, open(REPORT, "w"))
atexit.register(report)
sys.argv = ["mtu-export", *sys.argv[2:]]
from mtu_export.cli import main
main()
"""


def run_train(base: Path, data: Path, work: Path, steps: int, batch: int) -> dict:
    report = work.parent / f"{work.name}-rss.json"
    args = ["train", str(base), "--single-task", "t2i", "--data", f"t2i={data}", "--steps", str(steps)]
    args += ["--batch-size", str(batch), "--work", str(work), "--out", str(work.parent / f"{work.name}-out")]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(report), *args], check=True, stdout=subprocess.DEVNULL)
    return {**json.loads(report.read_text()), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("models/shapes-base"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_memory.json"))
    parser.add_argument("--rows", type=int, nargs=2, default=(2000, 20000))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from mtu_export.data import export_world_dataset

    rows = {}
    with tempfile.TemporaryDirectory(prefix="mtu-data-memory-") as scratch:
        for count in args.rows:
            folder = export_world_dataset(Path(scratch) / f"t2i-{count}", "t2i", "train", count)
            print(f"wrote a {count}-row dataset; training {args.steps} steps", flush=True)
            rows[count] = {"rows": count, **run_train(args.base, folder, Path(scratch) / f"run-{count}", args.steps,
                                                      args.batch_size)}  # fmt: skip
            print(f"{count} rows: peak RSS {rows[count]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    small, large = (rows[c]["peak_rss_bytes"] for c in args.rows)
    result = {
        "what": "peak RSS of `mtu-export train` (cache build + steps), large dataset / small dataset",
        "base": str(args.base),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "runs": list(rows.values()),
        "ratio": large / small,
        "goal": 1.2,
        "meets_goal": large / small <= 1.2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak RSS ratio {args.rows[1]} / {args.rows[0]} rows: {result['ratio']:.3f} (goal <= 1.2); wrote {args.out}")


if __name__ == "__main__":
    main()
