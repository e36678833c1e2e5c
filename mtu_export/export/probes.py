"""Real inputs for every exported graph, recorded along a task's own sampling trajectory (torch, fp32).

For one shapes-world example of the task (its prompt and image inputs, resized when the pipeline works at another
resolution) the torch sampler runs `steps` guided steps with the folded UNet; every UNet call's inputs are kept,
with the prompt tokens, the VAE encoder's image and the final latent for the decoder. Validation feeds these to
the exported graphs and to the torch modules; static int8 quantization calibrates on them (train split).

Imports conditioning, sample, vocab and world.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from mtu_export.conditioning import (
    EXTRA_CHANNELS,
    encode_batch,
    image_tensor,
    mask_tensor,
    masked_image,
    task_condition,
)
from mtu_export.errors import ConfigError
from mtu_export.sample import SamplerConfig, encode_prompts, sample_latents
from mtu_export.vocab import tokenize
from mtu_export.world import SIZE, Example, make_example

Feeds = dict[str, torch.Tensor]


@dataclass
class Probes:
    """Inputs per graph component (text_encoder, unet, vae_encoder, vae_decoder), each a list of feeds."""

    feeds: dict[str, list[Feeds]] = field(default_factory=dict)

    def add(self, component: str, feed: Feeds) -> None:
        self.feeds.setdefault(component, []).append(feed)

    def extend(self, other: Probes) -> None:
        for component, feeds in other.feeds.items():
            self.feeds.setdefault(component, []).extend(feeds)


def world_example(task: str, split: str, index: int, size: int, latent_size: int) -> Example:
    """A shapes-world example of `task` at `size` pixels (sr's low-res input at `latent_size`)."""
    if task not in EXTRA_CHANNELS:
        raise ConfigError(
            f"task {task!r} has no shapes-world inputs to validate its export with; known: {', '.join(EXTRA_CHANNELS)}"
        )
    example = make_example(task, split, index)
    if size == SIZE and (task != "sr" or example.source.shape[0] == latent_size):
        return example
    resize = lambda a, s, how=Image.BICUBIC: np.asarray(Image.fromarray(a).resize((s, s), how))  # noqa: E731
    source = None
    if example.source is not None:
        source = resize(example.source, latent_size if task == "sr" else size)
    mask = None if example.mask is None else resize(example.mask.astype(np.uint8) * 255, size, Image.NEAREST) > 127
    return replace(example, target=resize(example.target, size), source=source, mask=mask)


@torch.no_grad()
def trajectory_probes(
    unet, task: str, examples: list[Example], components, sampler: SamplerConfig, bundle: tuple[int, int] | None = None
) -> Probes:
    """Record every graph's inputs for `examples` (one trajectory each) of `task` sampled with `unet`.

    `unet` is the task's folded diffusers UNet; with `bundle` = (task id, channels) the recorded UNet feeds are
    zero-padded to the bundle's channels and carry `task_id` (the trajectory itself is the folded model's, which
    the bundle equals).
    """
    vae, text_encoder, tokenizer, scheduler = components
    probes = Probes()
    for example in examples:
        ids = tokenize(tokenizer, [example.prompt, ""])
        probes.add("text_encoder", {"input_ids": ids[:1]})
        probes.add("text_encoder", {"input_ids": ids[1:]})
        probes.add("vae_encoder", {"sample": _encoder_image(task, example)})
        latents = _sample([example], task, unet, components, sampler, probes, bundle)
        probes.add("vae_decoder", {"latent_sample": latents / vae.config.scaling_factor})
    return probes


def _encoder_image(task: str, example: Example) -> torch.Tensor:
    image = image_tensor([example.source if task == "edit" else example.target])  # (1, 3, H, W)
    return masked_image(image, mask_tensor([example.mask])) if task == "inpaint" else image


def _sample(examples, task, unet, components, sampler, probes: Probes, bundle) -> torch.Tensor:
    vae, text_encoder, tokenizer, scheduler = components
    scaling = vae.config.scaling_factor
    encoded = encode_batch(task, vae, examples)
    condition = task_condition(task, encoded, scaling, torch.Generator().manual_seed(sampler.seed + 1))
    prompts = [e.prompt for e in examples]
    text = encode_prompts(text_encoder, tokenizer, prompts)
    empty = encode_prompts(text_encoder, tokenizer, [""] * len(prompts))

    def record(sample, timestep, hidden):
        feed = {"sample": sample, "timestep": timestep[0].float(), "encoder_hidden_states": hidden}
        if bundle is not None:
            task_id, channels = bundle
            feed["sample"] = torch.nn.functional.pad(sample, (0, 0, 0, 0, 0, channels - sample.shape[1]))
            feed["task_id"] = torch.tensor(task_id, dtype=torch.int64)
        probes.add("unet", feed)
        return unet(sample, timestep, hidden).sample

    shape = tuple(encoded["target_mean"].shape)
    return sample_latents(record, task, scheduler, text, empty, condition, shape, sampler)
