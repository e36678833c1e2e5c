"""Where an exported folder keeps each component's graph: `model.onnx` (desktop onnxruntime, optimum) or, in a folder
written for ONNX Runtime Mobile, `model.ort`. onnxruntime's one loader reads both. And `trim_heap`, which hands a
closed graph's memory back to the OS.

Must not import torch, transformers or diffusers: the on-device pipeline uses it where only onnxruntime is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

GRAPH_NAMES = ("model.onnx", "model.ort")  # in order of preference


def graph_path(component_dir: Path) -> Path:
    """The graph of `component_dir` (e.g. `export/unet`): its model.onnx, else its model.ort; a FileNotFoundError
    naming both when it has neither."""
    for name in GRAPH_NAMES:
        if (Path(component_dir) / name).is_file():
            return Path(component_dir) / name
    raise FileNotFoundError(f"{component_dir} has no {' or '.join(GRAPH_NAMES)}; export the folder again")


def trim_heap() -> None:
    """Ask glibc to return freed heap pages to the OS (peak and current RSS keep them otherwise); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and other libcs: nothing to trim
            pass
