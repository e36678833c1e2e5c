"""Learning curves: `train --eval-every` writes curve.jsonl (resumable, without touching the weights), the plateau
test, and `mtu-export curves`' report and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, invoke
from safetensors.torch import load_file

from mtu_export.checkpoint import CHECKPOINT_WEIGHTS
from mtu_export.config import TrainConfig
from mtu_export.curves import CURVE_FILE, PLATEAU_TOLERANCE, append_line, plateau, read_curve
from mtu_export.errors import ConfigError
from mtu_export.train import train

# Four steps, checkpoints every 2, an EMA (so evaluation sees the EMA weights and must put the training ones back).
TINY = dict(steps=4, batch_size=8, cache_size=16, checkpoint_every=2, warmup=1, lr=1e-3, ema_decay=0.9)
EVAL = dict(eval_every=2, eval_count=2, eval_steps=2)
TASKS = ("t2i", "edit", "sr", "inpaint")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(world_pipeline, tmp_path_factory) -> Path:
    """One run with evaluation, the same run without, and the first stopped at step 3 and resumed."""
    root = tmp_path_factory.mktemp("curves")
    torch.set_num_threads(1)
    train(TrainConfig(**TINY, **EVAL), world_pipeline, root / "w-eval", root / "eval")
    train(TrainConfig(**TINY), world_pipeline, root / "w-plain", root / "plain")
    assert train(TrainConfig(**TINY, **EVAL, stop_at=3), world_pipeline, root / "w-resumed", root / "resumed") is None
    assert [line["step"] for line in read_curve(root / "w-resumed")] == [2]  # step 3 is no multiple, not the last
    train(TrainConfig(**TINY, **EVAL), world_pipeline, root / "w-resumed", root / "resumed", resume=True)
    return root


def _without_seconds(lines: list[dict]) -> list[dict]:
    return [
        {"step": line["step"], "tasks": {t: e | {"seconds": 0} for t, e in line["tasks"].items()}} for line in lines
    ]


def test_training_with_eval_every_writes_a_line_per_evaluation(runs):
    lines = read_curve(runs / "w-eval")
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert set(line["tasks"]) == set(TASKS) and line["seconds"] >= 0
        edit, sr, t2i = line["tasks"]["edit"], line["tasks"]["sr"], line["tasks"]["t2i"]
        assert edit["primary"] == "psnr" and edit["value"] == edit["metrics"]["psnr"]
        assert edit["floor_metric"] == "source_psnr" and edit["floor"] == edit["metrics"]["source_psnr"]
        assert sr["floor_metric"] == "bicubic_psnr" and sr["floor"] == sr["metrics"]["bicubic_psnr"]
        assert t2i["primary"] == "reader_accuracy" and t2i["floor"] is None and 0 <= t2i["value"] <= 1
        assert line["tasks"]["inpaint"]["floor"] is None and "psnr_mask" in line["tasks"]["inpaint"]["metrics"]
    assert lines[0]["tasks"]["edit"]["value"] != lines[1]["tasks"]["edit"]["value"]  # it scored the moving weights


def test_evaluation_leaves_the_trained_weights_bit_identical(runs):
    plain = load_file(runs / "plain" / CHECKPOINT_WEIGHTS)
    for name in ("eval", "resumed"):
        got = load_file(runs / name / CHECKPOINT_WEIGHTS)
        assert got.keys() == plain.keys()
        assert all(torch.equal(got[k], plain[k]) for k in plain), name


def test_a_resumed_run_continues_the_curve_as_an_uninterrupted_one(runs):
    assert _without_seconds(read_curve(runs / "w-resumed")) == _without_seconds(read_curve(runs / "w-eval"))


def test_a_line_repeated_by_a_resume_counts_once_and_the_last_wins(tmp_path):
    for step, value in ((2, 1.0), (4, 2.0), (4, 3.0), (6, 4.0)):
        append_line(tmp_path, {"step": step, "tasks": {"sr": {"value": value}}})
    with (tmp_path / CURVE_FILE).open("a") as f:
        f.write('{"step": 8, "tas')  # torn by a kill: dropped on reading and before the next line
    assert [line["tasks"]["sr"]["value"] for line in read_curve(tmp_path)] == [1.0, 3.0, 4.0]
    append_line(tmp_path, {"step": 8, "tasks": {"sr": {"value": 5.0}}})
    assert [line["step"] for line in read_curve(tmp_path)] == [2, 4, 6, 8]


def test_plateau_test_on_synthetic_curves():
    steps = list(range(100, 2100, 100))
    flat = plateau([(s, 25.0) for s in steps])
    saturating = plateau([(s, 30 - 8 * 0.5 ** (s / 200)) for s in steps])
    rising = plateau([(s, 20 + s / 1000) for s in steps])
    assert flat["flat"] and saturating["flat"]
    assert not rising["flat"] and rising["change"] > PLATEAU_TOLERANCE * rising["range"]
    assert rising["window"] == [1500, 2000]  # the last quarter of 2000 steps
    assert plateau([(100, 1.0), (200, 1.0)]) == {"flat": False, "reason": "fewer than 3 evaluations"}


def test_curves_command_writes_json_markdown_and_plot(runs, tmp_path):
    from PIL import Image

    result = invoke("curves", f"mtu={runs / 'w-eval'}", f"again={runs / 'w-resumed'}", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "edit psnr: mtu " in result.output and "(fewer than 3 evaluations)" in result.output
    report = json.loads((tmp_path / "c" / "curves.json").read_text())
    assert set(report["tasks"]) == set(TASKS) and set(report["tasks"]["edit"]) == {"mtu", "again"}
    row = report["tasks"]["edit"]["mtu"]
    assert row["last"]["step"] == 4 and row["last"]["over_floor"] == pytest.approx(
        row["last"]["value"] - row["last"]["floor"]
    )
    assert row["plateau"] == {"flat": False, "reason": "fewer than 3 evaluations"}
    text = (tmp_path / "c" / "curves.md").read_text()
    assert "| edit | mtu | psnr | 4 |" in text and "last 25% of a run's steps" in text
    assert Image.open(tmp_path / "c" / "curves.png").size[0] > 4 * 300  # one panel per task
    again = invoke("curves", f"mtu={runs / 'w-eval'}", "--out", tmp_path / "c")
    assert_clean_failure(again, "already exists", 5)


def test_curves_command_refuses_bad_input_in_one_line(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / CURVE_FILE).write_text("")
    cases = [
        ([f"mtu={tmp_path}"], f"has no {CURVE_FILE}"),
        ([f"mtu={tmp_path / 'empty'}"], "holds no evaluations yet"),
        ([str(runs / "w-eval")], "is not NAME=WORKDIR"),
        ([f"a={runs / 'w-eval'}", f"a={runs / 'w-resumed'}"], "given twice"),
    ]
    for args, message in cases:
        assert_clean_failure(invoke("curves", *args, "--out", tmp_path / "out"), message)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(eval_every=-1), "--eval-every must be >= 0"),
        (dict(eval_every=10, eval_count=0), "--eval-count and --eval-steps >= 1"),
        (dict(eval_every=10, eval_first=150), "overlaps the held-out examples parity reports"),
    ],
    ids=["negative", "no examples", "parity's slice"],
)
def test_bad_eval_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_eval_every_with_data_is_refused_before_any_work(world_pipeline, tmp_path):
    args = ["train", world_pipeline, "--work", tmp_path / "w", "--out", tmp_path / "o", "--eval-every", "5"]
    result = invoke(*args, "--tasks", "t2i,edit", "--data", f"edit={tmp_path / 'missing'}")
    assert_clean_failure(result, "trains on all its rows", 3)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
