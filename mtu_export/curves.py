"""Learning curves: the `curve.jsonl` a training run with `eval_every` appends to, its reading (a step repeated by
a resume counts once, the last line wins), the plateau test, and `mtu-export curves`' report (curves.json,
curves.md, curves.png: each task's runs side by side, with the task's do-nothing floor dashed).

One curve line per evaluation: `{"step", "seconds", "tasks": {task: {"primary", "value", "floor_metric", "floor",
"metrics", "seconds"}}}`, where `value` is the task's primary metric (tasks.py), `floor` the same metric of its
do-nothing output (the source for edit, bicubic for sr; null for tasks without one) and `metrics` every metric
evaluate.py reports.

The plateau rule: a curve is flat when its primary metric changed by at most `PLATEAU_TOLERANCE` of the curve's own
range (its largest minus its smallest value) between the first evaluation in the last `PLATEAU_WINDOW` of its steps
and the last evaluation; it needs at least `PLATEAU_MIN_POINTS` evaluations, two of them in that window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mtu_export.errors import ConfigError, InputError
from mtu_export.storage import atomic_output, write_json
from mtu_export.tasks import TaskDef

CURVE_FILE = "curve.jsonl"
PLATEAU_WINDOW = 0.25  # the last quarter of a run's steps
PLATEAU_TOLERANCE = 0.1  # flat: the window's change is at most 10 % of the curve's range
PLATEAU_MIN_POINTS = 3


# ------------------------------------------------------------------------------------------------ the curve file
def floor_metric(task: TaskDef) -> str | None:
    """The metric of the task's do-nothing output that its primary metric is compared with (evaluate.example_metrics
    names it `<floor>_<metric>`), or None for a task without a floor."""
    return f"{task.floor}_{task.primary}" if task.floor else None


def curve_point(task: TaskDef, metrics: dict[str, float], seconds: float) -> dict:
    """One task's entry of a curve line, from evaluate.summarise's metrics."""
    floor = floor_metric(task)
    value = metrics.get(task.primary)
    return {
        "primary": task.primary,
        "value": value,
        "floor_metric": floor,
        "floor": metrics.get(floor) if floor else None,
        "metrics": metrics,
        "seconds": round(seconds, 2),
    }


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def summary(line: dict) -> str:
    """A curve line in one line of text: `step 250: edit psnr 24.1 (floor 21.3), ...`."""
    parts = []
    for task, e in line["tasks"].items():
        floor = f" (floor {_shown(e['floor'])})" if e.get("floor") is not None else ""
        parts.append(f"{task} {e['primary']} {_shown(e['value'])}{floor}")
    return f"step {line['step']}: " + ", ".join(parts)


def append_line(workdir: Path, line: dict) -> None:
    """Append one evaluation to `workdir/curve.jsonl`; a last line torn by a killed run is dropped first."""
    path = Path(workdir) / CURVE_FILE
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1])
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


def read_curve(workdir: Path) -> list[dict]:
    """The evaluations in `workdir/curve.jsonl` by step, one per step (the last line written for it: a resumed run
    repeats the evaluations between its last checkpoint and where it was stopped)."""
    path = Path(workdir) / CURVE_FILE
    if not path.is_file():
        raise InputError(f"{workdir} has no {CURVE_FILE}; train with --eval-every N (in that --work folder) first")
    by_step: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            by_step[int(line["step"])] = line
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # torn by a killed run; the next evaluation replaces it
                continue
            raise InputError(f"{path} line {number} is not a curve line ({text[:60]!r}); delete that line") from None
    if not by_step:
        raise InputError(f"{path} holds no evaluations yet; train past the first --eval-every step")
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------------------------------------------- plateau
def plateau(points: list[tuple[int, float]]) -> dict:
    """The plateau test (module docstring) on (step, value) points in step order."""
    finite = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    if len(finite) < PLATEAU_MIN_POINTS:
        return {"flat": False, "reason": f"fewer than {PLATEAU_MIN_POINTS} evaluations"}
    last_step = finite[-1][0]
    window = [(s, v) for s, v in finite if s >= (1 - PLATEAU_WINDOW) * last_step]
    if len(window) < 2:
        return {"flat": False, "reason": "fewer than 2 evaluations in the last quarter of the steps"}
    values = [v for _, v in finite]
    scale = max(values) - min(values)
    change = window[-1][1] - window[0][1]
    tolerance = PLATEAU_TOLERANCE * scale
    return {
        "flat": abs(change) <= tolerance,
        "window": [window[0][0], last_step],
        "change": change,
        "range": scale,
        "tolerance": tolerance,
    }


# -------------------------------------------------------------------------------------------------------- report
def parse_runs(items: list[str]) -> dict[str, Path]:
    """`NAME=WORKDIR` items -> {name: work folder}, in order; names unique."""
    runs: dict[str, Path] = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path:
            raise ConfigError(f"{item!r} is not NAME=WORKDIR, as in 'mtu=runs/mtu/work/mtu'")
        if name in runs:
            raise ConfigError(f"run name {name!r} is given twice; give each run its own name")
        runs[name] = Path(path)
    if not runs:
        raise ConfigError("give at least one run, as in 'mtu=runs/mtu/work/mtu'")
    return runs


def curve_tables(runs: dict[str, Path]) -> dict:
    """Per task, per run: steps, primary values, floors, the last evaluation and the plateau test."""
    tasks: dict[str, dict] = {}
    for name, workdir in runs.items():
        for line in read_curve(workdir):
            for task, entry in line["tasks"].items():
                row = tasks.setdefault(task, {}).setdefault(name, {"primary": entry["primary"], "points": []})
                row["points"].append([line["step"], entry["value"], entry["floor"]])
    for rows in tasks.values():
        for row in rows.values():
            step, value, floor = row["points"][-1]
            row["last"] = {"step": step, "value": value, "floor": floor}
            row["last"]["over_floor"] = value - floor if value is not None and floor is not None else None
            row["plateau"] = plateau([(s, v) for s, v, _ in row["points"]])
    return tasks


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def markdown(tasks: dict) -> str:
    lines = [
        "Learning curves: each task's primary metric on a fixed held-out slice during training, and the same metric "
        "of its do-nothing output (floor).",
        f"Flat: the change over the last {PLATEAU_WINDOW:.0%} of a run's steps is at most {PLATEAU_TOLERANCE:.0%} "
        "of the curve's range.",
        "",
        "| task | run | metric | last step | value | floor | over floor | last-quarter change | tolerance | flat |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for task, rows in tasks.items():
        for name, row in rows.items():
            last, test = row["last"], row["plateau"]
            flat = ("yes" if test["flat"] else "no") if "reason" not in test else test["reason"]
            lines.append(
                f"| {task} | {name} | {row['primary']} | {last['step']} | {_number(last['value'])} | "
                f"{_number(last['floor'])} | {_number(last['over_floor'])} | {_number(test.get('change'))} | "
                f"{_number(test.get('tolerance'))} | {flat} |"
            )
    for task, rows in tasks.items():
        names = list(rows)
        values = {n: {s: v for s, v, _ in rows[n]["points"]} for n in names}
        lines += ["", f"{task} ({next(iter(rows.values()))['primary']}):", ""]
        lines += ["| step | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for step in sorted({s for n in names for s in values[n]}):
            lines.append(f"| {step} | " + " | ".join(_number(values[n].get(step)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_plot(tasks: dict, path: Path) -> None:
    """One panel per task: each run's primary metric against steps, its floor dashed in the run's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tasks.items(), strict=True):
        for i, (name, row) in enumerate(rows.items()):
            steps = [s for s, _, _ in row["points"]]
            colour = f"C{i}"
            values = [math.nan if v is None else v for _, v, _ in row["points"]]
            ax.plot(steps, values, marker="o", markersize=3, color=colour, label=name)
            floors = [f for _, _, f in row["points"]]
            if all(f is not None for f in floors):
                ax.plot(steps, floors, linestyle="--", color=colour, alpha=0.7, label=f"{name} floor")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(next(iter(rows.values()))["primary"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_curves(runs: dict[str, Path], out: Path, overwrite: bool = False) -> dict:
    """Read every run's curve, then write curves.json, curves.md and curves.png to `out` (atomically)."""
    with atomic_output(Path(out), [Path(p) / CURVE_FILE for p in runs.values()], overwrite) as tmp:
        tasks = curve_tables(runs)  # refuses a run without curve lines before anything is written
        rule = {"window": PLATEAU_WINDOW, "tolerance": PLATEAU_TOLERANCE, "min_points": PLATEAU_MIN_POINTS}
        report = {"runs": {n: str(p) for n, p in runs.items()}, "plateau_rule": rule, "tasks": tasks}
        write_json(tmp / "curves.json", report)
        (tmp / "curves.md").write_text(markdown(tasks))
        write_plot(tasks, tmp / "curves.png")
    return report


def report_lines(report: dict) -> list[str]:
    """Per task, each run's last value, its step and whether its curve is flat, for a terminal."""
    lines = []
    for task, rows in report["tasks"].items():
        runs = []
        for name, row in rows.items():
            test = row["plateau"]
            flat = test.get("reason") or ("flat" if test["flat"] else "not flat")
            runs.append(f"{name} {_shown(row['last']['value'])} at step {row['last']['step']} ({flat})")
        lines.append(f"{task} {next(iter(rows.values()))['primary']}: " + "; ".join(runs))
    return lines
