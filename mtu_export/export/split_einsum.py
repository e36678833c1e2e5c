"""Attention in the layout Apple's Neural Engine runs fast ("split einsum", Apple's ml-stable-diffusion and its
"Deploying Transformers on the Apple Neural Engine" note), for `mtu-export coreml --attention split-einsum`.

Each attention layer works on (B, C, 1, S) tensors, channels first, the last axis the sequence: the q/k/v and
output projections are 1×1 convolutions with the Linear layers' own weights, and the attention core is computed
head by head with two einsums and a softmax over the key axis, so no (B·heads, S, d) reshape or transpose is left
for the converter to lower into ops the Neural Engine runs poorly. It is a diffusers attention processor
(`Attention.set_processor`) with the same weights and the same math as `AttnProcessor2_0`; only the order of the
floating-point operations differs (tests hold it to >= 60 dB against the original). Only the attention layers are
rewritten: the transformer blocks around them keep diffusers' (B, S, C) layout, so one transpose in and one out per
layer remain (Apple rewrites the whole UNet; this keeps diffusers' model and weights as they are).

How fast it runs can only be measured on a Mac: nothing on Linux executes a Core ML model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtu_export.export.attention import refuse_unsupported


def _conv1x1(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear` applied over the channels of a (B, C, 1, S) tensor, as the 1×1 convolution the ANE prefers."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def split_einsum_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v per head. query (B, heads·d, 1, S), key and value (B, heads·d, 1, T) -> (B, heads·d,
    1, S): each head is a channel slice; its scores (B, T, 1, S) are softmaxed over the key axis (dim 1)."""
    d = query.shape[1] // heads
    key_t = key.transpose(1, 3)  # (B, T, 1, heads·d)
    outputs = []
    for h in range(heads):
        channels = slice(h * d, (h + 1) * d)
        scores = torch.einsum("bchq,bkhc->bkhq", query[:, channels], key_t[..., channels]) * scale  # (B, T, 1, S)
        weights = scores.softmax(dim=1)
        outputs.append(torch.einsum("bkhq,bchk->bchq", weights, value[:, channels]))  # (B, d, 1, S)
    return torch.cat(outputs, dim=1)


class SplitEinsumAttnProcessor:
    """A diffusers attention processor: `AttnProcessor2_0`'s computation in the (B, C, 1, S) split-einsum layout.
    Refuses the attention variants it does not cover (masks, spatial norm, q/k norms)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        refuse_unsupported(attn, attention_mask, "split-einsum attention", custom_scale=True)
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            x = hidden_states.reshape(batch, channels, 1, height * width)  # (B, C, 1, S)
        else:
            x = hidden_states.transpose(1, 2).unsqueeze(2)  # (B, S, C) -> (B, C, 1, S)
        if attn.group_norm is not None:
            x = attn.group_norm(x)  # GroupNorm over (B, C, *): the layout it expects
        if encoder_hidden_states is None:
            context = x
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)  # (B, T, Cc) -> (B, Cc, 1, T)
        query = _conv1x1(attn.to_q, x)
        key, value = _conv1x1(attn.to_k, context), _conv1x1(attn.to_v, context)
        out = split_einsum_attention(query, key, value, attn.heads, attn.scale).to(query.dtype)
        out = attn.to_out[1](_conv1x1(attn.to_out[0], out))  # (B, C, 1, S); to_out[1] is dropout
        out = out.reshape(batch, channels, height, width) if four_d else out.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def split_einsum_attention_(model: nn.Module) -> int:
    """Give every diffusers `Attention` in `model` the split-einsum processor, in place; returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(SplitEinsumAttnProcessor())
    return len(layers)
