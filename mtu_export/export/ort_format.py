"""`.ort` files for ONNX Runtime Mobile: the graphs of an exported ONNX folder converted by onnxruntime's own
`onnxruntime.tools.convert_onnx_models_to_ort`, each `<component>/model.ort` beside its `model.onnx`, and one
folder-level `required_operators.config` (every operator the graphs run) for a reduced-operator onnxruntime build
(`build.py --minimal_build --include_ops_by_config required_operators.config`).

An `.ort` file is a FlatBuffer: at most 2 GiB, weights inline (no external data). Graphs that cannot fit are refused
before anything is converted, with the `--quantize` mode that would make them fit.

Optimization style ('fixed', the default, or 'runtime'; onnxruntime's 'Fixed' / 'Runtime'). 'fixed' applies
onnxruntime's optimizations (level 'all' minus the x86-only NCHWc layout) at conversion, for the CPU execution
provider, which is how our graphs are validated and benchmarked: its `.ort` computes what an onnxruntime CPU
session of the `.onnx` computes at level 'extended' (identical outputs on the tiny UNet, fp32 and static int8).
'runtime' applies only the basic optimizations and records the others to be replayed on the device, which
onnxruntime advises for NNAPI / Core ML, whose node assignment is unknown at conversion. It has two costs here,
both measured with onnxruntime 1.32: the replay of a static-int8 UNet's saved QDQ fusions fails to load ("Not enough
produced nodes in the runtime optimization record"), and unreplayed the QDQ pairs run unfused (42.8 dB against the
`.onnx`). Its gain: 'fixed' gives fp16 weights fp32 copies on a converting CPU without fp16 kernels (an fp16 UNet's
`.ort` is twice its `.onnx`); 'runtime' keeps them.

Takes folders of exported graphs, never modules; must not import train, bench or cli.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtu_export.errors import ConfigError, DriftError, InputError, MtuError, OutputExistsError
from mtu_export.export.runtime import run
from mtu_export.metrics import psnr_db
from mtu_export.quantize import static_exclusions

ONNX_MODEL = "model.onnx"
ORT_MODEL = "model.ort"
OPERATORS_CONFIG = "required_operators.config"
# Largest graph (.onnx + external data, fp16 weights counted twice under 'fixed') converted. A FlatBuffer holds at
# most 2**31 - 1 bytes; the 7 % between covers what an .ort adds to the weights (+4 % on the tiny UNet).
ORT_LIMIT = 2_000_000_000
REFERENCE_FOLDERS = ("unet_fp32",)  # the fp32 reference of a quantized UNet: for validation, not for devices
QUANTIZED_COMPONENT = "unet"  # the one graph `--quantize` applies to
STYLES = {"fixed": "Fixed", "runtime": "Runtime"}  # our option -> onnxruntime's OptimizationStyle
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"
# The converter reads its optimization level (and so its output names) from this variable; pinned, never inherited.
LEVEL_VARIABLE = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
OPTIMIZATION_LEVEL = "all"
# The nodes whose weights (input 1) each int8 --quantize mode stores in 8 bits (quantize.py; static int8 also keeps
# its `static_exclusions` in float); fp16 halves every float weight.
INT8_OPS = {
    "dynamic-int8": ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"),
    "static-int8": ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv"),
}


# ------------------------------------------------------------------------------------------------------ the verb
def convert_folder(
    folder: Path,
    keep_onnx: bool = True,
    optimization: str = "fixed",
    feeds: dict[str, list[dict[str, np.ndarray]]] | None = None,
) -> dict:
    """Write `<component>/model.ort` for every `*/model.onnx` of the exported `folder` (REFERENCE_FOLDERS skipped,
    and kept) and the folder's `required_operators.config`; returns their manifest entry. Each .ort must load in an
    onnxruntime CPU session with its graph's inputs and outputs; `feeds` (component -> feeds) also compares it with
    its .onnx (`compare`), rows in the manifest, judged by the caller. Then, unless `keep_onnx`, the converted .onnx
    files and their external data are removed. Nothing is written when a graph is refused or a conversion fails."""
    folder = Path(folder)
    if optimization not in STYLES:
        raise ConfigError(f"unknown .ort optimization style {optimization!r}; choose {' or '.join(STYLES)}")
    graphs = [describe_graph(path) for path in graphs_to_convert(folder)]
    existing = [p for p in [*(g.path.parent / ORT_MODEL for g in graphs), folder / OPERATORS_CONFIG] if p.exists()]
    if existing:
        listed = ", ".join(str(p.relative_to(folder)) for p in existing)
        raise OutputExistsError(f"{folder} already holds .ort output ({listed}); convert a fresh export folder")
    check_sizes(graphs, optimization)
    onnx_bytes = {g.component: g.bytes for g in graphs}
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=folder) as scratch:
        staged, converted = Path(scratch) / "onnx", Path(scratch) / "ort"
        for graph in graphs:  # the converter converts every .onnx under the folder it is given: give it just these
            _link(graph.files, staged / graph.component)
        _run_converter(staged, converted, STYLES[optimization])
        ort_files = {g.component: _one(converted / g.component, "*.ort") for g in graphs}
        agreement = _validate(graphs, ort_files, optimization, feeds or {})
        operators = _write_config(_one(converted, "*.config"), folder / OPERATORS_CONFIG, sorted(ort_files))
        for component, path in ort_files.items():
            path.replace(folder / component / ORT_MODEL)
    if not keep_onnx:
        for path in (p for g in graphs for p in g.files):
            path.unlink()
    return _manifest(folder, onnx_bytes, agreement, optimization, operators, keep_onnx)


def _manifest(
    folder: Path, onnx_bytes: dict[str, int], agreement: dict, optimization: str, operators: int, keep_onnx: bool
) -> dict:
    import onnxruntime

    graphs = {
        component: {
            "path": f"{component}/{ORT_MODEL}",
            "bytes": (folder / component / ORT_MODEL).stat().st_size,
            "onnx_bytes": size,
            **({"agreement": agreement[component]} if component in agreement else {}),
        }
        for component, size in onnx_bytes.items()
    }
    return {
        "format": "ort",
        "converter": CONVERTER,
        "onnxruntime": onnxruntime.__version__,
        "optimization_style": STYLES[optimization],
        "optimization_level": OPTIMIZATION_LEVEL,
        "graphs": graphs,
        "required_operators": {"path": OPERATORS_CONFIG, "operators": operators},
        "skipped": sorted(p.parent.name for p in folder.glob(f"*/{ONNX_MODEL}") if p.parent.name in REFERENCE_FOLDERS),
        "onnx_kept": keep_onnx,
    }


def graphs_to_convert(folder: Path) -> list[Path]:
    """The `*/model.onnx` graphs of `folder` an .ort export ships: all but REFERENCE_FOLDERS'."""
    graphs = sorted(p for p in Path(folder).glob(f"*/{ONNX_MODEL}") if p.parent.name not in REFERENCE_FOLDERS)
    if not graphs:
        raise InputError(f"no */{ONNX_MODEL} graphs in {folder}; give an exported ONNX folder (mtu-export onnx --out)")
    return graphs


@dataclass(frozen=True)
class GraphFiles:
    """An .onnx graph as the conversion sees it, read once without its weights."""

    path: Path
    files: tuple[Path, ...]  # the graph, then the external data files its initializers name
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fp16_bytes: int  # fp16 initializers
    int8_bytes: int  # int8 and uint8 initializers (an already quantized graph)
    float_elements: int  # fp32 and fp16 initializers' elements
    int8_elements: dict[str, int]  # int8 mode -> the float weight elements it would store in 8 bits

    @property
    def component(self) -> str:
        return self.path.parent.name

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def describe_graph(path: Path) -> GraphFiles:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or an OSError
        raise InputError(f"{path} is not a readable ONNX graph ({exc}); export the folder again") from None
    inits = model.graph.initializer
    external = sorted({ExternalDataInfo(t).location for t in inits if uses_external_data(t)})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    elements = {t.name: (t.data_type, math.prod(t.dims)) for t in inits if t.data_type in floats}
    eight_bits = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return GraphFiles(
        path=path,
        files=(path, *(path.parent / name for name in external)),
        inputs=tuple(i.name for i in model.graph.input),
        outputs=tuple(o.name for o in model.graph.output),
        fp16_bytes=2 * sum(n for dtype, n in elements.values() if dtype == onnx.TensorProto.FLOAT16),
        int8_bytes=sum(math.prod(t.dims) for t in inits if t.data_type in eight_bits),
        float_elements=sum(n for _, n in elements.values()),
        int8_elements={mode: _int8_elements(model.graph, mode, elements) for mode in INT8_OPS},
    )


def _int8_elements(graph, mode: str, elements: dict[str, tuple[int, int]]) -> int:
    """How many float weight elements (`elements`: name -> (type, count)) --quantize `mode` would store in 8 bits."""
    kept = set(static_exclusions(graph)) if mode == "static-int8" else set()
    nodes = [n for n in graph.node if n.op_type in INT8_OPS[mode] and n.name not in kept and len(n.input) > 1]
    return sum(elements[name][1] for name in {n.input[1] for n in nodes} if name in elements)


# -------------------------------------------------------------------------------------------------------- sizes
def check_sizes(graphs: list[GraphFiles], optimization: str) -> None:
    """Refuse the graphs whose .ort would pass ORT_LIMIT, all in one error, naming what brings each under."""
    problems = [p for g in graphs if (p := _size_problem(g, optimization))]
    if problems:
        raise ConfigError(
            f"{len(problems)} graph(s) too large for an .ort FlatBuffer (at most {_size(ORT_LIMIT)} each): "
            + "; ".join(problems)
            + "; nothing was converted"
        )


def _size_problem(graph: GraphFiles, optimization: str) -> str | None:
    size = graph.bytes
    upcast = graph.fp16_bytes if optimization == "fixed" else 0  # 'fixed', on a CPU without fp16 kernels: fp32 copies
    if size + upcast <= ORT_LIMIT:
        return None
    data = " with its external data" if len(graph.files) > 1 else ""
    found = f"{graph.component}/{ONNX_MODEL}{data} is {_size(size)}"
    if upcast:
        found += f", about {_size(size + upcast)} as a 'fixed' .ort (its fp16 weights stored as fp32)"
    fixes = []
    if upcast and size <= ORT_LIMIT:
        fixes.append("optimization 'runtime' (keeps fp16 weights)")
    if graph.component == QUANTIZED_COMPONENT:  # estimates for a re-export, from the graph with fp32 weights
        # (from an int8 graph they err high: its 8-bit weights count as fp32 ones no mode would quantize)
        fp32_size = size + graph.fp16_bytes + 3 * graph.int8_bytes
        estimates = {} if optimization == "fixed" else {"fp16": fp32_size - 2 * graph.float_elements}
        estimates |= {mode: fp32_size - 3 * n for mode, n in graph.int8_elements.items()}  # 4 bytes -> 1 a weight
        fixes += [f"--quantize {m} (about {_size(n)})" for m, n in estimates.items() if n <= ORT_LIMIT]
    if fixes:
        return f"{found}: export with {' or '.join(fixes)}"
    if graph.component == QUANTIZED_COMPONENT:
        return f"{found}: no --quantize mode brings it under"
    return f"{found}: no export option brings it under (--quantize applies to the UNet only)"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


# --------------------------------------------------------------------------------------------------- converting
def _link(files: tuple[Path, ...], folder: Path) -> None:
    """Hard links (copies across file systems) of `files` into `folder`: the converter sees only these graphs, and
    onnxruntime finds external data beside its graph, not through a symlink it may refuse."""
    folder.mkdir(parents=True)
    for path in files:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy2(path, folder / path.name)


def _run_converter(source: Path, out: Path, style: str) -> None:
    """onnxruntime's converter over `source` (every `*/model.onnx`) into `out`: `<component>/<name>.ort` and one
    `required_operators[...].config` for all of them.

    A child process running `python -m` of the converter (its command line is the documented interface; its Python
    function is not): importing it configures the root logger and it prints progress on stdout, a graph near 2 GB
    holds gigabytes of memory until the process ends, and a FlatBuffer overflow aborts the process it happens in."""
    env = {**os.environ, LEVEL_VARIABLE: OPTIMIZATION_LEVEL}
    command = [sys.executable, "-m", CONVERTER, "--optimization_style", style, "--output_dir", str(out), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stdout.splitlines() if line.startswith("Error converting")]
        lines = lines or [line for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        reason = lines[-1].replace(f"{source}{os.sep}", "").strip()
        raise MtuError(
            f"onnxruntime could not convert the graphs to .ort ({reason[:300]}); nothing was written "
            "(check that each graph loads in an onnxruntime session, as `mtu-export onnx` validates it)"
        )


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"{CONVERTER} wrote {[p.name for p in found]} for {pattern} in {folder}"
    return found[0]


def _write_config(written: Path, path: Path, components: list[str]) -> int:
    """The converter's operator config at `path`, its header naming the .ort files in the folder (not the scratch
    paths converted); returns how many operators (domain, op) it lists."""
    lines = [line for line in written.read_text().splitlines() if line.strip() and not line.startswith("#")]
    header = ["# Generated from model/s:", *(f"# - {c}/{ORT_MODEL}" for c in components)]
    path.write_text("\n".join(header + lines) + "\n")
    return len({(line.split(";")[0], op) for line in lines for op in line.split(";")[2].split(",")})


# --------------------------------------------------------------------------------------------------- validation
def _validate(
    graphs: list[GraphFiles], ort_files: dict[str, Path], optimization: str, feeds: dict[str, list[dict]]
) -> dict[str, list[dict]]:
    """Every .ort loads as its style means it to (saved optimizations replayed for 'runtime') and declares its
    graph's inputs and outputs; all failures raised at once. Returns `compare` rows for the components in `feeds`."""
    agreement, problems = {}, []
    for graph in graphs:
        where = f"{graph.component}/{ORT_MODEL}"
        try:
            sess = _session(ort_files[graph.component], replay=optimization == "runtime")
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            problems.append(f"{where} does not load in onnxruntime ({str(exc).splitlines()[0][:200]})")
            continue
        found = (tuple(i.name for i in sess.get_inputs()), tuple(o.name for o in sess.get_outputs()))
        if found != (graph.inputs, graph.outputs):
            problems.append(f"{where} has inputs, outputs {found}; its graph {(graph.inputs, graph.outputs)}")
        if graph.component in feeds:
            agreement[graph.component] = compare(graph.path, ort_files[graph.component], feeds[graph.component])
    if problems:
        hint = " (convert with optimization 'fixed')" if optimization == "runtime" else ""
        raise DriftError(f"{len(problems)} .ort file(s) fail: {'; '.join(problems)}; nothing was written{hint}")
    return agreement


def compare(onnx_path: Path, ort_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Run the .onnx and the .ort in onnxruntime CPU sessions on `feeds` (the .onnx at level 'extended', the level
    'fixed' conversion saves: every optimization but x86's NCHWc layout; the .ort as a default session, saved runtime
    optimizations not replayed); per output its max |diff| and PSNR over all feeds (None: identical).

    Why not the .onnx at its default level 'all': on an x86 CPU, NCHWc convolutions sum in another order, about 1e-6
    apart, and in a quantized graph such a difference now and then moves a value across a rounding boundary of the
    next QuantizeLinear: one quantization step, 55 dB on the tiny static-int8 t2i UNet. The .ort itself runs exactly
    what the 'extended' session runs (identical outputs, measured), which is what this check holds it to."""
    reference, converted = _session(Path(onnx_path), level="extended"), _session(Path(ort_path))
    names = [o.name for o in reference.get_outputs()]
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in names}
    for feed in feeds:
        for name, ref, got in zip(names, run(reference, feed), run(converted, feed), strict=True):
            pairs[name].append((ref.astype(np.float32).ravel(), got.astype(np.float32).ravel()))
    rows = []
    for name, outputs in pairs.items():
        ref = np.concatenate([r for r, _ in outputs])
        got = np.concatenate([g for _, g in outputs])
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        rows.append({"output": name, "feeds": len(feeds), "max_abs_diff": diff, "psnr_db": psnr_db(ref, got)})
    return rows


def _session(path: Path, replay: bool = False, level: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: quantized graphs warn about unused initializers
    if level == "extended":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if replay:  # our own files: the trust onnxruntime asks for before replaying saved optimizations
        options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
