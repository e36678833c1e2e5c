"""`mtu-export train` on a toy shapes-world pipeline: exact resume, the paper's trainable split, single-task
baselines, clean refusals, and DDP across two CPU processes (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_clean_failure, invoke
from safetensors.torch import load_file

from mtu_export.checkpoint import CHECKPOINT_WEIGHTS, load_checkpoint
from mtu_export.conditioning import tokenize
from mtu_export.config import TrainConfig
from mtu_export.loop import process_state
from mtu_export.objective import min_snr_weight
from mtu_export.tasks import BUILTIN
from mtu_export.train import (
    TaskLoss,
    build_caches,
    fit,
    load_base,
    make_batches,
    prepare_model,
    train,
    training_sources,
)
from mtu_export.upcycle import load_unet, upcycle_unet

TINY = dict(steps=4, batch_size=8, cache_size=16, checkpoint_every=2, warmup=1, lr=1e-3)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / CHECKPOINT_WEIGHTS)


def test_resume_matches_an_uninterrupted_run(world_pipeline, tmp_path):
    config = TrainConfig(**TINY)
    train(config, world_pipeline, tmp_path / "w1", tmp_path / "straight")
    assert train(TrainConfig(**TINY, stop_at=2), world_pipeline, tmp_path / "w2", tmp_path / "resumed") is None
    assert not (tmp_path / "resumed").exists()
    # as a killed run leaves it: a line logged after the last checkpoint (step 2), then a torn line
    log_file = tmp_path / "w2" / "train-log.jsonl"
    log_file.write_text('{"step": 2, "loss": 1.0}\n{"step": 3, "loss": 9.0}\n{"step": 4, "lo')
    train(config, world_pipeline, tmp_path / "w2", tmp_path / "resumed", resume=True)
    want, got = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) == 0.0
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["step"] for line in log] == [2, 4]  # the resumed steps are logged once, by the resumed run
    assert {"loss_t2i", "loss_edit", "loss_sr", "loss_inpaint"} <= log[-1].keys()


def test_only_the_paper_split_trains(world_pipeline, tmp_path):
    mtu, _ = fit(TrainConfig(**TINY), world_pipeline, tmp_path / "w")
    base = load_unet(world_pipeline).float().state_dict()
    trainable = {n for n, _ in mtu.trainable_parameters()}
    changed, frozen_changed = 0, []
    for name, value in mtu.state_dict().items():
        if name in trainable:
            continue
        key = name.removeprefix("unet.")
        if key in base and not torch.equal(base[key], value):
            frozen_changed.append(name)
    for name, param in mtu.trainable_parameters():
        changed += int(name.endswith("weight") and param.requires_grad)
    assert not frozen_changed
    assert changed > 0
    routed = mtu.routing_probabilities("edit")
    assert any(not torch.allclose(p, torch.full_like(p, 0.25)) for p in routed.values())  # routers moved


def test_input_lr_scale_gives_the_conv_ins_their_own_learning_rate(world_pipeline, tmp_path):
    # AdamW's first step moves every parameter with a gradient by exactly lr (sign of the gradient), so the largest
    # change per tensor shows the learning rate each one got.
    config = TrainConfig(**{**TINY, "steps": 1}, input_lr_scale=10.0)
    torch.manual_seed(config.seed)  # as fit() does before upcycling (router initialisation)
    before = upcycle_unet(load_unet(world_pipeline).float(), config.moe()).state_dict()
    mtu, _ = fit(config, world_pipeline, tmp_path / "w")
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in mtu.trainable_parameters()}
    conv_in = [v for n, v in moved.items() if ".conv_in." in n and n.endswith("weight")]
    others = [v for n, v in moved.items() if ".conv_in." not in n and n.endswith("weight") and v > 0]
    assert conv_in and others
    assert all(v == pytest.approx(10 * TINY["lr"], rel=1e-3) for v in conv_in)
    assert all(v == pytest.approx(TINY["lr"], rel=1e-3) for v in others)


def test_single_task_baseline_is_a_full_fine_tune_that_folds_into_its_pipeline(world_pipeline, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    config = TrainConfig(**TINY, single_task="edit", trainable="full")
    train(config, world_pipeline, tmp_path / "w", tmp_path / "edit")
    ckpt = load_checkpoint(tmp_path / "edit")
    assert ckpt.model.config.task_names == ("edit",) and ckpt.model.config.num_experts == 1
    base = load_unet(world_pipeline).float().state_dict()
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(ckpt.model.unet.state_dict()[attn], base[attn])  # attention trained too
    assert invoke("fold", tmp_path / "edit", "--task", "edit", "--out", tmp_path / "folded").exit_code == 0
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "folded", local_files_only=True)
    image = torch.zeros(1, 3, 64, 64)
    out = pipe("make the red circle blue", image=image, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_work_folder_of_an_earlier_run_needs_resume(world_pipeline, tmp_path, monkeypatch):
    args = ["train", world_pipeline, "--work", tmp_path / "w", "--steps", "2", "--batch-size", "8"]
    args += ["--cache-size", "16"]
    assert invoke(*args, "--out", tmp_path / "a").exit_code == 0
    assert_clean_failure(invoke(*args, "--out", tmp_path / "b"), "pass --resume to continue it", 3)
    assert_clean_failure(
        invoke(*args, "--out", tmp_path / "b", "--resume", "--lr", "0.5"), "other settings than the run", 3
    )
    # how the steps are computed may change (a resume on another machine), not what they compute; bf16 autocast on
    # a CPU without bf16 instructions is allowed but warned about
    monkeypatch.setattr("mtu_export.train._cpu_lacks_bf16", lambda: True)
    resumed = invoke(*args, "--out", tmp_path / "c", "--resume", "--mixed-precision", "bf16")
    assert resumed.exit_code == 0, resumed.output
    assert "warning: --mixed-precision bf16 on a CPU without bf16 instructions" in resumed.output
    assert json.loads((tmp_path / "w" / "train_config.json").read_text())["mixed_precision"] == "bf16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--single-task", "inpait"], "did you mean 'inpaint'"),
        (["--task-weights", "edit=2,sx=1"], "not a trained task"),
        (["--task-weights", "edit=lots"], "is not task=number"),
        (["--batch-size", "2"], "smaller than the number of tasks"),
        (["--input-lr-scale", "0"], "--input-lr-scale must be > 0"),
        (["--min-snr-gamma", "-1"], "--min-snr-gamma must be >= 0"),
    ],
    ids=["unknown baseline task", "unknown weight task", "bad weight", "tiny batch", "zero input lr scale", "gamma"],
)
def test_bad_train_options_fail_before_any_work(world_pipeline, tmp_path, extra, message):
    result = invoke("train", world_pipeline, "--work", tmp_path / "w", "--out", tmp_path / "o", *extra)
    assert_clean_failure(result, message, 3)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def _with_prediction_type(pipeline: Path, folder: Path, prediction_type: str) -> Path:
    shutil.copytree(pipeline, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), prediction_type=prediction_type)))
    return folder


def _first_batch(base: Path, work: Path) -> tuple[dict, object]:
    config = TrainConfig(**TINY, single_task="t2i", trainable="full")
    vae, text_encoder, tokenizer, _, scheduler = load_base(base)
    caches = build_caches(work, training_sources(config, base), vae, tokenizer, process_state())
    generator = torch.Generator().manual_seed(0)
    args = (text_encoder, tokenize(tokenizer, [""]), scheduler, vae.config.scaling_factor, generator)
    return make_batches(config, caches, *args, torch.device("cpu"))["t2i"], scheduler


def test_training_targets_follow_the_base_schedulers_prediction_type(world_pipeline, tmp_path):
    eps, eps_scheduler = _first_batch(world_pipeline, tmp_path / "e")
    v_base = _with_prediction_type(world_pipeline, tmp_path / "v-base", "v_prediction")
    v, v_scheduler = _first_batch(v_base, tmp_path / "v")
    assert eps_scheduler.config.prediction_type == "epsilon" and v_scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(eps["sample"], v["sample"]) and torch.equal(eps["timestep"], v["timestep"])
    alpha = eps_scheduler.alphas_cumprod[eps["timestep"]].sqrt()[:, None, None, None]
    sigma = (1 - alpha**2).sqrt()
    clean = (eps["sample"] - sigma * eps["target"]) / alpha  # the ε target is the noise that made `sample`
    torch.testing.assert_close(v["target"], alpha * eps["target"] - sigma * clean, rtol=1e-4, atol=1e-4)


def test_min_snr_gamma_zero_weighs_every_timestep_alike(world_pipeline, tmp_path):
    batch, scheduler = _first_batch(world_pipeline, tmp_path / "e")
    unet = load_base(world_pipeline)[3]
    model = prepare_model(TrainConfig(**TINY, single_task="t2i", trainable="full"), unet).eval()
    with torch.no_grad():
        pred = model(batch["sample"], batch["timestep"], batch["hidden"], task="t2i").sample
        per_row = (pred - batch["target"]).pow(2).mean(dim=(1, 2, 3))
        plain = TaskLoss(model, 0.0, scheduler)({"t2i": batch})[0]
        weighted = TaskLoss(model, 5.0, scheduler)({"t2i": batch})[0]
    weights = min_snr_weight(scheduler, batch["timestep"], 5.0, "epsilon")
    assert not torch.allclose(weights, torch.ones_like(weights))  # the batch's timesteps do get re-weighted
    torch.testing.assert_close(plain, per_row.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted, (per_row * weights).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("zero_terminal_snr", [False, True], ids=["sd", "zero-terminal-snr"])
def test_min_snr_weights_follow_their_definition_on_diffusers_snr(zero_terminal_snr):
    """The weights are min(SNR, γ) / SNR (ε), min(SNR, γ) / (SNR + 1) (v) and min(SNR, γ) (x0), with SNR(t) =
    ᾱ_t / (1 − ᾱ_t) from the scheduler (diffusers' compute_snr), finite at a zero-terminal-SNR schedule's last step."""
    from mtu_export.objective import NUM_TRAIN_TIMESTEPS, training_scheduler

    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    scheduler = training_scheduler(dict(schedule, rescale_betas_zero_snr=zero_terminal_snr))
    timesteps = torch.arange(NUM_TRAIN_TIMESTEPS)
    alphas = scheduler.alphas_cumprod.double()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr.clamp(min=1e-12), "v_prediction": clipped / (snr + 1), "sample": clipped}
    for kind, weight in expected.items():
        ours = min_snr_weight(scheduler, timesteps, 5.0, kind)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), weight, rtol=1e-4, atol=1e-6)


def test_an_identical_image_is_counted_not_averaged_as_infinite():
    import math

    from mtu_export.evaluate import summarise
    from mtu_export.metrics import UINT8_PEAK, psnr_db
    from mtu_export.shapes.world import make_example

    examples = [make_example("edit", "heldout", i) for i in range(2)]
    scores = summarise(BUILTIN["edit"], examples, [examples[0].target, examples[1].source])
    second = psnr_db(examples[1].target, examples[1].source, UINT8_PEAK)
    assert scores["psnr"] == pytest.approx(second) and scores["psnr_identical"] == 1 and scores["ssim"] < 1
    mse = np.mean((examples[1].target.astype(float) - examples[1].source) ** 2) / 2  # the set's: one pair is exact
    assert scores["psnr_set"] == pytest.approx(10 * math.log10(255**2 / mse))
    assert scores["gain_over_floor_db"] == pytest.approx(scores["psnr_set"] - scores["source_psnr_set"])


def test_unsupported_prediction_type_fails_before_any_work(world_pipeline, tmp_path):
    base = _with_prediction_type(world_pipeline, tmp_path / "base", "flow")
    result = invoke("train", base, "--work", tmp_path / "w", "--out", tmp_path / "o")
    assert_clean_failure(result, "fix prediction_type in scheduler/scheduler_config.json", 2)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


DDP_WORKER = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from mtu_export.config import TrainConfig
from mtu_export.loop import process_state
from mtu_export.train import fit

base, work = Path(sys.argv[1]), Path(sys.argv[2])
mtu, _ = fit(TrainConfig(steps=3, batch_size=8, cache_size=16, checkpoint_every=3, warmup=1, lr=1e-3), base, work)
state = {n: p.detach().contiguous() for n, p in mtu.trainable_parameters()}
rank = process_state()
assert rank.num_processes == 2 and rank.backend == "gloo", (rank.num_processes, rank.backend)
save_file(state, str(work / f"rank{rank.process_index}.safetensors"))
"""


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_keeps_ranks_identical(world_pipeline, tmp_path):
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA each process runs DDP on the CPU over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [str(tmp_path / "worker.py"), str(world_pipeline), str(tmp_path / "w")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "w" / "rank0.safetensors"), load_file(tmp_path / "w" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    init = load_checkpoint_free_init(world_pipeline)
    assert any(not torch.equal(rank0[k], init[k]) for k in rank0)  # and they did train


def load_checkpoint_free_init(base: Path) -> dict[str, torch.Tensor]:
    from mtu_export.train import prepare_model

    torch.manual_seed(0)
    mtu = prepare_model(TrainConfig(), load_unet(base))
    return {n: p.detach() for n, p in mtu.trainable_parameters()}


def test_parity_table_flags_tasks_below_the_goal():
    from mtu_export.evaluate import EvalConfig
    from mtu_export.parity import markdown, parity

    mtu = {"edit": {"psnr": 27.0, "ssim": 0.9}, "sr": {"psnr": 30.0}}
    single = {"edit": {"psnr": 30.0, "ssim": 0.9}, "sr": {"psnr": 29.0}}
    table = parity(mtu, single)
    assert table["edit"]["metrics"]["psnr"]["ratio"] == pytest.approx(0.9)
    text = markdown(table, EvalConfig(count=5))
    assert "| edit | **psnr** | 27.0000 | 30.0000 | 0.9000 | **no** |" in text
    assert "| sr | **psnr** | 30.0000 | 29.0000 | 1.0345 | yes |" in text


@pytest.mark.slow  # end to end: samples every task on two checkpoints
def test_parity_report_end_to_end(world_pipeline, tmp_path):
    from PIL import Image

    common = ["--steps", "2", "--batch-size", "8", "--cache-size", "8"]
    assert invoke("train", world_pipeline, "--out", tmp_path / "mtu", "--work", tmp_path / "w1", *common).exit_code == 0
    args = ["train", world_pipeline, "--out", tmp_path / "sr", "--work", tmp_path / "w2", "--single-task", "sr"]
    assert invoke(*args, *common).exit_code == 0
    result = invoke("parity", tmp_path / "mtu", "--baseline", f"sr={tmp_path / 'sr'}", "--out", tmp_path / "report",
                    "--count", "2", "--steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sr: 2/2 sampled" in result.output  # progress while sampling, per batch
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    row = report["parity"]["sr"]["metrics"]["psnr"]
    assert row["ratio"] == pytest.approx(row["mtu"] / row["single"])
    assert "bicubic_psnr" in report["parity"]["sr"]["metrics"]
    grid = Image.open(tmp_path / "report" / "grid-sr.png")
    assert grid.size == (4 * 66 * 2, 2 * 66 * 2)  # 4 columns (input, MTU, single, truth) x 2 rows, zoom 2
    routing = report["routing"]["sr"]
    assert len(routing["mean_per_expert"]) == 4 and sum(routing["mean_per_expert"]) == pytest.approx(1, abs=1e-3)
    assert 0 < routing["normalised_entropy"] <= 1
    assert "Router weights learned per task" in (tmp_path / "report" / "parity.md").read_text()
    args = ["eval", tmp_path / "mtu", "--task", "edit", "--count", "2", "--first", "5", "--steps", "2"]
    assert invoke(*args, "--json", tmp_path / "edit.json").exit_code == 0
    run = json.loads((tmp_path / "edit.json").read_text())
    assert (run["first"], run["count"], run["steps"], run["split"]) == (5, 2, 2, "heldout")
    assert {"psnr", "ssim", "source_psnr", "source_ssim", "reader_accuracy"} <= set(run["tasks"]["edit"])


def test_edit_floor_is_the_unchanged_source():
    from mtu_export.evaluate import example_metrics
    from mtu_export.metrics import UINT8_PEAK, psnr_db
    from mtu_export.shapes.world import make_example

    example = make_example("edit", "heldout", 3)
    unchanged = example_metrics(BUILTIN["edit"], example, example.source)
    assert unchanged["psnr"] == unchanged["source_psnr"] == psnr_db(example.target, example.source, UINT8_PEAK) < 60
    assert example_metrics(BUILTIN["edit"], example, example.target)["psnr"] is None  # identical: psnr_db's None


def test_the_training_ema_is_diffusers_emamodel_with_its_warmup():
    """`loop.make_ema`: diffusers' EMAModel, whose k-th update decays by min(decay, k / (9 + k)): the first copies the
    weights, the second keeps 2/11 of the average."""
    from diffusers.training_utils import EMAModel

    from mtu_export.loop import make_ema

    param = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema([param], 0.999)
    assert isinstance(ema, EMAModel)
    with torch.no_grad():
        param.fill_(1.0)
    ema.step([param])
    assert torch.equal(ema.shadow_params[0], torch.ones(3))
    with torch.no_grad():
        param.fill_(12.0)
    ema.step([param])
    torch.testing.assert_close(ema.shadow_params[0], torch.full((3,), 10.0))  # 2/11 * 1 + 9/11 * 12
