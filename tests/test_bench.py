"""`mtu-export bench`: FLOP counts that agree between torch and the exported graph, interleaved timing, the
report files, the CI gate failing on a doctored result with every violation named, and a malformed baseline refused
in one line before anything is measured. No test here judges a time: latency is only ever compared as a ratio inside
one run, by the gate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, invoke

from mtu_export.bench.flops import onnx_flops, torch_flops
from mtu_export.bench.gate import check, enforce
from mtu_export.bench.graphs import export_fixed, graph_signature, unet_feed
from mtu_export.bench.timing import interleaved, interleaved_rounds
from mtu_export.errors import BenchGateError, ConfigError
from mtu_export.shapes.tiny import tiny_unet

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
OPTIMIZED_PSNR_MIN_DB = 60.0  # the fused-attention graph against torch, as any fp32 export


def test_torch_and_onnx_flop_counts_agree_exactly(tmp_path):
    unet = tiny_unet().eval()
    feed = unet_feed(dict(unet.config), 4, 1, 7, seed=0)
    counted = torch_flops(unet, feed)
    path = export_fixed(unet, feed, tmp_path / "g")
    assert counted == onnx_flops(path)
    # Graphs past 2 GB keep weights in external data: counting reads their shapes, never the data file.
    import onnx

    onnx.save_model(onnx.load(str(path)), str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    location="ext.onnx_data", size_threshold=1024)  # fmt: skip
    (tmp_path / "ext.onnx_data").unlink()
    assert counted == onnx_flops(tmp_path / "ext.onnx")
    # CPU SDPA is counted: without it torch would report fewer FLOPs than the graph's MatMuls.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
    per_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert per_op.get("aten._scaled_dot_product_flash_attention_for_cpu", 0) > 0


def test_graph_signature_ignores_weight_values_and_nothing_else(tmp_path):
    feed = unet_feed(dict(tiny_unet().config), 4, 2, 7, seed=0)
    one, other = (export_fixed(tiny_unet(seed=s), feed, tmp_path / f"seed{s}") for s in (0, 1))
    assert graph_signature(one) == graph_signature(other)  # different weights, same graph
    wider = tiny_unet(in_channels=5)
    wide_feed = unet_feed(dict(wider.config), 5, 2, 7, seed=0)
    assert graph_signature(export_fixed(wider, wide_feed, tmp_path / "wide")) != graph_signature(one)
    deeper = export_fixed(tiny_unet(layers_per_block=2), feed, tmp_path / "deep")
    assert graph_signature(deeper) != graph_signature(one)


def test_interleaving_alternates_the_order_of_a_and_b():
    calls: list[str] = []
    result = interleaved(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert result["repeats"] == 4 and result["ratio"] > 0


def test_latency_rounds_open_fresh_sessions_and_alternate_the_order():
    events: list[str] = []

    def opener(name: str):
        def open_session():
            events.append(f"open {name}")
            return lambda: events.append(name)

        return open_session

    result = interleaved_rounds(opener("a"), opener("b"), rounds=2, pairs=2, warmup=1)
    assert events == ["open a", "open b", "a", "b", "a", "b", "b", "a"] + [
        "open b",
        "open a",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
    ]
    assert len(result["round_ratios"]) == 2 and result["ratio"] > 0


@pytest.fixture(scope="module")
def report(mtu_world: Path, world_pipeline: Path, topk_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    args = ("--base", world_pipeline, "--repeats", "2", "--rounds", "2", "--pairs", "3", "--warmup", "1")
    args += ("--sparse", topk_world)
    args += ("--steps", "2", "--modes", "dynamic-int8")
    result = invoke("bench", mtu_world, "--out", out, *args, "--image-count", "1", "--save-baseline", out / "base.json")
    assert result.exit_code == 0, result.output
    return out


def test_bench_writes_json_markdown_and_plots(report):
    results = json.loads((report / "bench.json").read_text())
    assert set(results["tasks"]) == {"t2i", "edit", "sr", "inpaint"}
    for row in results["tasks"].values():
        flops = row["flops_per_call_batch1"]
        assert flops["mtu"]["torch"] == flops["mtu"]["onnx"] == flops["single"]["torch"]
        assert row["parameters"]["mtu"] == row["parameters"]["single"]
        assert row["same_structure"] is True  # same ops, wiring, shapes: only weight values differ
        latency = row["unet_latency"]
        assert len(latency["mtu_vs_single"]["round_ratios"]) == 2 and latency["mtu_vs_single"]["pairs_per_round"] == 3
        assert len(latency["single_vs_single"]["round_ratios"]) == 2  # the A/A control
        assert all(mb > 0 for mb in row["peak_rss_mb"].values())  # each graph's own child process
        assert len(latency["optimized_vs_plain"]["round_ratios"]) == 2  # fused attention vs the plain export
        assert row["optimized"]["psnr_db"] is None or row["optimized"]["psnr_db"] >= OPTIMIZED_PSNR_MIN_DB
        # The top-2 checkpoint's sparse fold: half the FFN width, fewer FLOPs (torch = ONNX), timed like the rest.
        assert row["sparse"]["ffn_kept"] == 0.5 and row["sparse"]["gflops_ratio"] < 1.0
        assert flops["sparse"]["torch"] == flops["sparse"]["onnx"] < flops["single"]["torch"]
        assert len(row["sparse"]["latency_vs_single"]["round_ratios"]) == 2
    t2i = results["tasks"]["t2i"]["flops_per_call_batch1"]
    assert t2i["base"]["torch"] == t2i["mtu"]["torch"]  # folded t2i costs exactly what the base model costs
    assert set(results["bundle"]["modes"]) == {"none", "dynamic-int8"}
    assert "latency_vs_fp32" in results["bundle"]["modes"]["dynamic-int8"]
    assert all("skipped" in row["coreml_latency"] for row in results["tasks"].values())  # Core ML runs on macOS only
    markdown = (report / "bench.md").read_text()
    assert "Folded MTU task vs single-task UNet" in markdown and "dynamic-int8" in markdown
    assert "Optimized vs plain export of the folded UNet" in markdown
    assert "Sparse fold vs single-task UNet" in markdown
    baseline = json.loads((report / "base.json").read_text())
    assert set(baseline["sparse_latency_ratio_max"]) == set(results["tasks"])
    assert all(bound <= 1.0 for bound in baseline["sparse_latency_ratio_max"].values())
    assert (report / "bench.png").stat().st_size > 1000


def test_bench_check_fails_on_a_doctored_result_naming_every_violation(report, tmp_path):
    results = json.loads((report / "bench.json").read_text())
    baseline = json.loads((report / "base.json").read_text())
    baseline["latency_ratio_max"] = 100.0  # this test doctors the numbers; real noise must not decide it
    baseline["optimized_ratio_max"] = dict.fromkeys(baseline["optimized_ratio_max"], 100.0)
    baseline["sparse_latency_ratio_max"] = dict.fromkeys(baseline["sparse_latency_ratio_max"], 100.0)
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    (tmp_path / "honest.json").write_text(json.dumps(results))
    ok = invoke("bench", "--results", tmp_path / "honest.json", "--check", tmp_path / "baseline.json")
    assert ok.exit_code == 0, ok.output

    doctored = copy.deepcopy(results)
    doctored["tasks"]["edit"]["unet_latency"]["mtu_vs_single"]["ratio"] = 150.0
    doctored["tasks"]["sr"]["flops_per_call_batch1"]["mtu"]["torch"] += 2
    doctored["bundle"]["size_ratio"] = 1.5
    doctored["tasks"]["inpaint"]["same_structure"] = False
    doctored["tasks"]["t2i"]["unet_latency"]["optimized_vs_plain"]["ratio"] = 150.0
    doctored["tasks"]["edit"]["sparse"]["latency_vs_single"]["ratio"] = 150.0  # a sparse fold that is not faster
    del doctored["tasks"]["sr"]["sparse"]  # a run that benched no sparse fold against a baseline that bounds one
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    bad = invoke("bench", "--results", tmp_path / "doctored.json", "--check", tmp_path / "baseline.json")
    assert bad.exit_code == 7, bad.output
    assert "edit: folded / single-task UNet latency 150.000 exceeds" in bad.stderr
    assert "sr: GFLOPs per call changed" in bad.stderr
    assert "sr: torch counts" in bad.stderr  # the torch and ONNX counts no longer agree either
    assert "sr: folded MTU and single-task FLOPs differ" in bad.stderr
    assert "bundle bytes / one model 1.5000 exceeds" in bad.stderr
    assert "inpaint: folded and single-task graph structures differ" in bad.stderr
    assert "t2i: optimized / plain UNet latency 150.000 exceeds 100.000" in bad.stderr
    assert "edit: sparse fold / single-task UNet latency 150.000 exceeds 100.000" in bad.stderr
    assert "sr: the baseline bounds a sparse fold, and this run benched none" in bad.stderr
    assert "9 benchmark violation(s)" in bad.stderr
    # The Python API fails the same way: BenchGateError (exit 7) with every violation, none on the honest result.
    enforce(results, baseline, "baseline.json")
    seen: list[str] = []
    with pytest.raises(BenchGateError, match=r"^9 benchmark violation\(s\) against baseline.json$") as failed:
        enforce(doctored, baseline, "baseline.json", on_violation=seen.append)
    assert failed.value.exit_code == 7 and failed.value.problems == seen == check(doctored, baseline)


def test_bench_check_names_a_floored_mode_the_run_did_not_measure(report):
    results = json.loads((report / "bench.json").read_text())
    baseline = json.loads((report / "base.json").read_text())
    baseline["latency_ratio_max"] = 100.0  # only the missing mode may fail this check, not the tiny run's noise
    baseline["optimized_ratio_max"] = dict.fromkeys(baseline["optimized_ratio_max"], 100.0)
    baseline["sparse_latency_ratio_max"] = dict.fromkeys(baseline["sparse_latency_ratio_max"], 100.0)
    assert check(results, baseline) == []
    baseline["image_psnr_min_db"]["static-int8"] = 30
    assert check(results, baseline) == [
        "[static-int8]: not measured, so its 30 dB image PSNR floor went unchecked; add it to --modes"
    ]


def test_training_step_benchmark_compares_the_mtu_split_with_a_full_fine_tune(world_pipeline, tmp_path):
    out = tmp_path / "train_step.json"
    result = invoke("bench-train", world_pipeline, "--batch-size", "8", "--repeats", "1", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    counts = report["trainable_parameters"]
    assert 0 < counts["mtu"] < counts["full"]
    assert report["mtu_vs_full"]["repeats"] == 1 and report["batch_size"] == 8


# ------------------------------------------------------------------------------------------------ baseline checks
BAD_BASELINES = {  # a doctoring of benchmarks/baseline.json -> the problem the one error line must name
    "missing key": (lambda b: b.pop("graph_psnr_min_db"), "'graph_psnr_min_db' is missing"),
    "wrong type": (
        lambda b: b.update(latency_ratio_max="1.15"),
        "'latency_ratio_max' should be a number, found string",
    ),
    "wrong entry type": (lambda b: b["flops"].update(t2i=1.5e9), "'flops.t2i' should be an integer, found number"),
    "wrong bound type": (
        lambda b: b["optimized_ratio_max"].update(sr="1.0"),
        "'optimized_ratio_max.sr' should be a number, found string",
    ),
    "not an object": (lambda b: b.update(image_psnr_min_db=[40]), "'image_psnr_min_db' should be an object"),
    "unknown mode": (lambda b: b["image_psnr_min_db"].update(int4=20), "unknown mode(s) int4"),
    "wrong format": (
        lambda b: b.update(format="mtu-export-bench-baseline/2"),
        "'format' should be 'mtu-export-bench-baseline/1', found 'mtu-export-bench-baseline/2'",
    ),
}


def doctored_baseline(path: Path, *doctorings) -> Path:
    baseline = json.loads((BENCHMARKS / "baseline.json").read_text())
    for doctor in doctorings:
        doctor(baseline)
    path.write_text(json.dumps(baseline))
    return path


@pytest.mark.parametrize("doctor, problem", BAD_BASELINES.values(), ids=BAD_BASELINES.keys())
def test_bench_check_refuses_a_malformed_baseline_in_one_line(tmp_path, doctor, problem):
    bad = doctored_baseline(tmp_path / "baseline.json", doctor)
    result = invoke("bench", "--results", BENCHMARKS / "results" / "bench.json", "--check", bad)
    assert_clean_failure(result, problem, ConfigError.exit_code)


def test_every_baseline_problem_is_listed_at_once_by_the_cli_and_the_api(tmp_path):
    cases = [case for name, case in BAD_BASELINES.items() if name != "not an object"]  # it hides the unknown mode
    bad = doctored_baseline(tmp_path / "baseline.json", *(doctor for doctor, _ in cases))
    result = invoke("bench", "--results", BENCHMARKS / "results" / "bench.json", "--check", bad)
    for _, problem in cases:
        assert_clean_failure(result, problem, ConfigError.exit_code)
    with pytest.raises(
        ConfigError, match="'format' should be .*'latency_ratio_max' should be a number.*'graph_psnr_min_db' is missing"
    ):
        check(json.loads((BENCHMARKS / "results" / "bench.json").read_text()), json.loads(bad.read_text()))


def test_the_shipped_baseline_is_valid(tmp_path):
    results = json.loads((BENCHMARKS / "results" / "bench.json").read_text())
    assert isinstance(check(results, json.loads((BENCHMARKS / "baseline.json").read_text())), list)


def with_optimized_rows(results: dict, ratio: float = 0.96, psnr_db: float | None = 100.0) -> dict:
    """`results` as a bench run now records them: each task's optimized vs plain UNet latency and PSNR."""
    results = copy.deepcopy(results)
    for row in results["tasks"].values():
        row["unet_latency"]["optimized_vs_plain"] = {"ratio": ratio, "round_ratios": [ratio]}
        row["optimized"] = {"attention": "fused", "psnr_db": psnr_db, "max_abs_diff": 0.0}
    return results


def test_the_gate_fails_an_optimized_graph_that_lost_its_speed_up_or_its_quality():
    baseline = json.loads((BENCHMARKS / "baseline.json").read_text())
    honest = with_optimized_rows(json.loads((BENCHMARKS / "results" / "bench.json").read_text()))
    assert not [p for p in check(honest, baseline) if "optimized" in p]
    doctored = copy.deepcopy(honest)
    doctored["tasks"]["t2i"]["unet_latency"]["optimized_vs_plain"]["ratio"] = 1.2
    doctored["tasks"]["edit"]["optimized"]["psnr_db"] = 40.0
    del doctored["tasks"]["sr"]["unet_latency"]["optimized_vs_plain"]
    del baseline["optimized_ratio_max"]["inpaint"]
    found = sorted(p for p in check(doctored, baseline) if "optimized" in p)
    limit = json.loads((BENCHMARKS / "baseline.json").read_text())["optimized_ratio_max"]["t2i"]
    assert found == [
        "edit: optimized UNet PSNR 40.0 dB vs torch below 60.0 dB",
        "inpaint: no optimized / plain bound in the baseline; regenerate it with --save-baseline",
        "sr: optimized vs plain UNet not recorded (rerun bench)",
        f"t2i: optimized / plain UNet latency 1.200 exceeds {limit:.3f}",
    ]


def test_bench_refuses_a_malformed_baseline_before_measuring(pipeline_dir, tmp_path):
    assert invoke("upcycle", pipeline_dir, "--out", tmp_path / "mtu").exit_code == 0
    bad = doctored_baseline(tmp_path / "baseline.json", BAD_BASELINES["missing key"][0])
    quick = ("--rounds", "1", "--pairs", "1", "--repeats", "1", "--warmup", "0", "--steps", "1", "--modes", "none")
    quick += ("--image-count", "0", "--base", pipeline_dir)  # a run that would measure
    result = invoke("bench", tmp_path / "mtu", "--out", tmp_path / "report", *quick, "--check", bad)
    assert_clean_failure(result, "'graph_psnr_min_db' is missing", ConfigError.exit_code)
    assert result.stdout == "" and not (tmp_path / "report").exists()  # nothing measured, nothing written
