"""FLOPs (2 × MACs) of one UNet call, counted twice: by torch's FlopCounterMode on the module (with CPU SDPA
counted, which FlopCounterMode skips) and from the Conv / MatMul / Gemm nodes of the exported fixed-shape graph.
The bench and its gate require the two counts to agree exactly."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _register_cpu_sdpa() -> None:
    """FlopCounterMode skips CPU SDPA (16 % of SD1.5's FLOPs); count it as the two matmuls it is."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def torch_flops(unet, feed: dict) -> int:
    """FLOPs (2 × MACs) of one UNet call on `feed`, by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa()
    counter = FlopCounterMode(display=False)
    with counter:
        unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
    return int(counter.get_total_flops())


def onnx_flops(path: Path) -> int:
    """FLOPs (2 × MACs) of the Conv, MatMul and Gemm nodes of a fixed-shape ONNX graph.

    Shapes come from onnxruntime's symbolic shape inference (ONNX's own leaves the traced UNet's reshapes unknown);
    weights stay on disk, only their dims are read. A node whose shapes stay unknown is an error, never a zero."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)
    # Weights kept in external data become shaped graph inputs, so inference never reads them (nor needs the file).
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    kept = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in external)
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if any(s is None or None in s for s in (a, b, out)):
            raise RuntimeError(f"cannot count FLOPs of {node.name} in {path}: its shapes are not static")
        if node.op_type == "Conv":
            total += 2 * math.prod(out) * math.prod(b[1:])  # (C_in / groups) · kH · kW MACs per output
        elif node.op_type == "MatMul":
            total += 2 * math.prod(out) * a[-1]
        else:
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += 2 * math.prod(out) * (a[0] if trans_a else a[1])
    return total
