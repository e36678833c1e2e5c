"""Every nn.Module of Multi-Task Upcycling, top to bottom: routing state, router, experts, task LayerNorm,
task conv_in, and the MTU UNet that wires them into a diffusers `UNet2DConditionModel`.

Routing depends on the task only, so the active task is set once per forward by `MTUUNet.route`
and read by every task-dependent module through one shared `TaskRouting` object. Building an MTU UNet from a
pretrained one lives in `upcycle.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from mtu_export.config import MoEConfig, SparseFold
from mtu_export.errors import ConfigError


class TaskRouting:
    """The active task, shared by reference between an MTUUNet and its task-dependent submodules."""

    def __init__(self) -> None:
        self.task: str | None = None
        self.embedding: torch.Tensor | None = None  # (task_embed_dim,)
        self.sparse: SparseFold | None = None  # experts dropped from every mixture (a sparse fold's reference)

    def require(self) -> tuple[str, torch.Tensor]:
        if self.task is None or self.embedding is None:
            raise RuntimeError("MTU module called outside MTUUNet.route(task); call the MTUUNet, not its .unet")
        return self.task, self.embedding


def routed_checkpointing(mtu: MTUUNet):
    """A diffusers `gradient_checkpointing_func` that recomputes a block under the task it first ran with: the
    routing state is set per forward and is gone (or another task's) when backward recomputes the block."""
    from torch.utils.checkpoint import checkpoint

    routing = mtu._routing

    def checkpointed(module, *args):
        task, embedding = routing.task, routing.embedding

        def rerun(*inputs):
            saved = routing.task, routing.embedding
            routing.task, routing.embedding = task, embedding
            try:
                return module(*inputs)
            finally:
                routing.task, routing.embedding = saved

        return checkpoint(rerun, *args, use_reentrant=False)

    return checkpointed


class TaskRouter(nn.Module):
    """Task embedding -> 2-layer MLP -> N·softmax over experts (dense), or over the task's k heaviest experts (top-k).

    The last layer starts at zero, so in the dense mixture every expert weighs exactly 1 at initialisation and the
    partitioned experts sum to the pretrained FFN (docs/concepts.md, *What upcycling does*).

    Top-k keeps the k largest logits, takes the softmax over those k alone and gives every other expert a weight of
    exactly 0, so folding the task drops them without changing its output. The choice is trained straight-through:
    the forward pass is the top-k mixture, the backward pass is the dense softmax's, so an expert outside the top k
    still learns whether it should be in (its output is computed in training, weighted by 0).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, num_experts: int, top_k: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_experts))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def probabilities(self, task_embedding: torch.Tensor) -> torch.Tensor:
        logits = self.net(task_embedding)
        dense = torch.softmax(logits, dim=-1)  # (N,)
        if self.top_k is None or self.top_k >= self.num_experts:
            return dense
        chosen = torch.topk(logits.detach(), self.top_k, dim=-1).indices
        sparse = torch.zeros_like(dense).scatter(-1, chosen, torch.softmax(logits.gather(-1, chosen), dim=-1))
        return sparse.detach() + (dense - dense.detach())  # forward: exactly `sparse`; backward: the dense softmax's

    def forward(self, task_embedding: torch.Tensor) -> torch.Tensor:
        return self.num_experts * self.probabilities(task_embedding)  # (N,) mixture weights, mean 1


class MoEFeedForward(nn.Module):
    """Drop-in for a diffusers `FeedForward`: a dense, task-routed mixture `Σᵢ wᵢ(task)·Eᵢ(x)`.

    Each expert is itself a diffusers `FeedForward` of hidden width d_ff/N, so the activation is exactly the
    pretrained one (GEGLU, GELU, tanh-GELU, ...).
    """

    def __init__(self, experts: list[nn.Module], router: TaskRouter, routing: TaskRouting) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = router
        self._routing = routing

    def mixture_weights(self) -> torch.Tensor:
        _, embedding = self._routing.require()
        weights = self.router(embedding)  # (N,)
        return weights if self._routing.sparse is None else sparsify(weights, self._routing.sparse)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weights = self.mixture_weights().to(hidden_states.dtype)
        output = weights[0] * self.experts[0](hidden_states)
        for weight, expert in zip(weights[1:], self.experts[1:], strict=True):
            output = output + weight * expert(hidden_states)
        return output  # (B, L, C)


def sparsify(weights: torch.Tensor, sparse: SparseFold) -> torch.Tensor:
    """The mixture `weights` (N,) with the experts `sparse` drops set to 0: those of weight 0 already, those whose
    probability is under `prune_below`, and all but the `ffn_budget` heaviest; the heaviest expert always stays."""
    n = weights.numel()
    keep = weights > 0
    if sparse.prune_below > 0:
        keep &= weights / n >= sparse.prune_below
    budget = max(1, math.floor(sparse.ffn_budget * n + 1e-9))
    if budget < n:
        heaviest = torch.zeros_like(keep)
        heaviest[torch.argsort(weights, descending=True, stable=True)[:budget]] = True
        keep &= heaviest
    if not keep.any():
        keep[torch.argmax(weights)] = True
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    if sparse.renormalize and not bool(keep.all()):
        kept = kept * (weights.sum() / kept.sum())
    return kept


class TaskLayerNorm(nn.Module):
    """One LayerNorm per task before the FFN (the block's `norm3`), selected by the active task."""

    def __init__(self, norms: dict[str, nn.LayerNorm], routing: TaskRouting) -> None:
        super().__init__()
        self.norms = nn.ModuleDict(norms)
        self._routing = routing

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        task, _ = self._routing.require()
        return self.norms[task](hidden_states)


class TaskConvIn(nn.Module):
    """One input convolution per task, each with that task's number of conditioning channels."""

    def __init__(self, convs: dict[str, nn.Conv2d], routing: TaskRouting) -> None:
        super().__init__()
        self.convs = nn.ModuleDict(convs)
        self._routing = routing

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        task, _ = self._routing.require()
        conv = self.convs[task]
        if sample.shape[1] != conv.in_channels:
            raise ConfigError(
                f"task {task!r} takes {conv.in_channels} input channels, got a sample with {sample.shape[1]}; "
                "concatenate the task's conditioning channels to the latent"
            )
        return conv(sample)


class MTUUNet(nn.Module):
    """A diffusers UNet whose FFNs, pre-FFN LayerNorms and conv_in are task-routed, plus the task embeddings."""

    def __init__(self, unet: UNet2DConditionModel, config: MoEConfig, routing: TaskRouting) -> None:
        super().__init__()
        self.unet = unet
        self.config = config
        self.task_embedding = nn.Embedding(len(config.tasks), config.task_embed_dim)
        self._routing = routing

    @contextmanager
    def route(self, task: str, sparse: SparseFold | None = None) -> Iterator[None]:
        """Make `task` the active task of every routed submodule for the duration of the block; `sparse`: drop the
        experts a sparse fold drops (`sparsify`), so that the routed model is that fold's reference."""
        index = self.config.task_names.index(self.config.task(task).name)
        self._routing.task = task
        self._routing.embedding = self.task_embedding.weight[index]
        self._routing.sparse = sparse
        try:
            yield
        finally:
            self._routing.task = None
            self._routing.embedding = None
            self._routing.sparse = None

    def forward(
        self,
        sample: torch.Tensor,  # (B, in_channels of the task, H, W)
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,  # (B, tokens, cross_attention_dim)
        task: str,
        sparse: SparseFold | None = None,
        **unet_kwargs,
    ):
        with self.route(task, sparse):
            return self.unet(sample, timestep, encoder_hidden_states, **unet_kwargs)

    def moe_layers(self) -> list[tuple[str, MoEFeedForward]]:
        return [(name, m) for name, m in self.unet.named_modules() if isinstance(m, MoEFeedForward)]

    @torch.no_grad()
    def routing_probabilities(self, task: str) -> dict[str, torch.Tensor]:
        """Softmax over experts of every MoE layer for `task`, keyed by the layer's module name."""
        with self.route(task):
            _, embedding = self._routing.require()
            return {name: moe.router.probabilities(embedding) for name, moe in self.moe_layers()}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The paper's trainable set: experts, routers, task embeddings, task LayerNorms, task conv_ins."""
        routed = (MoEFeedForward, TaskLayerNorm, TaskConvIn)
        params = [(f"task_embedding.{n}", p) for n, p in self.task_embedding.named_parameters()]
        for name, module in self.unet.named_modules():
            if isinstance(module, routed):
                params += [(f"unet.{name}.{n}", p) for n, p in module.named_parameters()]
        return params

    def freeze_(self) -> MTUUNet:
        """Set `requires_grad` to the paper's split: only MTU parameters train, everything else is frozen."""
        trainable = {id(p) for _, p in self.trainable_parameters()}
        for param in self.parameters():
            param.requires_grad_(id(param) in trainable)
        return self
