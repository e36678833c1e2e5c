"""Pretrained diffusers UNet -> MTU UNet (docs/concepts.md). The checkpoint format is checkpoint.py's.

Upcycling is exact at initialisation: each FFN's hidden units are partitioned into N experts (output bias split
N ways), every router starts uniform with mixture weights N·softmax = 1, per-task LayerNorms are copies of the
pretrained one, and per-task conv_ins carry the pretrained kernel on the first channels and zeros elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from torch import nn

from mtu_export.config import MoEConfig, TaskSpec
from mtu_export.errors import ConfigError, InputError
from mtu_export.moe import MoEFeedForward, MTUUNet, TaskConvIn, TaskLayerNorm, TaskRouter, TaskRouting
from mtu_export.storage import locate_unet, unet_variant, unet_weights, weights_dtype

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ---------------------------------------------------------------------------------------------- loading a base UNet
def load_unet(path: Path) -> UNet2DConditionModel:
    """Load a diffusers UNet (or a pipeline's unet/) from a local folder, safetensors only."""
    source = locate_unet(Path(path))
    variant = unet_variant(source.unet_dir)
    dtype = TORCH_DTYPES[weights_dtype(unet_weights(source.unet_dir))]  # keep the user's precision
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source.unet_dir, use_safetensors=True, local_files_only=True, variant=variant, torch_dtype=dtype
        )
    except Exception as exc:  # diffusers raises many types for a broken folder; all mean the same to the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not load the UNet in {source.unet_dir}: {first_line}") from None
    return unet.eval()


# ------------------------------------------------------------------------------------------------------- upcycling
def transformer_blocks(unet: nn.Module) -> Iterator[tuple[str, BasicTransformerBlock]]:
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            yield name, module


def split_feed_forward(ff: FeedForward, num_experts: int, where: str) -> list[FeedForward]:
    """Partition a FeedForward's hidden units into `num_experts` FeedForwards of width d_ff/N (exact sum)."""
    proj, out = ff.net[0].proj, ff.net[2]
    d_ff = out.in_features
    if d_ff % num_experts:
        divisors = [n for n in range(1, min(d_ff, 64) + 1) if d_ff % n == 0]
        raise ConfigError(
            f"--experts {num_experts} does not divide the FFN hidden width {d_ff} of {where}; "
            f"choose one of {', '.join(map(str, divisors))}"
        )
    glu = proj.out_features == 2 * d_ff  # GEGLU / SwiGLU: value rows, then gate rows
    width = d_ff // num_experts
    experts = []
    for i in range(num_experts):
        rows = torch.arange(i * width, (i + 1) * width)
        in_rows = torch.cat([rows, rows + d_ff]) if glu else rows
        expert = copy.deepcopy(ff)
        expert.net[0].proj = _linear(proj.weight[in_rows], None if proj.bias is None else proj.bias[in_rows])
        expert.net[2] = _linear(out.weight[:, rows], None if out.bias is None else out.bias / num_experts)
        experts.append(expert)
    return experts


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def task_conv_in(base: nn.Conv2d, spec: TaskSpec) -> nn.Conv2d:
    """A conv_in with the task's channels: pretrained kernel on the first channels, zeros on the extra ones."""
    if spec.in_channels < base.in_channels:
        raise ConfigError(
            f"task {spec.name!r} has {spec.in_channels} input channels, fewer than the base UNet's "
            f"{base.in_channels}; MTU only widens conv_in — give it at least {base.in_channels}"
        )
    conv = nn.Conv2d(
        spec.in_channels,
        base.out_channels,
        base.kernel_size,
        stride=base.stride,
        padding=base.padding,
        bias=base.bias is not None,
        device=base.weight.device,
        dtype=base.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, : base.in_channels].copy_(base.weight)
        if base.bias is not None:
            conv.bias.copy_(base.bias)
    return conv


def upcycle_unet(unet: UNet2DConditionModel, config: MoEConfig) -> MTUUNet:
    """Return an MTU UNet built from a copy of `unet` (left unchanged) that reproduces it for every task."""
    _check_conditioning(unet.config)
    unet = copy.deepcopy(unet)
    routing = TaskRouting()
    blocks = list(transformer_blocks(unet))
    if not blocks:
        raise InputError("this UNet has no BasicTransformerBlock, so no FFN to upcycle; use a cross-attention UNet")
    device, dtype = unet.conv_in.weight.device, unet.conv_in.weight.dtype
    for name, block in blocks:
        _check_block(name, block)
        experts = split_feed_forward(block.ff, config.num_experts, where=f"{name}.ff")
        router = TaskRouter(config.task_embed_dim, config.router_hidden_dim, config.num_experts, config.top_k)
        router = router.to(device, dtype)
        block.ff = MoEFeedForward(experts, router, routing)
        block.norm3 = TaskLayerNorm({t: copy.deepcopy(block.norm3) for t in config.task_names}, routing)
    unet.conv_in = TaskConvIn({t.name: task_conv_in(unet.conv_in, t) for t in config.tasks}, routing)
    mtu = MTUUNet(unet, config, routing).to(device, dtype)
    return mtu.freeze_()


def _check_conditioning(config) -> None:
    """MTU routes by task only; extra conditioning inputs it cannot check exactly are refused up front."""
    if config.class_embed_type is not None:
        raise InputError(
            f"this UNet uses class_embed_type={config.class_embed_type!r}; mtu-export supports UNets conditioned on "
            "text (and SDXL's text_time) only — upcycle a text-to-image UNet"
        )
    if config.addition_embed_type not in (None, "text_time"):
        raise InputError(
            f"this UNet uses addition_embed_type={config.addition_embed_type!r}; mtu-export supports none or "
            "'text_time' (SDXL) — upcycle a Stable Diffusion 1.x/2.x or SDXL UNet"
        )


def _check_block(name: str, block: BasicTransformerBlock) -> None:
    ff = getattr(block, "ff", None)
    if not (isinstance(ff, FeedForward) and isinstance(ff.net[2], nn.Linear) and hasattr(ff.net[0], "proj")):
        raise InputError(f"{name}.ff is not a diffusers FeedForward with a projection; MTU cannot upcycle it")
    if not isinstance(block.norm3, nn.LayerNorm):
        raise InputError(
            f"{name} uses norm_type={block.norm_type!r} without a plain LayerNorm before the FFN; "
            "MTU supports UNets whose transformer blocks use norm_type 'layer_norm' (SD 1.x/2.x, SDXL)"
        )


def describe(mtu: MTUUNet) -> dict:
    """What an MTU UNet holds: tasks, experts, parameter counts and per-layer routing probabilities per task."""
    total = sum(p.numel() for p in mtu.parameters())
    trainable = sum(p.numel() for _, p in mtu.trainable_parameters())
    routing = {task: mtu.routing_probabilities(task) for task in mtu.config.task_names}
    layers = [name for name, _ in mtu.moe_layers()]
    return {
        "tasks": [{"name": t.name, "in_channels": t.in_channels} for t in mtu.config.tasks],
        "num_experts": mtu.config.num_experts,
        "route": mtu.config.route,
        "task_embed_dim": mtu.config.task_embed_dim,
        "router_hidden_dim": mtu.config.router_hidden_dim,
        "moe_layers": len(layers),
        "parameters": {"total": total, "trainable": trainable, "frozen": total - trainable},
        "routing": {
            layer: {task: [round(float(p), 4) for p in routing[task][layer]] for task in routing} for layer in layers
        },
    }
