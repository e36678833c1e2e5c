"""Where an exported folder keeps each component's graph: `model.onnx` (desktop onnxruntime, optimum) or, in a folder
written for ONNX Runtime Mobile, `model.ort`. onnxruntime's one loader reads both.

Must not import torch, transformers or diffusers: the on-device pipeline uses it where only onnxruntime is installed.
"""

from __future__ import annotations

from pathlib import Path

GRAPH_NAMES = ("model.onnx", "model.ort")  # in order of preference


def graph_path(component_dir: Path) -> Path:
    """The graph of `component_dir` (e.g. `export/unet`): its model.onnx, else its model.ort; a FileNotFoundError
    naming both when it has neither."""
    for name in GRAPH_NAMES:
        if (Path(component_dir) / name).is_file():
            return Path(component_dir) / name
    raise FileNotFoundError(f"{component_dir} has no {' or '.join(GRAPH_NAMES)}; export the folder again")
