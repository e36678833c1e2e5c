"""A tiny Stable-Diffusion-shaped pipeline with random weights, built offline from real diffusers and
transformers classes, and a toy shapes-world pipeline: the test suite's fixtures (`bench.peers` borrows the
tokenizer).
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_DIM = 32


def tiny_unet_config(**overrides) -> dict:
    """Two resolutions, cross-attention in both, GEGLU FFNs of hidden width 128 / 256 (after diffusers' tests)."""
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(**overrides)).eval()


def char_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) built from files written here, so nothing is downloaded."""
    path = Path(tempfile.mkdtemp(prefix="mtu-tokenizer-"))
    chars = string.ascii_lowercase + string.digits + ".,'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    shutil.rmtree(path)  # the tokenizer holds its vocabulary in memory; the pipeline saves its own copy
    return tokenizer


def write_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """Write a complete StableDiffusionPipeline folder at `path` (tiny UNet, VAE, CLIP text encoder, tokenizer, DDIM)
    with seeded random weights; 32x32 images, 16x16x4 latents."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=100,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    tokenizer = char_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed, sample_size=8),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# A shapes-world pipeline at toy size (VAE 64x64 -> 16x16x4, world tokenizer), trained for a handful of steps by
# the real recipe code: what the trainer's and exporter's tests run on.
TINY_RECIPE = """
seed = 0
dataset_size = 64
[vae]
block_out_channels = [8, 16, 16]
down_block_types = ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]
up_block_types = ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
layers_per_block = 1
latent_channels = 4
norm_num_groups = 8
sample_size = 64
[text_encoder]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
[unet]
sample_size = 16
block_out_channels = [32, 32]
down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
layers_per_block = 1
attention_head_dim = 2
norm_num_groups = 8
[vae_training]
steps = 4
batch_size = 2
lr = 1e-3
warmup = 1
checkpoint_every = 3
[unet_training]
steps = 3
batch_size = 4
lr = 1e-3
warmup = 1
checkpoint_every = 2
"""


def write_world_pipeline(path: Path) -> Path:
    """Run the base-model recipe at toy size into `path` (a few seconds); its work folder is removed."""
    from mtu_export.shapes.pretrain import pretrain

    work = Path(tempfile.mkdtemp(prefix="mtu-world-"))
    try:
        (work / "tiny.toml").write_text(TINY_RECIPE)
        pretrain(work / "tiny.toml", work / "run", Path(path), dtype="fp32")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Path(path)
