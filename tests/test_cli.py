"""The CLI end to end on tiny real pipelines, and every bad input: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from helpers import assert_clean_failure, invoke, perturb_
from PIL import Image

from mtu_export.errors import ConfigError, DriftError, MtuError

STEPS = 2
SIZE = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents


@pytest.fixture(scope="module")
def mtu_ckpt(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "mtu"
    result = invoke("upcycle", pipeline_dir, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_upcycle_pipeline_keeps_frozen_components(mtu_ckpt):
    assert {p.name for p in (mtu_ckpt / "pipeline").iterdir()} == {
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
    }


def _image(channels: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (SIZE, SIZE, 3) if channels == "RGB" else (SIZE, SIZE)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).convert(channels)


@pytest.mark.parametrize(
    ("task", "pipeline_class", "extra"),
    [
        ("t2i", StableDiffusionPipeline, lambda: {}),
        ("edit", StableDiffusionInstructPix2PixPipeline, lambda: {"image": _image()}),
        ("inpaint", StableDiffusionInpaintPipeline, lambda: {"image": _image(), "mask_image": _image("L")}),
    ],
)
def test_folded_pipeline_loads_and_generates_in_plain_diffusers(mtu_ckpt, tmp_path, task, pipeline_class, extra):
    out = tmp_path / task
    result = invoke("fold", mtu_ckpt, "--task", task, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline_class.__name__
    pipe = pipeline_class.from_pretrained(out)
    kwargs = dict(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0))
    if task in ("t2i", "inpaint"):
        kwargs.update(height=SIZE, width=SIZE)
    images = pipe("a red circle", **kwargs, **extra()).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_fold_of_a_unet_only_checkpoint_writes_a_unet_folder(unet_dir, tmp_path):
    assert invoke("upcycle", unet_dir, "--out", tmp_path / "ckpt", "--tasks", "t2i,sr", "--experts", "2").exit_code == 0
    result = invoke("fold", tmp_path / "ckpt", "--task", "sr", "--out", tmp_path / "sr")
    assert result.exit_code == 0, result.output
    assert UNet2DConditionModel.from_pretrained(tmp_path / "sr").config.in_channels == 7


def test_info_reports_tasks_parameters_and_routing(mtu_ckpt):
    result = invoke("info", mtu_ckpt)
    assert result.exit_code == 0, result.output
    # the tiny pipeline's VAE downsamples by 2, not 4: sr takes the latent convention's 8 channels
    for text in ("t2i (4 ch)", "edit (8 ch)", "sr (8 ch)", "inpaint (9 ch)", "trainable", "routing probabilities"):
        assert text in result.output
    summary = json.loads(invoke("info", mtu_ckpt, "--json").output)
    assert (
        summary["num_experts"] == 4 and summary["moe_layers"] == 7
    )  # 2 down + 4 up (1 + 1 extra per up block) + 1 mid
    for per_task in summary["routing"].values():  # untrained: uniform routing
        assert all(p == pytest.approx(0.25) for probs in per_task.values() for p in probs)


# --------------------------------------------------------------------------------------------------- bad inputs
def _corrupt(unet_dir: Path) -> Path:
    (unet_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return unet_dir


def _truncate(unet_dir: Path) -> Path:
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return unet_dir


def _no_unet(unet_dir: Path) -> Path:
    empty = unet_dir.parent / "not_a_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    return empty


def _pickle_only(unet_dir: Path) -> Path:
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    weights.rename(unet_dir / "diffusion_pytorch_model.bin")
    return unet_dir


BAD_UPCYCLE = {
    "missing folder": (lambda d: d.parent / "nope", [], "does not exist", 2),
    "folder without a unet": (_no_unet, [], "holds no diffusers UNet", 2),
    "corrupt safetensors": (_corrupt, [], "not a valid safetensors file", 4),
    "truncated safetensors": (_truncate, [], "truncated or corrupt", 4),
    "pickle weights only": (_pickle_only, [], "loads safetensors only", 2),
    "unknown task": (lambda d: d, ["--tasks", "t2i,inpait"], "did you mean 'inpaint'", 3),
    "experts not dividing d_ff": (lambda d: d, ["--experts", "3"], "does not divide the FFN hidden width", 3),
    "zero experts": (lambda d: d, ["--experts", "0"], "--experts must be a positive integer", 3),
}


@pytest.mark.parametrize("case", list(BAD_UPCYCLE))
def test_bad_upcycle_input_fails_cleanly(unet_dir, tmp_path, case):
    make_source, args, pattern, code = BAD_UPCYCLE[case]
    source = make_source(unet_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("upcycle", source, "--out", tmp_path / "out", *args)
    assert_clean_failure(result, pattern, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_existing_output_is_refused_then_replaced_with_overwrite(unet_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", tmp_path / "out"), "pass --overwrite", 5)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert invoke("upcycle", unet_dir, "--out", tmp_path / "out", "--overwrite").exit_code == 0
    assert (tmp_path / "out" / "mtu_config.json").is_file() and not (tmp_path / "out" / "mine.txt").exists()


def test_bad_fold_inputs_fail_cleanly(mtu_ckpt, pipeline_dir, tmp_path):
    assert_clean_failure(
        invoke("fold", mtu_ckpt, "--task", "inpait", "--out", tmp_path / "x"), "did you mean 'inpaint'", 3
    )
    assert_clean_failure(
        invoke("fold", pipeline_dir, "--task", "t2i", "--out", tmp_path / "x"), "not an MTU checkpoint"
    )
    assert_clean_failure(invoke("fold", tmp_path / "none", "--task", "t2i", "--out", tmp_path / "x"), "does not exist")
    (tmp_path / "taken").mkdir()
    assert_clean_failure(invoke("fold", mtu_ckpt, "--task", "t2i", "--out", tmp_path / "taken"), "--overwrite", 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_truncated_checkpoint_fails_cleanly(mtu_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mtu_ckpt, broken)
    _truncate_file(broken / "mtu_unet.safetensors")
    assert_clean_failure(invoke("info", broken), "truncated or corrupt", 4)


def _truncate_file(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # the copy may be a hard link to the fixture's file
    path.write_bytes(data[:-64])


def test_every_error_class_has_a_distinct_nonzero_exit_code():
    codes = [cls.exit_code for cls in MtuError.__subclasses__()]
    assert len(set(codes)) == len(codes) and all(code > 1 for code in codes)


def test_fold_leaves_the_checkpoint_untouched(mtu_ckpt, tmp_path):
    before = {p: p.read_bytes() for p in mtu_ckpt.rglob("*") if p.is_file()}
    assert invoke("fold", mtu_ckpt, "--task", "inpaint", "--out", tmp_path / "inpaint").exit_code == 0
    assert {p: p.read_bytes() for p in mtu_ckpt.rglob("*") if p.is_file()} == before


def test_output_overlapping_the_input_is_refused(unet_dir, mtu_ckpt):
    before = sorted(p.name for p in unet_dir.iterdir())
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", unet_dir, "--overwrite"), "overlaps the input", 3)
    assert_clean_failure(invoke("upcycle", unet_dir, "--out", unet_dir / "mtu"), "overlaps the input", 3)
    assert sorted(p.name for p in unet_dir.iterdir()) == before
    assert_clean_failure(
        invoke("fold", mtu_ckpt, "--task", "t2i", "--out", mtu_ckpt, "--overwrite"), "overlaps the input", 3
    )
    assert (mtu_ckpt / "mtu_config.json").is_file()


def test_upcycle_copies_only_the_pipeline_components(pipeline_dir, tmp_path):
    source = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, source)
    (source / "v1-5-pruned.ckpt").write_bytes(b"a big pickle a user keeps beside the folders")
    (source / "notes").mkdir()
    result = invoke("upcycle", source, "--out", tmp_path / "mtu")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "mtu" / "pipeline").iterdir()} == {
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "vae",
    }


# ------------------------------------------------------------------------------------------------- usage errors
USAGE_ERRORS = {  # typer/click's own parse errors -> what the one `error:` line names
    "unknown option": (["fold", "ckpt", "--task", "t2i", "--out", "o", "--bogus"], "no such option: --bogus"),
    "missing argument": (["fold", "--task", "t2i", "--out", "o"], "missing argument 'checkpoint'"),
    "missing option": (["fold", "ckpt", "--out", "o"], "missing option '--task'"),
    "option without its value": (["fold", "ckpt", "--task"], "option '--task' requires an argument"),
    "not an integer": (["upcycle", "src", "--out", "o", "--experts", "four"], "invalid value for '--experts'"),
    "below the minimum": (["world", "--out", "g.png", "--count", "0"], "invalid value for '--count'"),
    "unknown command": (["flod", "ckpt"], "no such command 'flod'"),
}


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_are_one_line_and_exit_3(args, message):
    result = invoke(*args)
    assert_clean_failure(result, message, ConfigError.exit_code)
    assert "--help" in result.stderr and "╭" not in result.output and result.stdout == ""


def test_usage_errors_and_help_behave_the_same_from_the_console_entry_point():
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mtu_export.cli", *args]  # as `accelerate launch` runs it
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    bad = run("fold", "ckpt", "--task", "t2i", "--out", "o", "--bogus")
    assert bad.returncode == ConfigError.exit_code, bad.stderr
    expected = "error: no such option: --bogus (Possible options: --out); see `mtu-export fold --help`"
    assert bad.stderr.splitlines() == [expected] and bad.stdout == "", bad.stderr
    helped = run("fold", "--help")
    assert helped.returncode == 0 and "--task" in helped.stdout, helped.stderr
    assert invoke("--help").exit_code == 0 and invoke("fold", "--help").exit_code == 0


# ----------------------------------------------------------------------------------------------- fp16 checkpoints
FOLD_ATOL = 1e-5  # the README's fold check, relative to max(1, |routed|): it must hold for fp16 checkpoints too


@pytest.fixture(scope="module")
def fp16_ckpt(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:

    from mtu_export.checkpoint import save_checkpoint
    from mtu_export.config import MoEConfig
    from mtu_export.upcycle import load_unet, upcycle_unet

    root = tmp_path_factory.mktemp("fp16")
    shutil.copytree(pipeline_dir, root / "base")
    trained = perturb_(upcycle_unet(load_unet(pipeline_dir), MoEConfig()), scale=0.1)
    save_checkpoint(trained, root / "run", pipeline_dir=root / "base")
    result = invoke("pack", root / "run", "--out", root / "mtu", "--pipeline-ref", "../base", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    return root / "mtu"


def test_an_fp16_checkpoint_is_folded_and_verified_in_fp32_and_saved_in_fp16(fp16_ckpt, tmp_path):
    from mtu_export.fold import fold_checkpoint
    from mtu_export.storage import unet_weights, weights_dtype

    result = fold_checkpoint(fp16_ckpt, "edit", tmp_path / "edit")
    assert result.max_abs_diff <= FOLD_ATOL  # the fp16 check allowed 1e-2
    assert weights_dtype(unet_weights(tmp_path / "edit" / "unet")) == "F16"
    assert json.loads((tmp_path / "edit" / "unet" / "mtu_fold.json").read_text())["fold_max_abs_diff"] <= FOLD_ATOL


def test_the_fp16_fold_check_catches_an_error_the_fp16_tolerance_let_through(fp16_ckpt, tmp_path, monkeypatch):
    from mtu_export import fold

    def off_by_a_little(mtu, task, sparse=None):  # 0.1 % on every FFN output projection: under fp16's 1e-2
        folded = fold_task(mtu, task, sparse)
        with torch.no_grad():
            for name, module in folded.named_modules():
                if name.endswith("ff.net.2"):
                    module.weight.mul_(1.001)
        return folded

    fold_task = fold.fold_task
    monkeypatch.setattr(fold, "fold_task", off_by_a_little)
    result = invoke("fold", fp16_ckpt, "--task", "edit", "--out", tmp_path / "edit")
    assert_clean_failure(result, "folded task 'edit' differs from the routed model", DriftError.exit_code)
    assert not (tmp_path / "edit").exists()


def test_progress_lines_are_logged_to_stderr_and_stdout_keeps_results_only(capsys):
    """The package logs through `logging`; a command shows the lines on stderr (plain when stderr is not a
    terminal, as under a pipe or nohup), warnings prefixed, and a second command does not show them twice."""
    from mtu_export import display

    display.show_logs()
    display.show_logs()
    logging.getLogger("mtu_export.export.prepare").info("folded edit")
    logging.getLogger("mtu_export.export.skeleton").warning("drift kept (--allow-drift)")
    logging.getLogger("mtu_export.evaluate").debug("not shown")
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["folded edit", "warning: drift kept (--allow-drift)"]
