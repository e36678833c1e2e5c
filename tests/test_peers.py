"""`make bench-sd15`'s report: the peers' section lands in sd15.{json,md} beside the fold half, and the speed goals
are judged against the run's own control (optimum's graph timed against itself), so a lead smaller than the noise
is never reported as a clear win. The measuring itself runs at SD1.5 scale only in `make bench-sd15`."""

from __future__ import annotations

import json

from mtu_export.bench import peers, sd15

MACHINE = {"cpu": "test CPU", "cpus": 2, "extensions": ["avx2"], "onnxruntime": "1.32.0", "torch": "2.13.0"}


def _row(ratio: float, pairs: tuple[float, float], psnr: float | None = 131.0, int8: bool = False) -> dict:
    row = {
        "ratio_to_optimum": ratio,
        "latency": {"ratio": ratio, "pair_ratio_range": list(pairs)},
        "ms": 10_000 * ratio,
        "fraction_of_peak_gemm": 0.8,
        "psnr_per_call_db": psnr,
        "peak_rss_bytes": 4e9,
        "load_s": 4.0,
        "bytes": 3.4e9,
        "attention_ops": {"MultiHeadAttention": 32},
        "int8_ops": {"QLinearConv": 96} if int8 else {},
    }
    if int8:
        row["float_gemm_ops"] = {"Gemm": 24}
    else:
        row["gemm_layers"] = {"Conv": {"fraction_of_peak_gemm": 0.95}, "MatMul": {"fraction_of_peak_gemm": 0.9}}
    return row


def _result(control: tuple[float, float], fp32: float, int8: float, int8_psnr: float = 37.0) -> dict:
    return {
        "config": {"batch": 2, "latent": 64, "tokens": 77, "threads": 2, "repeats": 5},
        "machine": MACHINE,
        "finished": "2026-12-03 22:00 UTC",
        "gflops_per_call": 1606.6,
        "peak_gemm_gflops": 192.0,
        "peak_gemm_probes_gflops": {"MatMul 1024": 182.0, "Conv3x3 1280": 192.0},
        "graphs": {
            "optimum": _row(1.0, control) | {"latency": {"ratio": sum(control) / 2, "pair_ratio_range": list(control)}},
            "ours-fused": _row(fp32, (fp32 - 0.01, fp32 + 0.01)),
            "ours": _row(0.95, (0.94, 0.96)),
            "ours-fused+static-int8": _row(int8, (int8 - 0.01, int8 + 0.01), int8_psnr, int8=True),
        },
    }


def test_a_lead_inside_the_controls_noise_is_not_called_a_clear_win():
    quiet = peers.verdict(_result(control=(0.99, 1.01), fp32=0.82, int8=0.45))
    assert quiet["fp32"] == {"graph": "ours-fused", "ratio": 0.82, "goal": 0.85, "met": True, "beyond_noise": True}
    assert quiet["int8"]["graph"] == "ours-fused+static-int8" and quiet["int8"]["beyond_noise"]
    noisy = peers.verdict(_result(control=(0.94, 1.06), fp32=0.82, int8=0.45))
    assert abs(noisy["noise"] - 0.06) < 1e-9
    assert noisy["fp32"]["met"] and not noisy["fp32"]["beyond_noise"]  # 0.82 × 1.06 > 0.85
    assert noisy["int8"]["beyond_noise"]  # 0.45 × 1.06 ≤ 0.50
    assert not peers.verdict(_result(control=(1.0, 1.0), fp32=0.90, int8=0.45))["fp32"]["met"]


def test_an_int8_graph_under_the_psnr_floor_does_not_count():
    found = peers.verdict(_result(control=(1.0, 1.0), fp32=0.9, int8=0.40, int8_psnr=peers.INT8_PSNR_MIN_DB - 1))
    assert "int8" not in found
    assert "no graph reached 30 dB" in peers.markdown(_result(control=(1.0, 1.0), fp32=0.9, int8=0.4, int8_psnr=20))


def test_the_peers_section_joins_the_fold_half_in_sd15_json_and_md(tmp_path):
    fold = {
        "config": {"batch": 2, "latent": 64, "tokens": 77, "threads": 2, "repeats": 3, "experts": 4, "tasks": ["t2i"]},
        "parameters": {"base": 859_520_964, "mtu": 859_774_340},
        "gflops_base_batch1": 803.3,
        "tasks": {
            "t2i": {
                "gflops_batch2_torch": 1606.55,
                "gflops_batch2_onnx": 1606.55,
                "gflops_batch2_single_onnx": 1606.55,
                "latency": {"a_median_ms": 9000.0, "b_median_ms": 9100.0, "ratio": 0.989},
                "export_mtu": {"export_seconds": 45.0, "peak_rss_mb": 7400.0},
                "bytes": {"mtu": 3.44e9, "single": 3.44e9},
            }
        },
        "bundle": {"bytes": 3.44e9, "ratio_to_one_task": 1.0004, "export_seconds": 41.0, "peak_rss_mb": 7500.0},
        "machine": MACHINE,
        "finished": "2026-12-03 21:40 UTC",
    }
    (tmp_path / "sd15.json").write_text(json.dumps(fold))
    result = _result(control=(0.98, 1.02), fp32=0.80, int8=0.45)
    peers.write_results(tmp_path, result)
    both = json.loads((tmp_path / "sd15.json").read_text())
    assert both["tasks"] == fold["tasks"] and both["peers"] == result
    text = (tmp_path / "sd15.md").read_text()
    assert text.startswith(sd15.markdown(fold))  # the fold half first, unchanged, then the peers' section
    assert "Finished 2026-12-03 21:40 UTC on test CPU" in text and "Finished 2026-12-03 22:00 UTC" in text
    assert "| optimum | 10000 | **1.000** (control 1.000) | 0.980–1.020 |" in text
    assert "best fp32: ours-fused 0.800 ÷ optimum (goal ≤ 0.85): met beyond the noise." in text
    assert not list(tmp_path.glob(".*tmp"))
    # Run alone (no fold half on disk), the section stands by itself.
    peers.write_results(tmp_path / "alone", result)
    assert (tmp_path / "alone" / "sd15.md").read_text() == peers.markdown(result)
