"""Quantization of exported graphs: one verb per format, one handler per scheme (torchao's `quantize_` pattern).

ONNX (`quantize_onnx`, applied to the UNet, which runs once per sampling step; the text encoder and VAE stay fp32):
- `dynamic-int8`: weights int8, activations quantized at run time, MatMul/Gemm only — ConvInteger is slower than
  fp32 Conv on x86 CPUs; 7-bit weights on x86 CPUs without VNNI, as static int8's (below);
- `static-int8`: QDQ int8 (MatMul, Gemm, Conv; per-channel int8 weights, asymmetric uint8 activations) calibrated
  on recorded UNet inputs of the task's own sampling trajectories (train split), never on random tensors; weights
  in 7 bits (onnxruntime's `reduce_range`) for x86 CPUs without VNNI, whose uint8·int8 kernels add pairs of
  products in 16 bits and saturate with full-range weights (shipped model, edit, on a 2-core AVX2 EPYC: 30.5 dB
  end to end with 8-bit weights, 43.5 dB with 7-bit; `saturating_int8_cpu` says whether this machine is one); the
  input and output convolutions and the timestep embedding stay fp32 (measured on the shapes model's t2i: symmetric
  int8 activations 18.8 dB end to end, uint8 40.8 dB, uint8 with those layers kept 43.5 dB), and so do the
  attention products of two activations, Q·Kᵀ and softmax·V (retrained shapes bundle, edit: 21.6 → 49.9 dB);
- `w8a16`: QDQ with asymmetric uint16 activations and uint8 weights, calibrated as static int8 is, for NPUs: the
  types and weight layout of onnxruntime's QNN helper (`get_qnn_qdq_config`): Conv weights per channel, MatMul and
  Gemm weights per tensor ("QNN does not support per-channel MatMul"; 0.4-0.7 dB per call on the shipped model).
  16-bit Q/DQ are ONNX operators from opset 21: onnxruntime's quantizer converts the graph to opset 21 (1.32) or
  else writes com.microsoft Q/DQ; the CPU provider runs both, as dequantize + fp32 op + quantize (accuracy there,
  speed on an NPU). No 7-bit weights. Shipped model, dB per call / end to end (static int8's): t2i 56.6 / 55.1
  (42.4 / 48.0), edit 55.1 / 47.8 (42.2 / 46.3), sr 59.7 / 56.0 (45.1 / 49.1), inpaint 58.4 / 54.0 (42.0 / 47.1).
  Of static int8's fp32 layers only the input and output convolutions and the timestep embedding stay fp32 here:
  quantizing them too cost 3.0-7.6 dB per call (sr 61.1 -> 53.5) and up to 5 dB end to end (edit 48.7 -> 43.6),
  while keeping the attention products fp32 gained at most 0.6 dB per call and nothing end to end;
- `fp16`: weights and compute in float16 with float32 inputs and outputs (GPU and mobile execution providers).

Core ML (`quantize_coreml`, applied to every weight of an `.mlpackage`'s model): `int8` linear weights, `palettize-6`
/ `palettize-4` k-means lookup tables, `int4-block` (iOS18, per-block int4 with block size 32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtu_export import logs
from mtu_export.config import REDUCE_RANGE_MODES
from mtu_export.errors import ConfigError

Feeds = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------- ONNX
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo names of int8 dot products


def saturating_int8_cpu() -> bool:
    """Whether this machine is an x86 CPU without VNNI (flags known): onnxruntime's uint8·int8 kernels there
    (vpmaddubsw) sum two products in 16 bits, which 8-bit weights can overflow; onnxruntime's advice for them is 7-bit
    weights. ARM CPUs (sdot / udot) and VNNI accumulate in 32 bits."""
    import platform

    from mtu_export.machine import cpu_flags

    flags = cpu_flags()
    return platform.machine() in ("x86_64", "AMD64") and bool(flags) and not VNNI_FLAGS & flags


def _dynamic_int8(src: Path, dst: Path, calibration: list[Feeds] | None, reduce_range: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul", "Gemm"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=reduce_range,
        use_external_data_format=_external(src),  # SD1.5: the fp32 convolutions alone pass protobuf's 2 GB
    )


@dataclass(frozen=True)
class StaticScheme:
    """A calibrated QDQ scheme: onnxruntime QuantType names, and the layout measured for it (module docstring)."""

    activations: str = "QUInt8"
    weights: str = "QInt8"
    float_products: bool = True  # the attention products Q·Kᵀ and softmax·V stay float
    per_tensor: tuple[str, ...] = ()  # op types whose weights get one scale (the others: one per output channel)


STATIC_INT8 = StaticScheme()
W8A16 = StaticScheme("QUInt16", "QUInt8", float_products=False, per_tensor=("MatMul", "Gemm"))


def _static_int8(src: Path, dst: Path, calibration: list[Feeds] | None, reduce_range: bool = False) -> None:
    if not calibration:
        raise ConfigError("static int8 quantization needs calibration inputs; none were recorded")
    _quantize_static(src, dst, calibration, reduce_range=reduce_range)


def _w8a16(src: Path, dst: Path, calibration: list[Feeds] | None, reduce_range: bool = False) -> None:
    if not calibration:
        raise ConfigError("w8a16 quantization needs calibration inputs; none were recorded")
    with _at_opset(src, QDQ_16BIT_OPSET) as graph:
        _quantize_static(graph, dst, calibration, scheme=W8A16)


QDQ_16BIT_OPSET = 21  # ONNX's QuantizeLinear / DequantizeLinear take 16-bit types from opset 21


@contextmanager
def _at_opset(src: Path, opset: int):
    """`src` as a graph of at least `opset`, converted here rather than by onnxruntime's quantizer, which converts the
    whole model in memory and cannot serialize one over protobuf's 2 GB (an SD1.5 UNet): onnx's version converter
    runs on the graph without its weights, and the result is written beside `src` so that it finds the same
    external data; it is removed afterwards."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src), load_external_data=False)
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= opset:
        yield src
        return
    converted = src.with_name(f"{src.stem}.opset{opset}{src.suffix}")
    onnx.save_model(version_converter.convert_version(model, opset), str(converted))
    try:
        yield converted
    finally:
        converted.unlink(missing_ok=True)


def _quantize_static(
    src: Path,
    dst: Path,
    calibration: list[Feeds] | None,
    only: list[str] | None = None,
    ranges: Path | None = None,
    reduce_range: bool = False,
    scheme: StaticScheme = STATIC_INT8,
) -> None:
    """QDQ of `src`'s MatMul, Gemm and Conv nodes (all but static_exclusions', or just `only`) in `scheme`,
    calibrated on `calibration` or on the activation ranges saved in `ranges` (onnxruntime's calibration cache:
    written by the first call that calibrates, read by later ones); 7-bit weights with `reduce_range`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(src), load_external_data=False).graph
    keep = static_exclusions(graph, scheme.float_products)
    weights = {i.name for i in graph.initializer}
    per_tensor = {  # onnxruntime's tensor overrides: a dict without an axis is one scale for the whole tensor
        name: [{"quant_type": QuantType[scheme.weights]}]
        for node in graph.node
        if node.op_type in scheme.per_tensor
        for name in node.input
        if name in weights
    }

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: Iterable[Feeds]) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> Feeds | None:
            return next(self.feeds, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(calibration) if calibration else None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType[scheme.activations],
        weight_type=QuantType[scheme.weights],
        nodes_to_quantize=only,
        nodes_to_exclude=keep,
        use_external_data_format=_external(src),
        calibration_cache_path=ranges,
        extra_options={"TensorQuantOverrides": per_tensor} if per_tensor else None,
    )


def layer_sensitivity(
    src: Path, calibration: list[Feeds], probes: list[Feeds], scratch: Path, reduce_range: bool = False
) -> dict[str, float]:
    """The measured sweep behind the choice of layers static int8 keeps in float: for every node it quantizes, the
    per-call error of the graph with that node alone in int8 (calibrated once), as a fraction of the UNet output's
    energy on `probes` (mean squared error ÷ mean square of the fp32 output: additive across nodes to first order,
    so the largest entries are the layers that cost the most)."""
    import onnx
    import onnxruntime as ort

    def outputs(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, feed)[0].ravel() for feed in probes])

    graph = onnx.load(str(src), load_external_data=False).graph
    keep = set(static_exclusions(graph))
    nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in keep]
    reference = outputs(src)
    energy = float(np.mean(reference.astype(np.float64) ** 2))
    ranges = scratch / "ranges.json"
    with logs.quiet("", logging.ERROR):  # onnxruntime.quantization logs its advice to the root logger, every call
        _quantize_static(src, scratch / "all.onnx", calibration, ranges=ranges, reduce_range=reduce_range)
        errors = {"(all)": float(np.mean((outputs(scratch / "all.onnx") - reference) ** 2)) / energy}
        for name in nodes:
            _quantize_static(src, scratch / "one.onnx", None, only=[name], ranges=ranges, reduce_range=reduce_range)
            errors[name] = float(np.mean((outputs(scratch / "one.onnx") - reference) ** 2)) / energy
    return errors


def static_exclusions(graph, products: bool = True) -> list[str]:
    """Nodes static int8 leaves in fp32: the input and output convolutions and the timestep embedding, and (with
    `products`) the attention products whose both operands are activations (Q·Kᵀ and softmax·V: two calibrated
    ranges per product, and the softmax output's range is dominated by its rare peaks)."""
    sensitive = ("conv_in", "conv_out", "time_embedding", "time_emb_proj")
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    keep = []
    for node in graph.node:
        product = products and node.op_type == "MatMul" and not any(i in constants for i in node.input)
        if product or any(k in node.name for k in sensitive):
            keep.append(node.name)
    return keep


def _fp16(src: Path, dst: Path, calibration: list[Feeds] | None, reduce_range: bool = False) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Resize's scales must stay float32; the converter casts around blocked ops.
    blocked = [*DEFAULT_OP_BLOCK_LIST, "Resize"]
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=blocked)
    onnx.save_model(model, str(dst))


def _external(src: Path) -> bool:
    """Whether a graph keeps its weights beside it (then so must its quantized copy, which may pass 2 GB too)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in onnx.load(str(src), load_external_data=False).graph.initializer)


ONNX_HANDLERS: dict[str, Callable[[Path, Path, list[Feeds] | None, bool], None]] = {
    "dynamic-int8": _dynamic_int8,
    "static-int8": _static_int8,
    "w8a16": _w8a16,
    "fp16": _fp16,
}


def quantize_onnx(
    mode: str, src: Path, dst: Path, calibration: list[Feeds] | None = None, reduce_range: bool = False
) -> None:
    """Write the `mode`-quantized version of the graph `src` to `dst` (with external data when `src` has it);
    `reduce_range` (REDUCE_RANGE_MODES only): 7-bit weights, for x86 CPUs without VNNI."""
    if mode not in ONNX_HANDLERS:
        raise ConfigError(f"unknown ONNX quantization {mode!r}; choose {', '.join(ONNX_HANDLERS)}")
    if reduce_range and mode not in REDUCE_RANGE_MODES:
        raise ConfigError(f"7-bit weights (--reduce-range) apply to {', '.join(REDUCE_RANGE_MODES)}, not {mode}")
    with logs.quiet("", logging.ERROR):  # onnxruntime.quantization logs its advice to the root logger, every call
        ONNX_HANDLERS[mode](Path(src), Path(dst), calibration, reduce_range)


# --------------------------------------------------------------------------------------------------------- Core ML
def quantize_coreml(mode: str, model):
    """The `mode`-compressed copy of a Core ML mlprogram (`ct.models.MLModel`)."""
    import coremltools.optimize.coreml as cto

    if mode == "int8":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=512)
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config))
    if mode in ("palettize-6", "palettize-4"):
        nbits = int(mode[-1])
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, weight_threshold=512)
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=config))
    if mode == "int4-block":
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32, weight_threshold=512
        )
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config))
    raise ConfigError(f"unknown Core ML quantization {mode!r}; choose int8, palettize-6, palettize-4, int4-block")
