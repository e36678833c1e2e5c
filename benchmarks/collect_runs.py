"""Collect short training runs (a sweep or an ablation) into one JSON file and a Markdown table.

Each run folder holds the `train_config.json` and `train-log.jsonl` that `mtu-export train` writes into its work
folder (the run folder itself or its `work/`), and the `eval.json` of `mtu-export eval`. Per run the table shows what
the run changed, its wall time and each task's primary parity metric; where the collection holds exactly one
single-task baseline of a task at the same step count, also MTU ÷ single-task.

    python benchmarks/collect_runs.py runs/ablation/* --out benchmarks/results/sweeps/ablation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtu_export.parity import PARITY_GOAL, PRIMARY

KNOBS = ("steps", "batch_size", "lr", "input_lr_scale", "num_experts")  # copied as they are from train_config


def read_run(folder: Path) -> dict:
    work = folder / "work" if (folder / "work" / "train_config.json").is_file() else folder
    config = json.loads((work / "train_config.json").read_text())
    log = [json.loads(line) for line in (work / "train-log.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((folder / "eval.json").read_text())
    trainable = config["trainable"] or ("full" if config["single_task"] else "mtu")
    weights = config["task_weights"]
    names = [t["name"] for t in config["tasks"]]
    return {
        "name": folder.name,
        "single_task": config["single_task"],
        **{k: config[k] for k in KNOBS},
        "trainable": trainable,
        "task_weights": dict(zip(names, weights, strict=True)) if weights else None,
        "train_seconds": log[-1]["seconds"] if log else None,
        "eval": {"split": metrics["split"], "first": metrics.get("first"), "count": metrics["count"]},
        "metrics": metrics["tasks"],
    }


def add_ratios(runs: list[dict]) -> None:
    """MTU ÷ single-task on each task's primary metric, against the one baseline of that task at the same steps."""
    for run in runs:
        if run["single_task"]:
            continue
        run["ratios"] = {}
        for task, values in run["metrics"].items():
            key = PRIMARY[task]
            baselines = [r for r in runs if r["single_task"] == task and r["steps"] == run["steps"]]
            if len(baselines) == 1 and values.get(key) and baselines[0]["metrics"][task].get(key):
                run["ratios"][task] = values[key] / baselines[0]["metrics"][task][key]


def markdown(runs: list[dict]) -> str:
    tasks = [t for t in PRIMARY if any(t in r["metrics"] for r in runs)]
    head = ["run", "trains", "steps", "lr / conv_in ×", "N", "task weights", "min"]
    head += [f"{t} {PRIMARY[t]}" for t in tasks] + [f"{t} ÷ single" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 6 + " ---: |" * (1 + 2 * len(tasks))]
    for r in runs:
        weights = ", ".join(f"{k} {v:g}" for k, v in r["task_weights"].items()) if r["task_weights"] else "uniform"
        cells = [
            r["name"],
            r["single_task"] and f"{r['single_task']} (full)" or r["trainable"],
            str(r["steps"]),
            f"{r['lr']:g} / {r['input_lr_scale']:g}",
            "—" if r["single_task"] else str(r["num_experts"]),
            "—" if r["single_task"] else weights,
            f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "",
        ]
        cells += [_metric(r["metrics"].get(t, {}).get(PRIMARY[t]), t) for t in tasks]
        cells += [_ratio(r.get("ratios", {}).get(t)) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric(value: float | None, task: str) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if PRIMARY[task] == "reader_accuracy" else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"**{value:.3f}**" if value >= PARITY_GOAL else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with eval.json)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .md written)")
    args = parser.parse_args()
    finished = [p for p in args.runs if (p / "eval.json").is_file()]
    if not finished:
        parser.error("none of the given folders holds an eval.json; run the sweep first")
    runs = [read_run(p) for p in finished]
    add_ratios(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(runs))
    print(markdown(runs), end="")


if __name__ == "__main__":
    main()
