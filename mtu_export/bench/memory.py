"""Peak memory: of a fresh process that loads an ONNX graph and runs it once (`peak_rss_mb`), and of this process
(`own_peak_rss_mb`, which the SD1.5 benchmark's export children report); `release` hands freed model memory back to
the OS between measurements.

`python -m mtu_export.bench.memory GRAPH FEED.npz THREADS` is the child `peak_rss_mb` starts: it imports only
numpy and onnxruntime (not torch, nor the rest of the package), so its peak is the graph's and the runtime's.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def own_peak_rss_mb() -> float:
    """This process's own peak RSS in MiB. Not getrusage on Linux: a child's ru_maxrss starts at its parent's peak
    at fork (the forked address space's high-water mark survives exec), which would hide the child's own figure."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def release() -> None:
    """Return freed model memory to the OS (glibc keeps large freed blocks otherwise, and peak RSS counts them)."""
    import gc

    from mtu_export.ondevice.graphs import trim_heap

    gc.collect()
    trim_heap()


def peak_rss_mb(path: Path, feed: dict, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads `path` in onnxruntime and runs it once on `feed`
    (name -> torch tensor or numpy array)."""
    with tempfile.TemporaryDirectory() as tmp:
        feed_file = Path(tmp) / "feed.npz"
        np.savez(feed_file, **{k: np.asarray(v) for k, v in feed.items()})
        result = subprocess.run(
            [sys.executable, "-m", "mtu_export.bench.memory", str(path), str(feed_file), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
    return float(result.stdout.strip().splitlines()[-1])


def _run_graph_once(path: str, feed_file: str, threads: int) -> float:
    """The child: load the graph in a plain onnxruntime CPU session, run it once, return this process's peak."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, dict(np.load(feed_file)))
    return own_peak_rss_mb()


if __name__ == "__main__":
    print(_run_graph_once(sys.argv[1], sys.argv[2], int(sys.argv[3])))
