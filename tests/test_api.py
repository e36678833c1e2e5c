"""The Python API behaves as the CLI does: every default and check `mtu-export` applies is the config's or the
library function's own, so a Python caller gets the same run and the same one-line refusal (same message)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_clean_failure, invoke

from mtu_export.config import CoreMLConfig, DataSpec, OnnxConfig, TrainConfig, parse_task_weights
from mtu_export.errors import ConfigError, MtuError
from mtu_export.export.coreml import export_coreml
from mtu_export.export.onnx import export_onnx
from mtu_export.shapes.tiny import tiny_unet
from mtu_export.storage import write_json
from mtu_export.train import prepare_model, train

torch.set_num_threads(1)  # tiny models: one thread is many times faster than two on a loaded machine


def cli_error(*args) -> str:
    """The message of the one `error:` line a refused command prints (exit 3, as every ConfigError)."""
    result = invoke(*args)
    assert_clean_failure(result, "", ConfigError.exit_code)
    return result.stderr.strip().removeprefix("error: ")


def api_error(call) -> str:
    with pytest.raises(MtuError) as refused:
        call()
    assert isinstance(refused.value, ConfigError)
    return str(refused.value)


# ------------------------------------------------------------------------------------------------------- training
def test_a_single_task_config_fine_tunes_the_whole_unet_as_the_cli_does():
    assert TrainConfig().trainable == "mtu"
    assert TrainConfig(single_task="edit").trainable == "full"
    assert TrainConfig(single_task="edit", trainable="mtu").trainable == "mtu"  # an explicit choice is kept
    baseline = prepare_model(TrainConfig(single_task="edit"), tiny_unet())
    assert all(p.requires_grad for p in baseline.parameters())
    mtu = prepare_model(TrainConfig(), tiny_unet())
    assert 0 < sum(p.requires_grad for p in mtu.parameters()) < len(list(mtu.parameters()))


def test_the_cli_builds_the_config_a_python_caller_gets_by_default(tmp_path):
    """A run recorded from Python, resumed through the CLI with one option changed: the CLI lists every setting
    that differs from the recorded run, and finds only that one (the work folder is checked before the base is read;
    a base folder that is not there keeps the built-in tasks at their default channels)."""
    write_json(
        tmp_path / "w" / "train_config.json",
        TrainConfig(single_task="edit", steps=2, batch_size=8, cache_size=16).to_dict(),  # as `fit` records it
    )
    options = ["--single-task", "edit", "--steps", "2", "--batch-size", "8", "--cache-size", "16", "--lr", "0.5"]
    args = ("train", tmp_path / "base", "--out", tmp_path / "o", "--work", tmp_path / "w", "--resume", *options)
    assert f"other settings than the run in {tmp_path / 'w'} (lr); use the same options" in cli_error(*args)
    assert not (tmp_path / "o").exists()


def test_task_weights_by_name_are_checked_as_the_cli_checks_them(tmp_path):
    names = [t.name for t in TrainConfig().tasks]
    assert TrainConfig(task_weights={"edit": 2, "t2i": 1}).task_weights == (1.0, 2.0, 0.0, 0.0)
    assert parse_task_weights("edit=2,t2i=1", names) == (1.0, 2.0, 0.0, 0.0)
    cli = cli_error(
        "train", tmp_path / "base", "--out", tmp_path / "o", "--work", tmp_path / "w", "--task-weights", "edit=2,edt=1"
    )
    assert cli.startswith("--task-weights names 'edt', not a trained task — did you mean 'edit'?")
    assert api_error(lambda: TrainConfig(task_weights={"edit": 2, "edt": 1})) == cli
    assert api_error(lambda: parse_task_weights("edit=2,edt=1", names)) == cli
    assert "is not task=number" in api_error(lambda: parse_task_weights("edit=lots", names))


def test_train_refuses_an_output_over_its_data_before_any_work(tmp_path):
    data = tmp_path / "data"
    spec = DataSpec("edit", str(data / "edits.jsonl"))
    cli = cli_error("train", tmp_path / "base", "--out", data, "--work", tmp_path / "w", "--data", f"edit={spec.path}")
    assert "overlaps the input" in cli
    api = api_error(lambda: train(TrainConfig(data=(spec,)), tmp_path / "base", tmp_path / "w", data))
    assert api == cli
    assert not data.exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["work", "inside-work", "around-work"])
def test_train_refuses_an_output_over_its_own_work_folder(tmp_path, where):
    work = tmp_path / "runs" / "w"
    out = {"work": work, "inside-work": work / "out", "around-work": work.parent}[where]
    cli = cli_error("train", tmp_path / "base", "--out", out, "--work", work)
    assert f"overlaps the input {work.resolve()}" in cli
    assert api_error(lambda: train(TrainConfig(), tmp_path / "base", work, out)) == cli
    assert not work.exists()


# --------------------------------------------------------------------------------------------------------- export
def test_an_export_config_takes_one_task_or_all_as_the_cli_does(tmp_path):
    assert OnnxConfig(tasks="all").tasks == () and OnnxConfig(tasks="edit").tasks == ("edit",)
    cli = cli_error("onnx", tmp_path / "ckpt", "--out", tmp_path / "x", "--task", "t2i,edit")
    assert "--task takes one task or all" in cli
    assert api_error(lambda: OnnxConfig(tasks=("t2i", "edit"))) == cli
    assert api_error(lambda: OnnxConfig(tasks="t2i,edit")) == cli


def test_the_core_ml_target_follows_the_export_as_the_cli_chooses_it(tmp_path):
    assert CoreMLConfig().target == "iOS18"  # the multifunction UNet of all tasks needs it
    assert CoreMLConfig(tasks="t2i").target == "iOS17"
    assert CoreMLConfig(tasks="t2i", target="iOS18").target == "iOS18"
    assert CoreMLConfig(quantize="int4-block").quantize == "int4-block"  # iOS18 by default: accepted
    cli = cli_error("coreml", tmp_path / "ckpt", "--out", tmp_path / "x", "--task", "t2i", "--quantize", "int4-block")
    assert api_error(lambda: CoreMLConfig(tasks="t2i", quantize="int4-block")) == cli
    pytest.importorskip("coremltools")
    cli = cli_error("coreml", tmp_path / "ckpt", "--out", tmp_path / "x", "--target", "iOS17")
    assert "needs Core ML's iOS18 target" in cli
    assert api_error(lambda: export_coreml(tmp_path / "ckpt", CoreMLConfig(target="iOS17"), tmp_path / "x")) == cli
    with pytest.raises(MtuError) as refused:  # the default passes the target check and fails on the checkpoint
        export_coreml(tmp_path / "ckpt", CoreMLConfig(), tmp_path / "x")
    assert "iOS18" not in str(refused.value)


@pytest.mark.parametrize("command", ["onnx", "coreml"])
def test_exports_refuse_an_output_over_their_data(tmp_path, command):
    if command == "coreml":
        pytest.importorskip("coremltools")
    data = tmp_path / "data"
    spec = DataSpec("edit", str(data / "edits.jsonl"))
    cli = cli_error(command, tmp_path / "ckpt", "--out", data, "--task", "edit", "--data", f"edit={spec.path}")
    assert "overlaps the input" in cli
    export, kind = (export_onnx, OnnxConfig) if command == "onnx" else (export_coreml, CoreMLConfig)
    assert api_error(lambda: export(tmp_path / "ckpt", kind(tasks="edit"), data, data={"edit": spec})) == cli
    assert not data.exists()


# ------------------------------------------------------------------------------------------------ upcycle, bench
@pytest.mark.parametrize("factor", [4, 8])
def test_task_channels_follow_the_base_as_upcycle_chooses_them(tmp_path, factor):
    """sr's channels depend on the base's VAE factor (7: the x4 upscaler's convention; 8: a factor-8 VAE as in
    SD1.5); `data.model_tasks_for` is what the CLI uses, so a Python caller gets the same specs."""
    import json

    from mtu_export.data import model_tasks_for
    from mtu_export.shapes.tiny import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "base")
    vae_config = base / "vae" / "config.json"
    vae = json.loads(vae_config.read_text())
    blocks = {4: 3, 8: 4}[factor]  # downsampling factor 2 ** (blocks - 1)
    vae["block_out_channels"] = (vae["block_out_channels"] * 4)[:blocks]
    vae["down_block_types"] = (vae["down_block_types"] * 4)[:blocks]
    vae["up_block_types"] = (vae["up_block_types"] * 4)[:blocks]
    vae_config.write_text(json.dumps(vae))
    specs = {s.name: s.in_channels for s in model_tasks_for("t2i,edit,sr,inpaint", base)}
    assert specs == {"t2i": 4, "edit": 8, "sr": 7 if factor == 4 else 8, "inpaint": 9}
    invoke("upcycle", str(base), "--out", str(tmp_path / "mtu"))
    written = json.loads((tmp_path / "mtu" / "mtu_config.json").read_text())["moe"]["tasks"]
    assert {t["name"]: t["in_channels"] for t in written} == specs


def test_the_training_step_bench_refuses_what_the_cli_refuses():
    from mtu_export.bench.train_step import train_step_ratio

    message = api_error(lambda: train_step_ratio("no-such-base", batch_size=2))
    assert "--batch-size >= 4" in message
