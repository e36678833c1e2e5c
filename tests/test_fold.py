"""Folding a task gives a stock diffusers UNet equal to the routed MTU model (fp32 and fp64)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import perturb_, unet_inputs

from mtu_export.config import MoEConfig
from mtu_export.errors import DriftError
from mtu_export.fold import fold_task, verify_fold
from mtu_export.moe import MTUUNet
from mtu_export.shapes.tiny import tiny_unet
from mtu_export.upcycle import upcycle_unet

FOLD_ATOL_FP32 = 1e-5
FOLD_ATOL_FP64 = 1e-10
ROUNDTRIP_ATOL = 0.0  # save_pretrained / from_pretrained must be bit-exact


def _routed_and_folded(mtu: MTUUNet, task: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    spec = mtu.config.task(task)
    folded = fold_task(mtu, task)
    inputs = unet_inputs(spec.in_channels, dtype=dtype)
    with torch.no_grad():
        return mtu(**inputs, task=task).sample, folded(**inputs).sample


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, FOLD_ATOL_FP32), (torch.float64, FOLD_ATOL_FP64)])
def test_fold_equals_routed_model_after_training_like_perturbation(unet, dtype, atol):
    mtu = perturb_(upcycle_unet(unet.to(dtype), MoEConfig()))
    outputs = {}
    for task in mtu.config.task_names:
        routed, folded = _routed_and_folded(mtu, task, dtype)
        assert (routed - folded).abs().max().item() <= atol, task
        outputs[task] = routed
    # The perturbation really made tasks differ, so the check above is not comparing a model with itself.
    probs = {t: torch.stack(list(mtu.routing_probabilities(t).values())) for t in mtu.config.task_names}
    assert (probs["t2i"] - probs["sr"]).abs().max() > 1e-3
    assert (probs["t2i"] - 1 / mtu.config.num_experts).abs().max() > 1e-3


@pytest.mark.parametrize("num_experts", [1, 2, 8])
def test_fold_is_exact_for_other_expert_counts(unet, num_experts):
    mtu = perturb_(upcycle_unet(unet.double(), MoEConfig(num_experts=num_experts)), seed=num_experts)
    routed, folded = _routed_and_folded(mtu, "inpaint", torch.float64)
    assert (routed - folded).abs().max().item() <= FOLD_ATOL_FP64


def test_folded_unet_is_a_stock_diffusers_unet_of_the_base_shape(unet):
    mtu = perturb_(upcycle_unet(unet, MoEConfig()))
    folded = fold_task(mtu, "edit")
    assert type(folded) is UNet2DConditionModel
    assert folded.config.in_channels == 8
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in unet.parameters()) + 4 * 32 * 9
    base_shapes = {k: v.shape for k, v in unet.state_dict().items() if not k.startswith("conv_in.")}
    folded_shapes = {k: v.shape for k, v in folded.state_dict().items() if not k.startswith("conv_in.")}
    assert folded_shapes == base_shapes
    assert not any("Task" in type(m).__name__ or "MoE" in type(m).__name__ for m in folded.modules())


def test_folded_unet_round_trips_through_save_pretrained(unet, tmp_path):
    mtu = perturb_(upcycle_unet(unet, MoEConfig()))
    folded = fold_task(mtu, "sr")
    folded.save_pretrained(tmp_path / "sr", safe_serialization=True)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "sr").eval()
    inputs = unet_inputs(7)
    with torch.no_grad():
        assert (folded(**inputs).sample - reloaded(**inputs).sample).abs().max().item() <= ROUNDTRIP_ATOL


def test_fold_of_untrained_upcycle_is_the_base_unet(unet):
    mtu = upcycle_unet(unet, MoEConfig())
    folded = fold_task(mtu, "t2i")
    inputs = unet_inputs(4)
    with torch.no_grad():
        assert (folded(**inputs).sample - unet(**inputs).sample).abs().max().item() <= FOLD_ATOL_FP32


def test_verify_fold_catches_a_tampered_weight(unet):
    mtu = perturb_(upcycle_unet(unet, MoEConfig()))
    folded = fold_task(mtu, "t2i")
    assert verify_fold(mtu, folded, "t2i") <= FOLD_ATOL_FP32
    with torch.no_grad():
        folded.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight[0, 0] += 0.5
    with pytest.raises(DriftError, match="folded task 't2i' differs from the routed model"):
        verify_fold(mtu, folded, "t2i")


def test_sdxl_style_unet_upcycles_and_folds_exactly():
    """SDXL conditioning (pooled text + time ids) and several transformer layers per block."""
    unet = tiny_unet(
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        transformer_layers_per_block=(1, 2),
    ).double()
    mtu = perturb_(upcycle_unet(unet, MoEConfig(num_experts=2)))
    assert len(mtu.moe_layers()) == (1 + 2) + 2 + (2 * 2 + 2 * 1)  # down, mid, up (2 attentions per up block)
    for task in ("t2i", "edit"):
        assert verify_fold(mtu, fold_task(mtu, task), task) <= FOLD_ATOL_FP64
