"""Stable Diffusion v1.5-sized structure: upcycle and fold a UNet built from the SD1.5 config (random weights).

Slow (about a minute, ~11 GB RAM): run with `make test-slow` or `pytest -m slow tests/test_sd15.py`.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import perturb_

from mtu_export.config import SD15_UNET_CONFIG, MoEConfig
from mtu_export.fold import fold_task
from mtu_export.upcycle import upcycle_unet

SD15_PARAMETERS = 859_520_964
SD15_TRANSFORMER_BLOCKS = 16
EXACT_ATOL_FP32 = 1e-5
LATENT = 16  # 16x16 latent (128 px): small, but every resolution level of the UNet runs


@pytest.mark.slow
def test_sd15_upcycle_and_fold_are_exact():
    torch.manual_seed(0)
    base = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    assert sum(p.numel() for p in base.parameters()) == SD15_PARAMETERS
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 9, LATENT, LATENT, generator=g)
    text = torch.randn(1, 8, 768, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        want = base(latent[:, :4], t, text).sample

    mtu = upcycle_unet(base, MoEConfig())
    del base
    mtu_params = sum(p.numel() for p in mtu.parameters())
    print(f"SD1.5: base {SD15_PARAMETERS:,}, MTU 4 tasks N=4 {mtu_params:,}, ratio {mtu_params / SD15_PARAMETERS:.5f}")
    assert len(mtu.moe_layers()) == SD15_TRANSFORMER_BLOCKS
    assert mtu_params / SD15_PARAMETERS < 1.001
    with torch.no_grad():
        upcycled = mtu(latent, t, text, task="inpaint").sample
    assert (upcycled - want).abs().max().item() <= EXACT_ATOL_FP32

    perturb_(mtu, scale=0.05)
    folded = fold_task(mtu, "inpaint")
    assert folded.config.in_channels == 9
    assert sum(p.numel() for p in folded.parameters()) == SD15_PARAMETERS + 320 * 5 * 9
    with torch.no_grad():
        routed = mtu(latent, t, text, task="inpaint").sample
        dense = folded(latent, t, text).sample
    assert (routed - want).abs().max().item() > 1e-3  # the perturbation changed the model
    assert (routed - dense).abs().max().item() <= EXACT_ATOL_FP32
