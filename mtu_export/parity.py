"""The parity report of the paper's central claim: one MTU model against single-task baselines, task by task, on
the same split, sampler and seeds. Writes JSON, a Markdown table and a PNG grid per task
(input | MTU | single-task | ground truth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtu_export.errors import ConfigError
from mtu_export.evaluate import EvalConfig, evaluate_checkpoint, task_input
from mtu_export.shapes.world_grid import write_images
from mtu_export.storage import atomic_output, write_json
from mtu_export.tasks import BUILTIN, declared

PARITY_GOAL = 0.98


def parity(mtu: dict[str, dict], baselines: dict[str, dict]) -> dict[str, dict]:
    """Per task: every metric both runs report, as MTU, single-task and MTU ÷ single-task."""
    table = {}
    for task, single in baselines.items():
        if task not in mtu:
            raise ConfigError(f"the MTU checkpoint has no task {task!r} to compare with its baseline")
        rows = {
            k: {"mtu": mtu[task][k], "single": v, "ratio": mtu[task][k] / v}
            for k, v in single.items()
            if v and mtu[task].get(k) is not None and not k.endswith("_identical")  # counts are not ratios
        }
        primary = BUILTIN.get(task, declared(task)).primary  # t2i: the scene reader; image tasks: PSNR to truth
        if primary not in rows:
            raise ConfigError(f"{task}: its primary metric {primary!r} was not measured on this data")
        table[task] = {"primary": primary, "metrics": rows}
    return table


def markdown(table: dict[str, dict], config: EvalConfig) -> str:
    sampler = config.sampler
    lines = [
        f"Parity on `{config.split}` ({config.count} examples per task, {sampler.steps} steps, seed {sampler.seed}); "
        f"goal: MTU ÷ single-task ≥ {PARITY_GOAL} on the primary metric.",
        "",
        "| task | metric | MTU | single-task | MTU ÷ single | goal met |",
        "| --- | --- | ---: | ---: | ---: | :---: |",
    ]
    for task, entry in table.items():
        for metric, row in entry["metrics"].items():
            primary = metric == entry["primary"]
            met = ("yes" if row["ratio"] >= PARITY_GOAL else "**no**") if primary else ""
            name = f"**{metric}**" if primary else metric
            lines.append(f"| {task} | {name} | {row['mtu']:.4f} | {row['single']:.4f} | {row['ratio']:.4f} | {met} |")
    return "\n".join(lines) + "\n"


def routing_summary(mtu_path: Path) -> dict[str, dict]:
    """What the routers learned, per task: mean weight of each expert over layers, the mean top-expert probability
    and the normalised entropy (1 = uniform routing, 0 = one expert per layer)."""
    import torch

    from mtu_export.checkpoint import load_checkpoint

    model = load_checkpoint(Path(mtu_path), dtype=torch.float32).model
    summary = {}
    for task in model.config.task_names:
        probs = torch.stack(list(model.routing_probabilities(task).values()))  # (layers, N)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / np.log(probs.shape[-1])
        summary[task] = {
            "mean_per_expert": [round(float(v), 4) for v in probs.mean(0)],
            "mean_top_probability": round(float(probs.max(-1).values.mean()), 4),
            "max_top_probability": round(float(probs.max()), 4),
            "normalised_entropy": round(float(entropy.mean()), 4),
            "layers": probs.shape[0],
        }
    return summary


def routing_markdown(summary: dict[str, dict]) -> str:
    lines = [
        "",
        "Router weights learned per task (softmax over experts, averaged over the MoE layers; 1/N each at start):",
        "",
        "| task | mean weight per expert | mean top-expert prob. | largest prob. | normalised entropy |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for task, row in summary.items():
        experts = " / ".join(f"{v:.3f}" for v in row["mean_per_expert"])
        lines.append(
            f"| {task} | {experts} | {row['mean_top_probability']:.3f} | {row['max_top_probability']:.3f} | "
            f"{row['normalised_entropy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    mtu_path: Path,
    baselines: dict[str, Path],
    config: EvalConfig,
    out: Path,
    overwrite: bool = False,
    data: dict | None = None,
) -> dict:
    """Evaluate the MTU checkpoint on the baselines' tasks and each baseline on its own (each task on its `--data`
    dataset when given, else the shapes world); write the report to `out`."""
    data = data or {}
    tasks = tuple(baselines)
    extra = sorted(set(data) - set(tasks))
    if extra:
        raise ConfigError(f"--data names task(s) {', '.join(extra)} without a --baseline; add one or drop the data")
    reads = [mtu_path, *baselines.values(), *(spec.path for spec in data.values())]
    with atomic_output(Path(out), reads, overwrite) as tmp:  # refused before any sampling
        report = _measure(mtu_path, baselines, config, data, tmp)
    return report


def _measure(mtu_path: Path, baselines: dict[str, Path], config: EvalConfig, data: dict, tmp: Path) -> dict:
    """write_report's evaluations, and its files written into the temporary folder `tmp` that becomes `out`."""
    tasks = tuple(baselines)
    mtu_results, mtu_images, examples = evaluate_checkpoint(mtu_path, config, tasks, data=data)
    single_results, single_images = {}, {}
    for task, path in baselines.items():
        results, images, _ = evaluate_checkpoint(
            path, config, (task,), data={task: data[task]} if task in data else None
        )
        single_results[task], single_images[task] = results[task], images[task]
    table = parity(mtu_results, single_results)
    report = {"mtu": str(mtu_path), "baselines": {t: str(p) for t, p in baselines.items()}, "parity": table}
    sampler = config.sampler
    report["config"] = {"split": config.split, "count": config.count, "steps": sampler.steps, "seed": sampler.seed}
    report["data"] = {task: spec.path for task, spec in data.items()}
    report["routing"] = routing_summary(mtu_path)
    write_json(tmp / "parity.json", report)
    (tmp / "parity.md").write_text(markdown(table, config) + routing_markdown(report["routing"]))
    for task in tasks:
        rows = []
        for i in range(min(8, config.count)):
            example = examples[task][i]
            rows += [task_input(example), mtu_images[task][i], single_images[task][i], example.target]
        write_images(tmp / f"grid-{task}.png", rows, columns=4)
    return report
