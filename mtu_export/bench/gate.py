"""The CI gate: a baseline (`make_baseline` writes it from a run; `read_baseline` validates one in full before any
measuring), the check of a result against it (`check`: ratios only, never absolute times, every violation listed:
folded ÷ single-task and optimized ÷ plain UNet latency, FLOPs, graph structure, bundle bytes, exported-vs-torch
PSNR of every graph, and each quantization mode's end-to-end image PSNR floor for every task) and `enforce`, which
fails with BenchGateError (exit 7) when anything is violated."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from mtu_export.config import ONNX_QUANTIZE
from mtu_export.errors import BenchGateError, ConfigError
from mtu_export.storage import read_json

DEFAULT_TOLERANCES = {
    "latency_ratio_max": 1.10,
    "optimized_ratio_max": 1.00,  # the optimized (fused-attention) UNet must not be slower than the plain export
    "bundle_ratio_slack": 0.0,
    "graph_psnr_min_db": 60.0,
}
BASELINE_FORMAT = "mtu-export-bench-baseline/1"
# Optional, per task, when the run benched a sparse (`--route top-k`) checkpoint: the sparse fold's exact FLOPs and
# bounds on its GFLOPs and latency ratios to the single-task UNet (below 1: a sparse fold that is not cheaper fails).
SPARSE_KEYS = ("sparse_flops", "sparse_gflops_ratio_max", "sparse_latency_ratio_max")
SPARSE_LATENCY_MARGIN = 0.03  # over the measured sparse ÷ single latency, within the A/A noise seen here


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# key -> (a table keyed by task / mode?, what each value must be, the test)
BASELINE_SCHEMA = {
    "latency_ratio_max": (False, "a number", _is_number),
    "bundle_ratio_max": (False, "a number", _is_number),
    "graph_psnr_min_db": (False, "a number", _is_number),
    "flops": (True, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "optimized_ratio_max": (True, "a number", _is_number),
    "image_psnr_min_db": (True, "a number or null", lambda v: v is None or _is_number(v)),
}


def baseline_problems(baseline: dict) -> list[str]:
    """Every way `baseline` departs from what `make_baseline` writes: unknown format, keys missing, wrong types."""
    problems = []
    if baseline.get("format") != BASELINE_FORMAT:
        found = f"found {baseline['format']!r}" if "format" in baseline else "it is missing"
        problems.append(f"'format' should be {BASELINE_FORMAT!r}, {found}")
    for key, (table, expected, ok) in BASELINE_SCHEMA.items():
        value = baseline.get(key)
        if key not in baseline:
            problems.append(f"'{key}' is missing")
        elif table and not isinstance(value, dict):
            problems.append(f"'{key}' should be an object of {expected} per entry, found {_json_type(value)}")
        elif table:
            problems += [
                f"'{key}.{k}' should be {expected}, found {_json_type(v)}" for k, v in value.items() if not ok(v)
            ]
        elif not ok(value):
            problems.append(f"'{key}' should be {expected}, found {_json_type(value)}")
    for key in SPARSE_KEYS:  # optional: present when the baseline was made with --sparse
        value = baseline.get(key)
        if key in baseline and not isinstance(value, dict):
            problems.append(f"'{key}' should be an object of numbers per task, found {_json_type(value)}")
        elif key in baseline:
            problems += [
                f"'{key}.{k}' should be a number, found {_json_type(v)}" for k, v in value.items() if not _is_number(v)
            ]
    modes = baseline.get("image_psnr_min_db")
    unknown = [m for m in modes if m not in ONNX_QUANTIZE] if isinstance(modes, dict) else []
    if unknown:
        known = ", ".join(ONNX_QUANTIZE)
        problems.append(f"'image_psnr_min_db' has unknown mode(s) {', '.join(unknown)} (known: {known})")
    return problems


def _json_type(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    shown = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
    return "null" if value is None else f"{names.get(type(value), type(value).__name__)} {shown}"


def read_baseline(path: Path) -> dict:
    """A `--check` baseline, validated in full before any measuring; one ConfigError lists every problem."""
    baseline = read_json(Path(path))
    _require_valid(baseline, str(path))
    return baseline


def _require_valid(baseline: dict, where: str) -> None:
    problems = baseline_problems(baseline)
    if problems:
        raise ConfigError(
            f"{where} is not a valid bench baseline: {'; '.join(problems)} — fix it, or regenerate it with "
            "`mtu-export bench CHECKPOINT --save-baseline FILE`"
        )


def make_baseline(results: dict, tolerances: dict | None = None) -> dict:
    """A CI baseline from a run: exact FLOPs per task, the bundle ratio, PSNR floors, ratio tolerances (the
    optimized ÷ plain UNet bound per task)."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    return _sparse_baseline(results) | {
        "format": BASELINE_FORMAT,
        "latency_ratio_max": tol["latency_ratio_max"],
        "flops": {task: row["flops_per_call_batch1"]["mtu"]["torch"] for task, row in results["tasks"].items()},
        "optimized_ratio_max": {task: tol["optimized_ratio_max"] for task in results["tasks"]},
        "bundle_ratio_max": results["bundle"]["size_ratio"] + tol["bundle_ratio_slack"],
        "graph_psnr_min_db": tol["graph_psnr_min_db"],
        "image_psnr_min_db": {
            mode: math.floor(min(v for v in row["image_psnr_db"].values() if v is not None) - 3.0)
            if any(v is not None for v in row["image_psnr_db"].values())
            else None
            for mode, row in results["bundle"]["modes"].items()
        },
    }


def _sparse_baseline(results: dict) -> dict:
    """The sparse fold's entries: exact FLOPs, its GFLOPs ratio as measured, its latency ratio plus a margin (at
    most 1.0: never slower than single-task). Empty when the run benched no sparse checkpoint."""
    rows = {task: row["sparse"] for task, row in results["tasks"].items() if "sparse" in row}
    if not rows:
        return {}
    return {
        "sparse_flops": {t: results["tasks"][t]["flops_per_call_batch1"]["sparse"]["torch"] for t in rows},
        "sparse_gflops_ratio_max": {t: math.ceil(r["gflops_ratio"] * 1e4) / 1e4 for t, r in rows.items()},
        "sparse_latency_ratio_max": {
            t: round(min(1.0, r["latency_vs_single"]["ratio"] + SPARSE_LATENCY_MARGIN), 3) for t, r in rows.items()
        },
    }


def _sparse_problems(task: str, row: dict, baseline: dict) -> list[str]:
    if "sparse_latency_ratio_max" not in baseline or task not in baseline["sparse_latency_ratio_max"]:
        return []
    sparse = row.get("sparse")
    if sparse is None:
        return [f"{task}: the baseline bounds a sparse fold, and this run benched none; add --sparse CHECKPOINT"]
    problems = []
    flops = row["flops_per_call_batch1"]["sparse"]
    want = baseline.get("sparse_flops", {}).get(task)
    if want is not None and flops["torch"] != want:
        problems.append(f"{task}: sparse fold GFLOPs changed: {flops['torch'] / 1e9:.6f}, baseline {want / 1e9:.6f}")
    if flops["torch"] != flops["onnx"]:
        problems.append(
            f"{task}: torch counts {flops['torch']} FLOPs of the sparse fold, its ONNX graph {flops['onnx']}"
        )
    limit = baseline.get("sparse_gflops_ratio_max", {}).get(task)
    if limit is not None and sparse["gflops_ratio"] > limit:
        problems.append(f"{task}: sparse / single-task GFLOPs {sparse['gflops_ratio']:.4f} exceeds {limit:.4f}")
    ratio, limit = sparse["latency_vs_single"]["ratio"], baseline["sparse_latency_ratio_max"][task]
    if ratio > limit:
        problems.append(f"{task}: sparse fold / single-task UNet latency {ratio:.3f} exceeds {limit:.3f}")
    return problems


def check(results: dict, baseline: dict) -> list[str]:
    """Every way `results` violates `baseline` (empty: the gate passes). Ratios only; no absolute times. A malformed
    baseline raises ConfigError listing all its problems."""
    _require_valid(baseline, "the baseline")
    problems = []
    for task, row in results["tasks"].items():
        problems += _task_problems(task, row, baseline)
    bundle = results["bundle"]
    if bundle["size_ratio"] > baseline["bundle_ratio_max"]:
        problems.append(
            f"bundle bytes / one model {bundle['size_ratio']:.4f} exceeds {baseline['bundle_ratio_max']:.4f}"
        )
    for mode, row in bundle["modes"].items():
        if mode == "none":
            for task, value in row["graph_psnr_db"].items():
                if value is not None and value < baseline["graph_psnr_min_db"]:
                    problems.append(
                        f"{task}: exported UNet PSNR {value:.1f} dB below {baseline['graph_psnr_min_db']} dB"
                    )
        floor = baseline["image_psnr_min_db"].get(mode)
        for task, value in row["image_psnr_db"].items():
            if floor is not None and value is not None and value < floor:
                problems.append(f"{task} [{mode}]: end-to-end image PSNR {value:.1f} dB below its floor {floor} dB")
    for mode, floor in baseline["image_psnr_min_db"].items():
        if floor is not None and mode not in bundle["modes"]:
            problems.append(
                f"[{mode}]: not measured, so its {floor} dB image PSNR floor went unchecked; add it to --modes"
            )
    return problems


def _task_problems(task: str, row: dict, baseline: dict) -> list[str]:
    problems = []
    limit = baseline["latency_ratio_max"]
    ratio = row["unet_latency"]["mtu_vs_single"]["ratio"]
    if ratio > limit:
        problems.append(f"{task}: folded / single-task UNet latency {ratio:.3f} exceeds {limit:.3f}")
    problems += _optimized_problems(task, row, baseline)
    problems += _sparse_problems(task, row, baseline)
    if row.get("same_structure") is not True:
        found = "not recorded (rerun bench)" if "same_structure" not in row else "differ"
        problems.append(f"{task}: folded and single-task graph structures {found}")
    flops = row["flops_per_call_batch1"]
    want = baseline["flops"].get(task)
    if want is None:
        problems.append(f"{task}: no FLOPs in the baseline; regenerate it with --save-baseline")
    elif flops["mtu"]["torch"] != want:
        problems.append(
            f"{task}: GFLOPs per call changed: {flops['mtu']['torch'] / 1e9:.6f}, baseline {want / 1e9:.6f}"
        )
    if flops["mtu"]["torch"] != flops["mtu"]["onnx"]:
        problems.append(f"{task}: torch counts {flops['mtu']['torch']} FLOPs, the ONNX graph {flops['mtu']['onnx']}")
    if flops["mtu"]["torch"] != flops["single"]["torch"]:
        pair = f"{flops['mtu']['torch']} vs {flops['single']['torch']}"
        problems.append(f"{task}: folded MTU and single-task FLOPs differ ({pair})")
    return problems


def _optimized_problems(task: str, row: dict, baseline: dict) -> list[str]:
    """The optimized (fused-attention) UNet against the plain export: its latency ratio and its PSNR vs torch."""
    latency, optimized = row["unet_latency"].get("optimized_vs_plain"), row.get("optimized")
    if latency is None or optimized is None:
        return [f"{task}: optimized vs plain UNet not recorded (rerun bench)"]
    problems = []
    limit = baseline["optimized_ratio_max"].get(task)
    if limit is None:
        problems.append(f"{task}: no optimized / plain bound in the baseline; regenerate it with --save-baseline")
    elif latency["ratio"] > limit:
        problems.append(f"{task}: optimized / plain UNet latency {latency['ratio']:.3f} exceeds {limit:.3f}")
    psnr, floor = optimized["psnr_db"], baseline["graph_psnr_min_db"]
    if psnr is not None and psnr < floor:
        problems.append(f"{task}: optimized UNet PSNR {psnr:.1f} dB vs torch below {floor} dB")
    return problems


def enforce(
    results: dict, baseline: dict, source: Path | str, on_violation: Callable[[str], None] | None = None
) -> None:
    """The gate: returns when `results` meets `baseline`; otherwise passes each violation to `on_violation` and
    raises BenchGateError (exit 7) saying how many there are against `source` (its `problems` lists them)."""
    problems = check(results, baseline)
    if not problems:
        return
    for problem in problems:
        if on_violation is not None:
            on_violation(problem)
    raise BenchGateError(f"{len(problems)} benchmark violation(s) against {source}", problems)
