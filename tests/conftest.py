"""Fixtures: real diffusers / transformers classes at tiny sizes, seeded, built offline; plain helpers are in
helpers.py.

Torch runs on one thread here: the models are tiny, and on a busy 2-core machine a second thread made a tiny UNet
forward 100x slower (2.9 s against 0.025 s), waiting for a core. Nothing in the fast tier measures torch's
threading (`bench-train` records the count it ran with; child processes keep their own settings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import perturb_

from mtu_export.checkpoint import save_checkpoint
from mtu_export.config import MoEConfig
from mtu_export.shapes.tiny import tiny_unet, write_tiny_pipeline, write_world_pipeline
from mtu_export.upcycle import load_unet, upcycle_unet

torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def mtu_world(world_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-task MTU checkpoint of `world_pipeline`, perturbed so that tasks really differ; read-only for tests."""
    mtu = perturb_(upcycle_unet(load_unet(world_pipeline), MoEConfig()), scale=0.1)
    return save_checkpoint(mtu, tmp_path_factory.mktemp("mtu") / "ckpt", pipeline_dir=world_pipeline)


@pytest.fixture(scope="session")
def topk_world(world_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-task top-2 MTU checkpoint of `world_pipeline` (`--route top-2`), perturbed so that tasks pick different
    experts; read-only for tests."""
    mtu = perturb_(upcycle_unet(load_unet(world_pipeline), MoEConfig(top_k=2)), scale=0.3)
    return save_checkpoint(mtu, tmp_path_factory.mktemp("topk") / "ckpt", pipeline_dir=world_pipeline)
