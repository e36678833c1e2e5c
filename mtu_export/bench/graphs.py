"""The fixed-shape UNet graphs a benchmark measures: their example inputs (`unet_feed`), their export
(`export_fixed`, through the exporter's own `write_graph`, plain or with `mtu-export onnx --attention fused`'s
MultiHeadAttention layers), their structure (`graph_signature`, weights aside) and
their bytes on disk."""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path

import torch

from mtu_export.config import OnnxConfig
from mtu_export.export.attention import fuse_attention_
from mtu_export.export.graphs import UNET, UNetGraph
from mtu_export.export.onnx import write_graph


def unet_feed(unet_config: dict, task_channels: int, batch: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    size = unet_config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, task_channels, size, size, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, tokens, unet_config["cross_attention_dim"], generator=g),
    }


def export_fixed(unet, feed: dict, folder: Path, attention: str = "default", optimize: bool = False) -> Path:
    """A fixed-shape fp32 ONNX graph of `unet` on `feed`'s shapes in `folder/model.onnx`, checked by onnx.
    `attention="fused"` exports a copy of `unet` whose attention layers are one MultiHeadAttention node each, as
    `mtu-export onnx --attention fused` does (`unet` itself is left as it was); `optimize` saves the graph as
    `--optimize` does."""
    import onnx

    config = OnnxConfig(fixed_shapes=True, attention=attention, optimize=optimize)
    if attention == "fused":
        unet = copy.deepcopy(unet)
        fuse_attention_(unet)
    with tempfile.TemporaryDirectory(prefix="mtu-bench-graph-") as scratch:
        path = write_graph(UNET, UNetGraph(unet), feed, Path(folder), config, Path(scratch))
    onnx.checker.check_model(str(path))
    return path


def graph_signature(path: Path) -> str:
    """A hash of an ONNX graph's structure with its weight values left out: every node's op, attributes and wiring
    (tensors numbered in order of appearance, weights by dims and dtype). Two graphs with the same signature run
    the same kernels on the same shapes; only the numbers in their weights differ."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name: ("weight", tuple(i.dims), i.data_type) for i in graph.initializer}
    numbering: dict[str, int] = {}

    def tensor(name: str):
        return weights[name] if name in weights else numbering.setdefault(name, len(numbering))

    parts = [[tensor(i.name) for i in graph.input]]
    for node in graph.node:
        attributes = sorted(a.SerializeToString() for a in node.attribute)
        parts.append([node.op_type, node.domain, [tensor(n) for n in node.input], [tensor(n) for n in node.output]])
        parts.append([a.hex() for a in attributes])
    parts.append([tensor(o.name) for o in graph.output])
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def graph_bytes(path: Path) -> int:
    """Bytes of `model.onnx` and its external data (`model.onnx_data`) beside it."""
    return sum(f.stat().st_size for f in Path(path).parent.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
