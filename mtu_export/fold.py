"""MTU UNet + task -> a vanilla diffusers `UNet2DConditionModel` of the original shape.

For a fixed task every mixture weight wᵢ is a constant, so Σ wᵢ·Eᵢ(x) is one FeedForward whose input projection
stacks the experts' rows (value rows, then gate rows for GLU activations) and whose output projection is
[w₁W2₁ | … | w_N·W2_N] with bias Σ wᵢ·b2ᵢ. The task's LayerNorm and conv_in are selected. Arithmetic is done in
float64 and cast back, so the fold adds no rounding of its own beyond the final cast.

The pipeline class a folded folder is labelled with comes from the task registry (tasks.py).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from torch import nn

from mtu_export import pipelines, sparse_unet
from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import SparseFold
from mtu_export.errors import DriftError, InputError
from mtu_export.moe import MoEFeedForward, MTUUNet, TaskConvIn, TaskLayerNorm
from mtu_export.sparse_unet import SparseUNet2DConditionModel
from mtu_export.storage import (
    PIPELINE_INDEX,
    atomic_output,
    link_or_copy_tree,
    read_json,
    write_json,
)
from mtu_export.tasks import pipeline_class, resolve
from mtu_export.upcycle import transformer_blocks

SPARSE_UNET_MODULE = "sparse_unet.py"  # a narrowed UNet's class, copied beside its weights


@torch.no_grad()
def fold_feed_forward(moe: MoEFeedForward, weights: torch.Tensor) -> FeedForward:
    """One dense FeedForward equal to Σ wᵢ·Eᵢ for the constant mixture `weights` (N,). Experts of weight exactly 0
    are left out (the sum is unchanged), so its hidden width is that of the experts kept."""
    kept = [i for i, w in enumerate(weights.tolist()) if w != 0.0]
    experts = [moe.experts[i] for i in kept]
    first = experts[0]
    width = first.net[2].in_features
    glu = first.net[0].proj.out_features == 2 * width
    projs = [e.net[0].proj for e in experts]
    outs = [e.net[2] for e in experts]
    w = weights[kept].to(torch.float64)
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
def fold_task(mtu: MTUUNet, task: str, sparse: SparseFold | None = None) -> UNet2DConditionModel:
    """The task's routed model as a plain `UNet2DConditionModel` (in_channels = the task's channels).

    Experts of weight 0 (outside a top-k model's k, or dropped by `sparse`) are left out of the fold; where that
    narrows an FFN, the result is a `SparseUNet2DConditionModel` (sparse_unet.py) that records each narrowed width."""
    spec = mtu.config.task(task)
    unet = copy.deepcopy(mtu.unet)
    with mtu.route(spec.name, sparse or SparseFold()):
        weights = {name: moe.mixture_weights() for name, moe in mtu.moe_layers()}
    widths = {}
    for name, block in transformer_blocks(unet):
        if isinstance(block.ff, MoEFeedForward):
            full = sum(e.net[2].in_features for e in block.ff.experts)
            block.ff = fold_feed_forward(block.ff, weights[f"{name}.ff"])
            if block.ff.net[2].in_features < full:
                widths[f"{name}.ff"] = block.ff.net[2].in_features
        if isinstance(block.norm3, TaskLayerNorm):
            block.norm3 = block.norm3.norms[spec.name]
    assert isinstance(unet.conv_in, TaskConvIn)
    unet.conv_in = unet.conv_in.convs[spec.name]
    unet.register_to_config(in_channels=spec.in_channels)
    # Rebuild from config so the result holds only stock diffusers modules, and prove the shapes line up.
    config = {k: v for k, v in unet.config.items() if k != "ffn_inner_dims"}
    with torch.device("meta"):
        if widths:
            vanilla = SparseUNet2DConditionModel.from_config({**config, "ffn_inner_dims": widths})
        else:
            vanilla = UNet2DConditionModel.from_config(config)
    vanilla.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return vanilla.eval().requires_grad_(True)


@dataclass(frozen=True)
class FoldResult:
    path: Path
    task: str
    max_abs_diff: float  # folded vs routed (dropping what the fold drops) on a seeded random input
    ffn_kept: float = 1.0  # hidden units of the folded FFNs ÷ the base's
    dense_deviation: float | None = None  # max |folded - routed with every expert| ÷ max |routed|, when weight dropped


def ffn_kept(mtu: MTUUNet, folded: UNet2DConditionModel) -> float:
    """The folded FFNs' hidden units ÷ the routed model's (1.0 for a dense fold)."""
    full = sum(e.net[2].in_features for _, moe in mtu.moe_layers() for e in moe.experts)
    kept = sum(block.ff.net[2].in_features for _, block in transformer_blocks(folded))
    return kept / full


# Largest |folded - routed| allowed, relative to max(1, max |routed|), by the dtype the models run in.
FOLD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def verify_fold(
    mtu: MTUUNet, folded: UNet2DConditionModel, task: str, sparse: SparseFold | None = None, seed: int = 0
) -> float:
    """Run routed and folded models on one seeded random input; raise DriftError past FOLD_TOLERANCE. The routed
    model drops the experts `sparse` drops, so a sparse fold is held to the same tolerance as a dense one."""
    routed, dense = _run_both(mtu, folded, task, sparse, seed)
    diff = (routed - dense).abs().max().item()
    limit = FOLD_TOLERANCE.get(folded.dtype, 1e-2) * max(1.0, routed.abs().max().item())
    if not diff <= limit:
        raise DriftError(
            f"folded task {task!r} differs from the routed model by {diff:.3g} (limit {limit:.3g}); "
            "this is a bug — please report it with the checkpoint's mtu_config.json"
        )
    return diff


@torch.no_grad()
def sparse_deviation(mtu: MTUUNet, folded: UNet2DConditionModel, task: str, seed: int = 0) -> float:
    """max |folded - routed| ÷ max |routed| against the model routed with every expert: what a sparse fold that drops
    experts of nonzero weight changes (0 up to rounding when it drops only zeros)."""
    routed, dense = _run_both(mtu, folded, task, None, seed)
    return (routed - dense).abs().max().item() / max(routed.abs().max().item(), 1e-12)


def _run_both(mtu: MTUUNet, folded: UNet2DConditionModel, task: str, sparse: SparseFold | None, seed: int):
    config = folded.config
    size = 2 ** len(config.block_out_channels)  # every resolution level is visited, and the input stays small
    dtype, device = folded.dtype, folded.device
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, config.in_channels, size, size, generator=g).to(device, dtype)
    context = torch.randn(1, 8, config.cross_attention_dim, generator=g).to(device, dtype)
    extra = _added_cond_kwargs(config, g, dtype, device)
    class_labels = torch.zeros(1, dtype=torch.long, device=device) if config.num_class_embeds else None
    timestep = torch.tensor([500], device=device)
    kwargs = dict(added_cond_kwargs=extra, class_labels=class_labels)
    routed = mtu(sample, timestep, context, task=task, sparse=sparse, **kwargs).sample
    return routed, folded(sample, timestep, context, **kwargs).sample


def _added_cond_kwargs(config, g: torch.Generator, dtype: torch.dtype, device: torch.device) -> dict | None:
    """SDXL-style UNets need pooled text embeddings and time ids; SD 1.x/2.x need nothing."""
    if config.addition_embed_type != "text_time":
        return None
    time_ids = 6  # original size, crop coords, target size
    pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
    return {
        "text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).to(device, dtype),
    }


def fold_checkpoint(
    checkpoint: Path, task: str, out: Path, overwrite: bool = False, sparse: SparseFold | None = None
) -> FoldResult:
    """`mtu-export fold`: write the task's folded UNet, or a full pipeline folder when the checkpoint has one.
    `sparse`: which experts to drop (experts of weight 0 always are); a narrowed UNet ships its class beside it."""
    sparse = sparse or SparseFold()
    with atomic_output(Path(out), [checkpoint], overwrite) as tmp:  # refused before the checkpoint is loaded
        result = _fold_into(tmp, Path(checkpoint), task, sparse)
    return replace(result, path=Path(out))


def _fold_into(tmp: Path, checkpoint: Path, task: str, sparse: SparseFold) -> FoldResult:
    """fold_checkpoint's work, written into the temporary folder `tmp` that becomes its output."""
    ckpt = load_checkpoint(Path(checkpoint))
    spec = ckpt.model.config.task(task)
    label = None if ckpt.pipeline_dir is None else folded_label(ckpt.pipeline_dir, spec, ckpt.model)
    saved_dtype = next(ckpt.model.parameters()).dtype
    if saved_dtype in (torch.float16, torch.bfloat16):  # fold and verify in fp32 (1e-5); round once, when saving
        ckpt.model.to(torch.float32)
    unet = fold_task(ckpt.model, spec.name, sparse)
    max_abs_diff = verify_fold(ckpt.model, unet, spec.name, sparse)
    deviation = sparse_deviation(ckpt.model, unet, spec.name) if sparse.drops_weight else None
    kept = ffn_kept(ckpt.model, unet)
    nn.Module.to(unet, saved_dtype)  # diffusers' own `to` warns of fp32-only modules that this UNet does not have
    unet_dir = tmp if ckpt.pipeline_dir is None else tmp / "unet"
    if ckpt.pipeline_dir is not None:
        link_or_copy_tree(ckpt.pipeline_dir, tmp)
    unet.save_pretrained(unet_dir, safe_serialization=True)
    ship_unet_class(unet, unet_dir)
    if ckpt.pipeline_dir is not None:
        definition = resolve(spec, ckpt.model.unet.config.out_channels)
        _retarget_pipeline(tmp / PIPELINE_INDEX, label, definition.condition.describe(), unet)
    write_json(
        unet_dir / "mtu_fold.json",
        {
            "task": spec.name,
            "in_channels": spec.in_channels,
            "checkpoint": str(ckpt.path.resolve()),
            "routing_probabilities": {
                k: [float(p) for p in v] for k, v in ckpt.model.routing_probabilities(spec.name).items()
            },
            "fold_max_abs_diff": max_abs_diff,
            "sparse": asdict(sparse),
            "ffn_kept": kept,
            "dense_deviation": deviation,
        },
    )
    return FoldResult(tmp, spec.name, max_abs_diff, kept, deviation)


def ship_unet_class(unet: UNet2DConditionModel, unet_dir: Path) -> None:
    """A narrowed UNet's folder gets its class's source (sparse_unet.py), which diffusers loads from there."""
    if isinstance(unet, SparseUNet2DConditionModel):
        shutil.copyfile(Path(sparse_unet.__file__), Path(unet_dir) / SPARSE_UNET_MODULE)


def folded_label(pipeline_dir: Path, spec, model) -> str:
    """The pipeline class a folded folder of `spec` is labelled with, checked before any work: a ConfigError for a
    task no class runs (a declared task that is not image-conditioned, `sr` of an SDXL base)."""
    index = read_json(pipeline_dir / PIPELINE_INDEX)
    if "unet" not in index:
        raise InputError(f"{pipeline_dir} has no 'unet' entry in model_index.json; it is not a UNet pipeline")
    return pipeline_class(resolve(spec, model.unet.config.out_channels), index.get("_class_name", ""))


def _retarget_pipeline(index_path: Path, label: str, condition: dict, unet: UNet2DConditionModel) -> None:
    """Label the folded folder with its task's pipeline class; a class diffusers lacks (`sr`) is shipped in the
    folder as diffusers' custom pipeline code (pipelines.py), with the task's condition in its config. A narrowed
    UNet is named as the custom component it is (its class beside its weights)."""
    index = read_json(index_path)
    index["_class_name"] = label
    if isinstance(unet, SparseUNet2DConditionModel):
        index["unet"] = [Path(SPARSE_UNET_MODULE).stem, type(unet).__name__]
    if label in pipelines.SHIPPED:
        index = pipelines.ship(index_path.parent, index, label, condition=condition)
    write_json(index_path, index)
