"""Sparse folds and top-k routing: a `--route top-k` model gives its other experts exactly 0, so its fold drops them
and is still exact (1e-5) while its FFNs narrow; the narrowed UNet loads in diffusers (its class shipped in the
folder), onnxruntime / optimum and coremltools; `--prune-below` / `--ffn-budget` approximate a dense model and say
by how much; every bad option is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import FAST, PROMPT, assert_clean_failure, assert_valid_manifest, invoke, unet_inputs

from mtu_export.bench.flops import torch_flops
from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import MoEConfig, SparseFold, TrainConfig
from mtu_export.errors import ConfigError
from mtu_export.fold import ffn_kept, fold_task, sparse_deviation, verify_fold
from mtu_export.metrics import psnr_db
from mtu_export.moe import TaskRouter, sparsify
from mtu_export.sparse_unet import SparseUNet2DConditionModel
from mtu_export.train import train

FOLD_ATOL_FP32 = 1e-5  # the fold check's tolerance, sparse or dense
PIPELINE_PSNR_MIN_DB = 40.0  # optimum's ORT pipeline vs diffusers' torch pipeline, same seed, uint8 images


def _random_router(top_k: int | None, seed: int = 0) -> TaskRouter:
    router = TaskRouter(8, 8, 4, top_k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.net[2].weight.copy_(torch.randn(router.net[2].weight.shape, generator=g))
    return router


def test_top_k_router_weighs_k_experts_and_trains_all_of_them_straight_through():
    router, embedding = _random_router(2), torch.randn(8, generator=torch.Generator().manual_seed(1))
    weights = router(embedding)
    logits = router.net(embedding).detach()
    chosen = set(torch.topk(logits, 2).indices.tolist())
    assert {i for i, w in enumerate(weights.tolist()) if w != 0.0} == chosen  # the rest are exactly 0
    expected = 4 * torch.softmax(logits[sorted(chosen)], dim=-1)  # N x softmax over the k alone
    assert torch.allclose(weights[sorted(chosen)], expected, atol=1e-6)
    (weights * torch.randn(4, generator=torch.Generator().manual_seed(2))).sum().backward()
    # Straight-through: the dense softmax's gradient reaches every expert's logit, chosen or not.
    assert (router.net[2].weight.grad.abs().sum(dim=1) > 0).all()


def test_top_k_at_initialisation_picks_the_same_k_experts_for_every_task_with_weight_n_over_k():
    router = TaskRouter(8, 8, 4, top_k=2)
    picks = {tuple(router(torch.randn(8, generator=torch.Generator().manual_seed(s))).tolist()) for s in range(4)}
    assert len(picks) == 1  # the last layer starts at zero: equal logits, one choice whatever the task
    assert sorted(picks.pop()) == [0.0, 0.0, 2.0, 2.0]
    assert TaskRouter(8, 8, 4, top_k=4)(torch.randn(8)).tolist() == [1.0] * 4  # k = N is the dense mixture


@pytest.mark.parametrize(
    ("sparse", "weights", "kept"),
    [
        (SparseFold(), [2.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]),  # weight-0 experts only
        (SparseFold(prune_below=0.1), [2.4, 1.2, 0.3, 0.1], [2.4, 1.2, 0.0, 0.0]),  # probability = weight / N
        (SparseFold(ffn_budget=0.5), [0.4, 1.2, 2.0, 0.4], [0.0, 1.2, 2.0, 0.0]),  # the two heaviest
        (SparseFold(ffn_budget=0.25), [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]),  # ties: the first
        (SparseFold(prune_below=0.5), [1.0, 1.6, 0.8, 0.6], [0.0, 1.6, 0.0, 0.0]),  # the heaviest always stays
        (SparseFold(ffn_budget=0.5, renormalize=True), [0.4, 1.2, 2.0, 0.4], [0.0, 1.5, 2.5, 0.0]),
    ],
)
def test_sparsify_drops_what_each_setting_names(sparse, weights, kept):
    got = sparsify(torch.tensor(weights, dtype=torch.float64), sparse)
    assert torch.allclose(got, torch.tensor(kept, dtype=torch.float64))


def test_top_k_fold_is_exact_and_narrower_for_every_task(topk_world):
    mtu = load_checkpoint(topk_world, dtype=torch.float32).model
    choices = set()
    for task in mtu.config.task_names:
        spec = mtu.config.task(task)
        folded = fold_task(mtu, task)
        assert isinstance(folded, SparseUNet2DConditionModel)
        assert ffn_kept(mtu, folded) == 0.5
        inputs = unet_inputs(spec.in_channels)
        with torch.no_grad():
            routed, got = mtu(**inputs, task=task).sample, folded(**inputs).sample
        assert (routed - got).abs().max().item() <= FOLD_ATOL_FP32
        assert verify_fold(mtu, folded, task) <= FOLD_ATOL_FP32
        assert sparse_deviation(mtu, folded, task) <= FOLD_ATOL_FP32  # nothing of nonzero weight was dropped
        choices.add(tuple(tuple(p.nonzero().flatten().tolist()) for p in mtu.routing_probabilities(task).values()))
    assert len(choices) > 1  # the tasks really chose different experts


def test_the_sparse_fold_costs_fewer_flops_than_the_dense_fold(topk_world, mtu_world):
    topk = load_checkpoint(topk_world, dtype=torch.float32).model
    dense = load_checkpoint(mtu_world, dtype=torch.float32).model
    feed = unet_inputs(4, batch=1)
    sparse_flops = torch_flops(fold_task(topk, "t2i"), feed)
    dense_flops = torch_flops(fold_task(dense, "t2i"), feed)
    assert type(fold_task(dense, "t2i")) is UNet2DConditionModel  # a dense model still folds to the stock class
    ffn = _ffn_flops(fold_task(dense, "t2i"), feed)
    assert dense_flops - sparse_flops == ffn // 2  # half of every FFN's hidden units are gone, nothing else


def _ffn_flops(unet, feed) -> int:
    """FLOPs of the transformer FFNs alone: 2 x MACs of their two linear layers at the tokens they see."""
    tokens = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=name: tokens.setdefault(n, args[0].shape[:-1].numel()))
        for name, m in unet.named_modules()
        if name.endswith(".ff")
    ]
    with torch.no_grad():
        unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
    for hook in hooks:
        hook.remove()
    modules = dict(unet.named_modules())
    total = 0
    for name, count in tokens.items():
        ff = modules[name]
        total += 2 * count * (ff.net[0].proj.in_features * ff.net[0].proj.out_features)
        total += 2 * count * (ff.net[2].in_features * ff.net[2].out_features)
    return total


def test_the_top_k_setting_survives_a_checkpoint_round_trip(topk_world):
    ckpt = load_checkpoint(topk_world)
    assert ckpt.model.config.top_k == 2
    assert json.loads((topk_world / "mtu_config.json").read_text())["moe"]["top_k"] == 2
    for probabilities in ckpt.model.routing_probabilities("sr").values():
        assert (probabilities == 0).sum().item() == 2


def test_a_folded_top_k_pipeline_loads_in_diffusers_and_runs_as_optimum_runs_its_onnx_export(topk_world, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    result = invoke("fold", topk_world, "--task", "t2i", "--out", tmp_path / "folded")
    assert result.exit_code == 0, result.output
    assert "narrowed FFNs (50% of the FFN width kept)" in result.output
    folded = tmp_path / "folded"
    assert json.loads((folded / "model_index.json").read_text())["unet"] == [
        "sparse_unet",
        "SparseUNet2DConditionModel",
    ]
    record = json.loads((folded / "unet" / "mtu_fold.json").read_text())
    assert record["ffn_kept"] == 0.5 and record["dense_deviation"] is None
    with pytest.raises(ValueError, match="expected shape"):  # the stock class cannot hold the narrowed FFNs
        UNet2DConditionModel.from_pretrained(folded / "unet")
    pipe = DiffusionPipeline.from_pretrained(folded, trust_remote_code=True, safety_checker=None)
    assert isinstance(pipe, StableDiffusionPipeline) and type(pipe.unet).__name__ == "SparseUNet2DConditionModel"

    exported = invoke("onnx", topk_world, "--task", "t2i", "--out", tmp_path / "onnx", *FAST)
    assert exported.exit_code == 0, exported.output
    manifest = assert_valid_manifest(tmp_path / "onnx")
    assert manifest["export"]["sparse"] == {"prune_below": 0.0, "ffn_budget": 1.0, "renormalize": False}
    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(tmp_path / "onnx")
    kwargs = dict(num_inference_steps=6, guidance_scale=3.0, output_type="np", height=64, width=64)
    got = ort_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    want = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == want.shape == (1, 64, 64, 3)
    value = psnr_db((want * 255).round(), (got * 255).round(), peak=255.0)
    assert value is None or value >= PIPELINE_PSNR_MIN_DB


# Runs in a fresh interpreter in which `import mtu_export` fails: what a user with only diffusers has.
WITHOUT_MTU_EXPORT = """
import sys
sys.modules["mtu_export"] = None
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(pipe.unet).__name__ == "SparseUNet2DConditionModel", type(pipe.unet)
inputs = np.load(sys.argv[2])
with torch.no_grad():
    out = pipe.unet(torch.from_numpy(inputs["sample"]), 500, torch.from_numpy(inputs["text"])).sample
np.save(sys.argv[3], out.numpy())
"""


def test_a_sparse_fold_loads_in_a_process_without_mtu_export(topk_world, tmp_path):
    """The folder carries its UNet class: plain diffusers loads it and computes what the fold computes."""
    import subprocess
    import sys

    assert invoke("fold", topk_world, "--task", "edit", "--out", tmp_path / "folded").exit_code == 0
    folded = fold_task(load_checkpoint(topk_world, dtype=torch.float32).model, "edit")
    g = torch.Generator().manual_seed(0)
    size, context = folded.config.sample_size, folded.config.cross_attention_dim
    inputs = {"sample": torch.randn(1, 8, size, size, generator=g), "text": torch.randn(1, 7, context, generator=g)}
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in inputs.items()})
    child = [sys.executable, "-c", WITHOUT_MTU_EXPORT, tmp_path / "folded", tmp_path / "in.npz", tmp_path / "out.npy"]
    run = subprocess.run(child, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        want = folded(inputs["sample"], 500, inputs["text"]).sample.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-5, rtol=0)


def test_a_sparse_fold_converts_to_core_ml_with_narrower_matmuls(topk_world, tmp_path):
    result = invoke("coreml", topk_world, "--task", "edit", "--out", tmp_path / "coreml")
    assert result.exit_code == 0, result.output
    manifest = assert_valid_manifest(tmp_path / "coreml")
    assert manifest["export"]["sparse"]["ffn_budget"] == 1.0
    import coremltools as ct

    package = next(p for p in (tmp_path / "coreml").rglob("*.mlpackage") if "unet" in p.name.lower())
    shapes = _const_shapes(ct.utils.load_spec(str(package)).mlProgram)
    # The world UNet's FFNs (C = 32): GEGLU in (2 x 4C, C) dense, the only (256, 32) matrix; the top-2 fold keeps
    # half of them, (128, 32) in, (32, 64) out, as the folded torch UNet has them.
    folded = fold_task(load_checkpoint(topk_world, dtype=torch.float32).model, "edit")
    linear = {tuple(m.weight.shape) for m in folded.modules() if isinstance(m, torch.nn.Linear)}
    assert (256, 32) not in shapes | linear
    assert {(128, 32), (32, 64)} <= linear
    assert linear <= shapes


def _const_shapes(program) -> set[tuple[int, ...]]:
    shapes = set()

    def visit(block) -> None:
        for op in block.operations:
            if op.type == "const":
                shapes.add(tuple(d.constant.size for d in op.outputs[0].type.tensorType.dimensions))
            for nested in op.blocks:
                visit(nested)

    for function in program.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return shapes


def test_a_budget_fold_of_a_dense_model_matches_its_sparse_reference_and_reports_its_deviation(mtu_world, tmp_path):
    result = invoke("fold", mtu_world, "--task", "inpaint", "--out", tmp_path / "f", "--ffn-budget", "0.5")
    assert result.exit_code == 0, result.output
    assert "measure the task's metric" in result.output
    record = json.loads((tmp_path / "f" / "unet" / "mtu_fold.json").read_text())
    assert record["ffn_kept"] == 0.5 and record["fold_max_abs_diff"] <= FOLD_ATOL_FP32
    assert record["dense_deviation"] > 1e-3  # dropping weighted experts changes the output, and it is said
    assert record["sparse"] == {"prune_below": 0.0, "ffn_budget": 0.5, "renormalize": False}
    mtu = load_checkpoint(mtu_world, dtype=torch.float32).model
    sparse = SparseFold(ffn_budget=0.5)
    folded = fold_task(mtu, "inpaint", sparse)
    inputs = unet_inputs(9)
    with torch.no_grad():
        want = mtu(**inputs, task="inpaint", sparse=sparse).sample
        assert (want - folded(**inputs).sample).abs().max().item() <= FOLD_ATOL_FP32
        renormalized = fold_task(mtu, "inpaint", SparseFold(ffn_budget=0.5, renormalize=True))
        assert (renormalized(**inputs).sample - folded(**inputs).sample).abs().max().item() > 1e-4


def test_training_top_2_leaves_exact_zeros_that_fold_exactly(world_pipeline, tmp_path):
    config = TrainConfig(steps=3, batch_size=8, cache_size=16, checkpoint_every=2, warmup=1, lr=1e-2, route="top-2")
    path = train(config, world_pipeline, tmp_path / "w", tmp_path / "out")
    mtu = load_checkpoint(path, dtype=torch.float32).model
    assert mtu.config.top_k == 2
    for task in mtu.config.task_names:
        for probabilities in mtu.routing_probabilities(task).values():
            assert (probabilities == 0).sum().item() == 2
        assert verify_fold(mtu, fold_task(mtu, task), task) <= FOLD_ATOL_FP32


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("onnx", ("--task", "all", "--ffn-budget", "0.5"), "export each task alone"),
        ("fold", ("--task", "t2i", "--prune-below", "1.5"), "--prune-below is a routing probability in [0, 1)"),
        ("fold", ("--task", "t2i", "--ffn-budget", "0"), "--ffn-budget is a fraction of the FFN width in (0, 1]"),
        ("coreml", ("--task", "all", "--prune-below", "0.1"), "export each task alone"),
    ],
)
def test_bad_sparse_options_are_one_line_errors(mtu_world, tmp_path, command, extra, message):
    result = invoke(command, mtu_world, "--out", tmp_path / "o", *extra)
    assert_clean_failure(result, message, exit_code=3)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--route", "top-5"), "--route top-5 needs 1 <= k <= the number of experts (4)"),
        (("--route", "sparse"), "--route must be 'dense' or 'top-k'"),
        (("--route", "top-2", "--single-task", "sr"), "a --single-task baseline has none"),
    ],
)
def test_bad_routes_fail_before_any_work(world_pipeline, tmp_path, extra, message):
    result = invoke("train", world_pipeline, "--work", tmp_path / "w", "--out", tmp_path / "o", *extra)
    assert_clean_failure(result, message, exit_code=3)
    assert not (tmp_path / "w").exists()


def test_route_and_sparse_configs_refuse_bad_values_in_the_api():
    with pytest.raises(ConfigError, match="top-0"):
        MoEConfig(top_k=0)
    with pytest.raises(ConfigError, match="--ffn-budget"):
        SparseFold(ffn_budget=1.5)
    assert MoEConfig(top_k=2).route == "top-2" and MoEConfig().route == "dense"
    assert TrainConfig(route="top-1").moe().top_k == 1
    assert np.isclose(SparseFold(prune_below=0.05).prune_below, 0.05) and SparseFold().drops_weight is False
