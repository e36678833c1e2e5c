"""Fixtures: real diffusers / transformers classes at tiny sizes, seeded, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from mtu_export.tiny import CROSS_DIM, tiny_unet, write_tiny_pipeline, write_world_pipeline

__all__ = ["CROSS_DIM", "tiny_unet", "unet_inputs", "write_tiny_pipeline"]


def unet_inputs(in_channels: int = 4, batch: int = 2, size: int = 16, seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, in_channels, size, size, generator=g).to(dtype),
        timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, 7, CROSS_DIM, generator=g).to(dtype),
    )


@pytest.fixture
def unet() -> UNet2DConditionModel:
    return tiny_unet()


@pytest.fixture
def unet_dir(tmp_path: Path, unet: UNet2DConditionModel) -> Path:
    unet.save_pretrained(tmp_path / "base_unet", safe_serialization=True)
    return tmp_path / "base_unet"


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def world_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy shapes-world pipeline (factor-4 VAE, world tokenizer) made by the real base-model recipe."""
    return write_world_pipeline(tmp_path_factory.mktemp("world") / "pipeline")
