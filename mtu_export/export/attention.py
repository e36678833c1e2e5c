"""Attention as one ONNX Runtime operator: `com.microsoft::MultiHeadAttention` instead of the MatMul · Softmax ·
MatMul chain (with its reshapes and transposes) that the TorchScript exporter and optimum emit.

onnxruntime's transformer optimizer finds no attention pattern to fuse in an exported diffusers UNet, so the graph
keeps materialising every (sequence × sequence) score matrix — 4096 × 4096 per head at Stable Diffusion's 64 × 64
latents — and a chain of transposes around it. Here the fusion is made at export time: each attention layer's core
is an autograd Function whose forward is torch's scaled-dot-product attention (the torch model computes exactly
what diffusers' `AttnProcessor2_0` does) and whose ONNX symbolic is the contrib operator, which onnxruntime's CPU
provider runs in one kernel. The projections, the output projection and everything else stay as they were.

TorchScript exporter only (a `symbolic` is what it honours); the graph then needs onnxruntime (contrib domain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONTRIB_DOMAIN = "com.microsoft"


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√d)·v over `heads` heads of (B, S, heads·d) tensors -> (B, S, heads·d)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        batch, _, inner = query.shape
        d = inner // heads
        q, k, v = (t.view(batch, -1, heads, d).transpose(1, 2) for t in (query, key, value))  # (B, h, S, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, inner)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", query, key, value, num_heads_i=heads)
        out.setType(query.type())  # (B, S, heads·d), as the query: lets the exporter's shape inference go on
        return out


class FusedAttnProcessor:
    """A diffusers attention processor for export: `AttnProcessor2_0`'s computation with the attention core as
    one `MultiHeadAttention` node. Refuses the attention variants it does not cover (masks, q/k norms, ...)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        refuse_unsupported(attn, attention_mask, "fused attention", custom_scale=False)
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, S, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        hidden_states = _MultiHeadAttention.apply(query, key, value, attn.heads).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def refuse_unsupported(attn, attention_mask, name: str, custom_scale: bool) -> None:
    """Raise NotImplementedError naming every feature of diffusers' `Attention` an export processor `name` does not
    reproduce (masks, spatial norm, q/k norms; a non-default softmax scale unless `custom_scale`)."""
    unsupported = [
        feature
        for feature, present in (
            ("attention_mask", attention_mask is not None),
            ("spatial_norm", attn.spatial_norm is not None),
            ("norm_q/norm_k", attn.norm_q is not None or attn.norm_k is not None),
            ("scale", not custom_scale and attn.scale != (attn.inner_dim // attn.heads) ** -0.5),
        )
        if present
    ]
    if unsupported:
        raise NotImplementedError(f"{name} does not cover {', '.join(unsupported)}")


def fuse_attention_(model: nn.Module) -> int:
    """Give every diffusers `Attention` in `model` the fused processor, in place; returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(FusedAttnProcessor())
    return len(layers)
