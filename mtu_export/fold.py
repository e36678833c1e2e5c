"""MTU UNet + task -> a vanilla diffusers `UNet2DConditionModel` of the original shape (DESIGN.md §2).

For a fixed task every mixture weight wᵢ is a constant, so Σ wᵢ·Eᵢ(x) is one FeedForward whose input projection
stacks the experts' rows (value rows, then gate rows for GLU activations) and whose output projection is
[w₁W2₁ | … | w_N·W2_N] with bias Σ wᵢ·b2ᵢ. The task's LayerNorm and conv_in are selected. Arithmetic is done in
float64 and cast back, so the fold adds no rounding of its own beyond the final cast.

Imports config, errors, storage, moe and upcycle (for the checkpoint); never export/bench/cli.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from torch import nn

from mtu_export.errors import InputError
from mtu_export.moe import MoEFeedForward, MTUUNet, TaskConvIn, TaskLayerNorm
from mtu_export.storage import (
    PIPELINE_INDEX,
    atomic_output_dir,
    check_output,
    link_or_copy_tree,
    read_json,
    write_json,
)
from mtu_export.upcycle import load_checkpoint, transformer_blocks

# Pipeline class for a folded task, by base pipeline class. Tasks not listed keep the base class name and are
# sampled by mtu-export's own samplers (e.g. `sr`: diffusers' x4 upscaler pipeline expects another UNet).
TASK_PIPELINES: dict[str, dict[str, str]] = {
    "StableDiffusionPipeline": {
        "edit": "StableDiffusionInstructPix2PixPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    "StableDiffusionXLPipeline": {
        "edit": "StableDiffusionXLInstructPix2PixPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
}


@torch.no_grad()
def fold_feed_forward(moe: MoEFeedForward, weights: torch.Tensor) -> FeedForward:
    """One dense FeedForward equal to Σ wᵢ·Eᵢ for the constant mixture `weights` (N,)."""
    first = moe.experts[0]
    width = first.net[2].in_features
    glu = first.net[0].proj.out_features == 2 * width
    projs = [e.net[0].proj for e in moe.experts]
    outs = [e.net[2] for e in moe.experts]
    w = weights.to(torch.float64)
    if glu:  # stack all value rows, then all gate rows, matching GEGLU's chunk(2)
        in_weight = torch.cat([p.weight[:width] for p in projs] + [p.weight[width:] for p in projs])
        in_bias = (
            None
            if projs[0].bias is None
            else torch.cat([p.bias[:width] for p in projs] + [p.bias[width:] for p in projs])
        )
    else:
        in_weight = torch.cat([p.weight for p in projs])
        in_bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
    out_weight = torch.cat([wi * o.weight.to(torch.float64) for wi, o in zip(w, outs, strict=True)], dim=1)
    out_bias = (
        None if outs[0].bias is None else sum(wi * o.bias.to(torch.float64) for wi, o in zip(w, outs, strict=True))
    )

    dense = copy.deepcopy(first)
    dense.net[0].proj = _dense_linear(in_weight, in_bias, projs[0].weight.dtype)
    dense.net[2] = _dense_linear(out_weight, out_bias, outs[0].weight.dtype)
    return dense


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    layer.weight.copy_(weight.to(dtype))
    if bias is not None:
        layer.bias.copy_(bias.to(dtype))
    return layer


@torch.no_grad()
def fold_task(mtu: MTUUNet, task: str) -> UNet2DConditionModel:
    """The task's routed model as a plain `UNet2DConditionModel` (in_channels = the task's channels)."""
    spec = mtu.config.task(task)
    unet = copy.deepcopy(mtu.unet)
    with mtu.route(spec.name):
        weights = {name: moe.mixture_weights() for name, moe in mtu.moe_layers()}
    for name, block in transformer_blocks(unet):
        if isinstance(block.ff, MoEFeedForward):
            block.ff = fold_feed_forward(block.ff, weights[f"{name}.ff"])
        if isinstance(block.norm3, TaskLayerNorm):
            block.norm3 = block.norm3.norms[spec.name]
    assert isinstance(unet.conv_in, TaskConvIn)
    unet.conv_in = unet.conv_in.convs[spec.name]
    unet.register_to_config(in_channels=spec.in_channels)
    # Rebuild from config so the result holds only stock diffusers modules, and prove the shapes line up.
    with torch.device("meta"):
        vanilla = UNet2DConditionModel.from_config(unet.config)
    vanilla.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return vanilla.eval().requires_grad_(True)


def fold_checkpoint(checkpoint: Path, task: str, out: Path, overwrite: bool = False) -> Path:
    """`mtu-export fold`: write the task's folded UNet, or a full pipeline folder when the checkpoint has one."""
    check_output(Path(out), overwrite)
    ckpt = load_checkpoint(Path(checkpoint))
    spec = ckpt.model.config.task(task)
    unet = fold_task(ckpt.model, spec.name)
    with atomic_output_dir(Path(out), overwrite) as tmp:
        if ckpt.pipeline_dir is None:
            unet.save_pretrained(tmp, safe_serialization=True)
        else:
            link_or_copy_tree(ckpt.pipeline_dir, tmp)
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            _retarget_pipeline(tmp / PIPELINE_INDEX, spec.name)
        write_json(
            (tmp / "unet" if ckpt.pipeline_dir else tmp) / "mtu_fold.json",
            {"task": spec.name, "in_channels": spec.in_channels, "checkpoint": str(ckpt.path.resolve())},
        )
    return Path(out)


def _retarget_pipeline(index_path: Path, task: str) -> None:
    index = read_json(index_path)
    if "unet" not in index:
        raise InputError(f"{index_path} has no 'unet' entry; the checkpoint's pipeline is not a UNet pipeline")
    base_class = index.get("_class_name", "")
    index["_class_name"] = TASK_PIPELINES.get(base_class, {}).get(task, base_class)
    write_json(index_path, index)
