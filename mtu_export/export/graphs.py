"""What each exported graph is: the component's folder in optimum's layout, its input and output names with their
dynamic axes (optimum-onnx's `UNetOnnxConfig`, `VaeEncoderOnnxConfig`, … use the same names, so optimum's ORT
pipelines load our folders), and a thin module with the tensor-in / tensor-out signature the exporters trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtu_export.bundle import TaskBundle

Axes = dict[int, str]


@dataclass(frozen=True)
class GraphSpec:
    component: str  # subfolder: text_encoder, unet, vae_encoder, vae_decoder
    inputs: dict[str, Axes]  # name -> dynamic axes (an empty dict: every dimension fixed, e.g. a scalar)
    outputs: dict[str, Axes]

    def dynamic_axes(self) -> dict[str, Axes]:
        return {name: axes for name, axes in {**self.inputs, **self.outputs}.items() if axes}


TEXT_ENCODER = GraphSpec(
    "text_encoder",
    {"input_ids": {0: "batch_size", 1: "sequence_length"}},
    {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}},
)
UNET = GraphSpec(
    "unet",
    {
        "sample": {0: "batch_size", 2: "height", 3: "width"},
        "timestep": {},  # a scalar, as optimum exports it
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
    },
    {"out_sample": {0: "batch_size", 2: "height", 3: "width"}},
)
BUNDLE = GraphSpec("unet", {**UNET.inputs, "task_id": {}}, UNET.outputs)
VAE_ENCODER = GraphSpec(
    "vae_encoder",
    {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}},
    {"latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
)
VAE_DECODER = GraphSpec(
    "vae_decoder",
    {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
    {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}},
)


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):  # (B, L) -> (B, L, D), (B, D)
        out = self.text_encoder(input_ids, return_dict=False)
        return out[0], out[1]


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):  # (B, C, h, w), (), (B, L, D) -> (B, 4, h, w)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class BundleGraph(nn.Module):
    def __init__(self, bundle: TaskBundle) -> None:
        super().__init__()
        self.bundle = bundle

    def forward(self, sample, timestep, encoder_hidden_states, task_id):  # task_id: () int64
        return self.bundle(sample, timestep, encoder_hidden_states, task_id)


class VaeEncoderGraph(nn.Module):
    """Image -> posterior parameters (mean and log-variance stacked on channels), as diffusers' `_encode`."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample):  # (B, 3, H, W) in [-1, 1] -> (B, 2·latent_channels, h, w)
        return self.vae._encode(sample)


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # (B, latent_channels, h, w), unscaled -> (B, 3, H, W)
        return self.vae.decode(latent_sample, return_dict=False)[0]
