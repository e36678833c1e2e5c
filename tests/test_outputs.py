"""No command replaces an input or an earlier result silently (issue 18): an output overlapping anything a command
reads (a checkpoint's shared base pipeline, baselines, --data, generate's --image) is refused even with --overwrite;
an existing output file is refused unless --overwrite; `generate` writes the format its suffix names and says when
it resized an input. Every refusal comes before any work and leaves the files as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_failure, invoke
from PIL import Image

from mtu_export.errors import ConfigError, InputError, OutputExistsError

BENCH_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench.json"
STEPS = "2"


@pytest.fixture(scope="module")
def models(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base (a pipeline), models/run (a checkpoint with its own pipeline copy) and models/mtu (packed,
    sharing ../base as the shipped models share models/shapes-base)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(pipeline_dir, root / "base")
    assert invoke("upcycle", root / "base", "--out", root / "run").exit_code == 0
    result = invoke("pack", root / "run", "--out", root / "mtu", "--pipeline-ref", "../base")
    assert result.exit_code == 0, result.output
    return root


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_command_writes_over_the_base_pipeline_a_checkpoint_shares(models, tmp_path):
    base, mtu = models / "base", models / "mtu"
    before = _snapshot(base)
    commands = {
        "fold": ("fold", mtu, "--task", "t2i", "--out", base),
        "fold into a component": ("fold", mtu, "--task", "t2i", "--out", base / "unet"),
        "onnx": ("onnx", mtu, "--task", "t2i", "--out", base),
        "coreml": ("coreml", mtu, "--task", "t2i", "--out", base),
        "pack": ("pack", mtu, "--out", base, "--pipeline-ref", "../base"),
        "pack onto its own reference": ("pack", models / "run", "--out", base, "--pipeline-ref", "."),
        "parity": ("parity", models / "run", "--baseline", f"t2i={mtu}", "--out", base),
        "train": ("train", base, "--out", base / "unet", "--work", tmp_path / "work"),
        "bench": ("bench", models / "run", "--base", base, "--out", base / "unet"),
        "bench-train": ("bench-train", base, "--out", base / "unet" / "train_step.json"),
        "eval": ("eval", mtu, "--json", base / "model_index.json"),
    }
    for name, args in commands.items():
        result = invoke(*args, "--overwrite")
        assert_clean_failure(result, "overlaps the input", ConfigError.exit_code)
        assert str(base.resolve()) in result.stderr, name
    assert _snapshot(base) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_overlapping_a_dataset_or_a_baseline_is_refused(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "edits.jsonl").write_text("{}\n")
    for args in (
        ("onnx", models / "run", "--out", data, "--data", f"edit={data / 'edits.jsonl'}"),
        ("eval", models / "run", "--json", data / "edits.jsonl", "--data", f"edit={data / 'edits.jsonl'}"),
        ("train", models / "base", "--out", data, "--work", tmp_path / "work", "--data", f"edit={data}"),
        ("parity", models / "run", "--baseline", f"t2i={models / 'mtu'}", "--out", models / "mtu"),
    ):
        assert_clean_failure(invoke(*args, "--overwrite"), "overlaps the input", ConfigError.exit_code)
    assert (data / "edits.jsonl").read_text() == "{}\n"
    assert (models / "mtu" / "mtu_config.json").is_file()


def test_generate_checks_its_output_before_any_work(tmp_path):
    export = tmp_path / "export"  # only its manifest is read before the output is refused
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    image = tmp_path / "source.png"
    Image.new("RGB", (8, 8), "red").save(image)
    original = image.read_bytes()
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"an earlier result")
    (tmp_path / "folder").mkdir()
    args = ("generate", export, "--task", "edit", "--prompt", "x", "--image", image)
    assert_clean_failure(invoke(*args, "--out", taken), "already exists", OutputExistsError.exit_code)
    assert_clean_failure(invoke(*args, "--out", image, "--overwrite"), "overlaps the input", ConfigError.exit_code)
    assert_clean_failure(invoke(*args, "--out", tmp_path / "folder"), "is a folder", InputError.exit_code)
    assert_clean_failure(invoke(*args, "--out", tmp_path / "o.gif"), "ending in .png, .jpg", ConfigError.exit_code)
    assert taken.read_bytes() == b"an earlier result" and image.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "folder", "source.png", "taken.png"]


@pytest.fixture(scope="module")
def edit_export(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "edit"
    result = invoke("onnx", models / "run", "--task", "edit", "--out", out, "--image-count", "0")
    assert result.exit_code == 0, result.output
    return out


def test_generate_writes_the_format_its_suffix_names_and_notes_a_resize(edit_export, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(source)
    args = ("generate", edit_export, "--task", "edit", "--prompt", "make it blue", "--image", source, "--steps", STEPS)
    for name, kind in (("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")):
        result = invoke(*args, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as written:
            assert written.format == kind, name
        notes = [line for line in result.stderr.splitlines() if line.strip()]
        assert notes == [f"note: {source} resized from 30x20 to 32x20 (fit: nearest valid size, aspect kept)"]
    first = (tmp_path / "a.png").read_bytes()
    assert_clean_failure(invoke(*args, "--out", tmp_path / "a.png"), "already exists", OutputExistsError.exit_code)
    assert (tmp_path / "a.png").read_bytes() == first
    again = invoke(*args, "--out", tmp_path / "a.png", "--overwrite")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a.png").read_bytes() == first  # same seed, same image
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_eval_refuses_existing_results_before_sampling_and_replaces_them_with_overwrite(models, tmp_path):
    taken = tmp_path / "results.json"
    taken.write_text("{}")
    args = ("eval", models / "run", "--task", "t2i", "--count", "1", "--steps", "1", "--json", taken)
    result = invoke(*args, "--grid", tmp_path / "grid.png")
    assert_clean_failure(result, "results.json already exists", OutputExistsError.exit_code)
    assert result.stdout == "" and taken.read_text() == "{}" and not (tmp_path / "grid.png").exists()
    bad_grid = invoke(*args, "--grid", tmp_path / "grid.jpg", "--overwrite")
    assert_clean_failure(bad_grid, "--grid must name a .png file", ConfigError.exit_code)
    result = invoke(*args, "--grid", tmp_path / "grid.png", "--overwrite")
    assert result.exit_code == 0, result.output
    assert '"t2i"' in taken.read_text() and (tmp_path / "grid.png").is_file()
    into_base = models / "base" / "eval" / "a.json"  # a pipeline's eval/ folder is not something eval reads
    result = invoke("eval", models / "mtu", "--task", "t2i", "--count", "1", "--steps", "1", "--json", into_base)
    assert result.exit_code == 0, result.output


def test_bench_and_bench_train_refuse_existing_results_before_measuring(models, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "bench.md").write_text("an earlier report")
    result = invoke("bench", models / "run", "--base", models / "base", "--out", report)
    assert_clean_failure(result, "bench.md already exists", OutputExistsError.exit_code)
    assert result.stdout == "" and sorted(p.name for p in report.iterdir()) == ["bench.md"]
    step = tmp_path / "train_step.json"
    step.write_text("{}")
    result = invoke("bench-train", models / "base", "--out", step)
    assert_clean_failure(result, "train_step.json already exists", OutputExistsError.exit_code)
    assert step.read_text() == "{}"
    saved = tmp_path / "baseline.json"
    saved.write_text("{}")
    result = invoke("bench", "--results", BENCH_JSON, "--save-baseline", saved)
    assert_clean_failure(result, "baseline.json already exists", OutputExistsError.exit_code)
    assert saved.read_text() == "{}"
    result = invoke("bench", "--results", BENCH_JSON, "--save-baseline", saved, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "format" in saved.read_text()
    assert_clean_failure(
        invoke("bench", "--results", BENCH_JSON, "--save-baseline", BENCH_JSON, "--overwrite"),
        "--save-baseline",
        ConfigError.exit_code,
    )
