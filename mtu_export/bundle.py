"""All tasks of an MTU checkpoint as one UNet with a `task_id` input, every shared weight stored once (the second
exact way to ship several tasks, beside one folded UNet per task).

For task t with mixture weights wᵢ, Σ wᵢ·Eᵢ(x) = W2·(s_t ⊙ act(W1·x)) + Σ wᵢ·b2ᵢ, where W1 and W2 stack the
experts (the fold with all wᵢ = 1) and s_t repeats wᵢ over expert i's d_ff/N hidden channels. So the bundle keeps
W1 and W2 once and, per task, only s_t (d_ff), the output bias (d), the pre-FFN LayerNorm (2·d) and a conv_in whose
missing input channels are zero (so every task reads a sample with the widest task's channel count; callers pad
with zeros). The task is a graph input, gathered from those small tables: no routing MLP is left in the graph.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from mtu_export.fold import fold_feed_forward
from mtu_export.moe import MoEFeedForward, MTUUNet, TaskConvIn, TaskLayerNorm
from mtu_export.upcycle import transformer_blocks


def pad_to_channels(sample: torch.Tensor, channels: int) -> torch.Tensor:
    """A task's (B, C_task, H, W) sample -> the bundle's (B, channels, H, W), zeros in the extra channels."""
    return F.pad(sample, (0, 0, 0, 0, 0, channels - sample.shape[1]))


class TaskIndex:
    """The active task id, a 0-d int64 tensor, shared by reference between a TaskBundle and its modules."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class TaskScaledFeedForward(nn.Module):
    """The experts stacked into one FFN of the original width; hidden channels scaled per task."""

    def __init__(self, dense: nn.Module, scales: torch.Tensor, biases: torch.Tensor | None, index: TaskIndex):
        super().__init__()
        self.act = dense.net[0]  # GEGLU / GELU with the stacked input projection
        self.out = nn.Linear(dense.net[2].in_features, dense.net[2].out_features, bias=False)
        self.out.weight = dense.net[2].weight  # [W2₁ | … | W2_N], unscaled
        self.scales = nn.Parameter(scales, requires_grad=False)  # (T, d_ff)
        self.biases = None if biases is None else nn.Parameter(biases, requires_grad=False)  # (T, d)
        self._index = index

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        task = self._index.value
        hidden = self.act(hidden_states) * self.scales[task]  # (B, L, d_ff)
        out = self.out(hidden)
        return out if self.biases is None else out + self.biases[task]


class TaskTableLayerNorm(nn.Module):
    """The tasks' pre-FFN LayerNorms: one normalisation, the affine parameters gathered by task."""

    def __init__(self, norms: list[nn.LayerNorm], index: TaskIndex):
        super().__init__()
        self.shape = norms[0].normalized_shape
        self.eps = norms[0].eps
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]), requires_grad=False)  # (T, d)
        self.bias = nn.Parameter(torch.stack([n.bias.detach() for n in norms]), requires_grad=False)  # (T, d)
        self._index = index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        task = self._index.value
        return F.layer_norm(hidden_states, self.shape, self.weight[task], self.bias[task], self.eps)


class TaskTableConvIn(nn.Module):
    """The tasks' conv_ins, zero-padded to the widest task's input channels, gathered by task."""

    def __init__(self, convs: list[nn.Conv2d], index: TaskIndex):
        super().__init__()
        first = convs[0]
        self.in_channels = max(c.in_channels for c in convs)
        self.stride, self.padding = first.stride, first.padding
        weight = torch.zeros(
            len(convs), first.out_channels, self.in_channels, *first.kernel_size, dtype=first.weight.dtype
        )
        for t, conv in enumerate(convs):
            weight[t, :, : conv.in_channels] = conv.weight.detach()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (T, C_out, C_max, k, k)
        self.bias = nn.Parameter(torch.stack([c.bias.detach() for c in convs]), requires_grad=False)  # (T, C_out)
        self._index = index

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        task = self._index.value
        return F.conv2d(sample, self.weight[task], self.bias[task], self.stride, self.padding)


class TaskBundle(nn.Module):
    """`(sample, timestep, encoder_hidden_states, task_id) -> model output` for every task of an MTU checkpoint."""

    def __init__(self, unet: UNet2DConditionModel, tasks: tuple[str, ...], channels: dict[str, int], index: TaskIndex):
        super().__init__()
        self.unet = unet
        self.tasks = tasks
        self.channels = channels  # each task's own input channels (the rest of `sample` must be zero)
        self._index = index

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    def task_id(self, task: str) -> torch.Tensor:
        return torch.tensor(self.tasks.index(task), dtype=torch.int64)

    def pad(self, sample: torch.Tensor) -> torch.Tensor:
        """A task's (B, C_task, H, W) input -> the bundle's (B, C_max, H, W), zeros in the extra channels."""
        return pad_to_channels(sample, self.in_channels)

    def forward(self, sample, timestep, encoder_hidden_states, task_id):
        self._index.value = task_id
        try:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        finally:
            self._index.value = None


@torch.no_grad()
def bundle_tasks(mtu: MTUUNet) -> TaskBundle:
    """Build the all-task bundle of `mtu` (float64 arithmetic, cast back to the model's dtype)."""
    tasks = mtu.config.task_names
    index = TaskIndex()
    weights = {}
    for task in tasks:
        with mtu.route(task):
            weights[task] = {name: moe.mixture_weights().to(torch.float64) for name, moe in mtu.moe_layers()}
    unet = copy.deepcopy(mtu.unet)
    for name, block in transformer_blocks(unet):
        if isinstance(block.ff, MoEFeedForward):
            block.ff = _scaled_feed_forward(block.ff, [weights[t][f"{name}.ff"] for t in tasks], index)
        if isinstance(block.norm3, TaskLayerNorm):
            block.norm3 = TaskTableLayerNorm([block.norm3.norms[t] for t in tasks], index)
    assert isinstance(unet.conv_in, TaskConvIn)
    conv_in = TaskTableConvIn([unet.conv_in.convs[t] for t in tasks], index)
    unet.conv_in = conv_in
    unet.register_to_config(in_channels=conv_in.in_channels)
    channels = {t: mtu.config.task(t).in_channels for t in tasks}
    return TaskBundle(unet, tasks, channels, index).eval()


def _scaled_feed_forward(moe: MoEFeedForward, task_weights: list[torch.Tensor], index: TaskIndex):
    dense = fold_feed_forward(moe, torch.ones(len(moe.experts), dtype=torch.float64))
    width = moe.experts[0].net[2].in_features  # d_ff / N
    dtype = dense.net[2].weight.dtype
    scales = torch.stack([w.repeat_interleave(width) for w in task_weights]).to(dtype)  # (T, d_ff)
    outs = [e.net[2] for e in moe.experts]
    biases = None
    if outs[0].bias is not None:
        per_task = [sum(wi * o.bias.to(torch.float64) for wi, o in zip(w, outs, strict=True)) for w in task_weights]
        biases = torch.stack(per_task).to(dtype)  # (T, d)
    return TaskScaledFeedForward(dense, scales, biases, index)
