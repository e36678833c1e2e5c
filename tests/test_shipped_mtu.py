"""The shipped 4-task MTU model and its single-task baselines (`models/shapes-mtu`, `models/shapes-single-*`): they
load, share the base pipeline, fold into plain diffusers pipelines that run, fit the size budget of `models/`, and
their model card quotes the committed parity table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtu_export.checkpoint import load_checkpoint
from mtu_export.fold import fold_task, verify_fold

MODELS = Path(__file__).parents[1] / "models"
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
TASKS = ("t2i", "edit", "sr", "inpaint")
MODELS_BUDGET_MB = 80


def test_mtu_checkpoint_loads_with_four_tasks_and_four_experts():
    ckpt = load_checkpoint(MODELS / "shapes-mtu")
    assert ckpt.model.config.task_names == TASKS and ckpt.model.config.num_experts == 4
    assert ckpt.pipeline_dir.resolve() == (MODELS / "shapes-base").resolve()
    assert ckpt.meta["training"]["steps"] >= 1000
    model = load_checkpoint(MODELS / "shapes-mtu", dtype=torch.float32).model
    for task in TASKS:
        verify_fold(model, fold_task(model, task), task)


@pytest.mark.parametrize("task", TASKS)
def test_each_baseline_is_a_single_task_full_fine_tune(task):
    ckpt = load_checkpoint(MODELS / f"shapes-single-{task}")
    assert ckpt.model.config.task_names == (task,) and ckpt.model.config.num_experts == 1
    assert ckpt.meta["training"]["config"]["trainable"] == "full"
    assert ckpt.pipeline_dir.resolve() == (MODELS / "shapes-base").resolve()


def test_models_fit_their_budget_and_hold_only_safetensors():
    files = [p for p in MODELS.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) / 1e6 < MODELS_BUDGET_MB


def test_model_card_quotes_the_parity_table():
    card = (MODELS / "shapes-mtu" / "README.md").read_text()
    report = json.loads((RESULTS / "parity" / "parity.json").read_text())
    for task, entry in report["parity"].items():
        row = entry["metrics"][entry["primary"]]
        assert f"{row['ratio']:.3f}" in card, task


@pytest.mark.parametrize(("k", "flops_below"), [(1, 0.90), (2, 0.91)])
def test_topk_models_fold_exactly_to_narrow_ffns_and_their_tradeoff_rows_reproduce(monkeypatch, k, flops_below):
    """`models/shapes-mtu-top{k}`: every task's fold drops the 4 - k zero-weight experts of each FFN and still equals
    the routed model at 1e-5; the committed trade-off table's row is what `benchmarks/sparse_tradeoff.py` computes
    from the committed eval JSON (FLOPs counted again, metric ratios against the committed parity.json)."""
    import importlib.util

    from mtu_export.fold import ffn_kept

    ckpt = load_checkpoint(MODELS / f"shapes-mtu-top{k}", dtype=torch.float32)
    assert ckpt.model.config.top_k == k and ckpt.meta["training"]["steps"] == 2000
    for task in TASKS:
        folded = fold_task(ckpt.model, task)
        assert ffn_kept(ckpt.model, folded) == k / 4
        verify_fold(ckpt.model, folded, task)
    spec = importlib.util.spec_from_file_location("sparse_tradeoff", RESULTS.parent / "sparse_tradeoff.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(MODELS.parent)  # the eval JSON names its checkpoint relative to the repository
    table = json.loads((RESULTS / "sparse" / "tradeoff.json").read_text())
    committed = next(r for r in table["rows"] if r["eval"].endswith(f"top{k}.json"))
    parity = json.loads((RESULTS / "parity" / "parity.json").read_text())
    again = script.row(Path(f"benchmarks/results/sparse/eval/top{k}.json"), parity)
    for task in TASKS:
        assert again["tasks"][task] == committed["tasks"][task]  # JSON keeps floats exactly
        assert again["tasks"][task]["flops_ratio"] < flops_below


@pytest.mark.parametrize("k", [1, 2])
def test_topk_model_cards_quote_the_tradeoff_table(k):
    """Each top-k card quotes its own row and the dense model's cuts; the top-1 card the top-2 row too."""
    card = (MODELS / f"shapes-mtu-top{k}" / "README.md").read_text()
    table = json.loads((RESULTS / "sparse" / "tradeoff.json").read_text())
    other = f"top{3 - k}.json"
    for row in table["rows"]:
        if k == 2 and row["eval"].endswith(other):
            continue
        for task, entry in row["tasks"].items():
            assert f"{entry['ratio']:.3f}" in card, (row["setting"], task)
