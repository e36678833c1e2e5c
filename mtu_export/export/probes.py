"""Real inputs for every exported graph, recorded along a task's own sampling trajectory (torch, fp32).

For examples of the task (its prompt and image inputs, from the shapes world or the user's `--data` dataset, at the
export's resolution) the torch sampler runs `steps` guided steps with the folded UNet; every UNet call's inputs are
kept, with the prompt tokens, the VAE encoder's image and the final latent for the decoder. Validation feeds these
to the exported graphs and to the torch modules; static int8 quantization calibrates on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtu_export.bundle import pad_to_channels
from mtu_export.conditioning import image_tensor, mask_tensor, masked_image, tokenize
from mtu_export.config import DataSpec
from mtu_export.data import Source, open_source
from mtu_export.example import Example
from mtu_export.sample import Components, SamplerConfig, sample_latents
from mtu_export.tasks import TaskDef

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


class ExampleSources:
    """Examples to validate and calibrate exports with, per task: a task's `--data` dataset (validation from row 0,
    calibration from row 1) or the shapes world (validation from heldout, calibration from train)."""

    def __init__(self, tasks: dict[str, TaskDef], data: dict[str, DataSpec], size: int, vae_factor: int) -> None:
        self.tasks, self.data, self.size, self.factor = tasks, data, size, vae_factor
        self._open: dict[tuple[str, str], Source] = {}
        for task in tasks:  # open (and so validate) every dataset before any heavy work
            self._source(task, "heldout")

    def _source(self, task: str, split: str) -> Source:
        if task in self.data:
            split = "data"
        if (task, split) not in self._open:
            self._open[task, split] = open_source(self.tasks[task], self.data.get(task), split, self.size, self.factor)
        return self._open[task, split]

    def kind(self, task: str) -> str:
        """Where `task`'s examples come from: "dataset" or "shapes-world"."""
        return "dataset" if task in self.data else "shapes-world"

    def validation(self, task: str, count: int) -> list[Example]:
        return self._take(self._source(task, "heldout"), 0, count)

    def calibration(self, task: str, count: int) -> list[Example]:
        return self._take(self._source(task, "train"), 1 if task in self.data else 0, count)

    @staticmethod
    def _take(source: Source, start: int, count: int) -> list[Example]:
        return [source.example(i % len(source)) for i in range(start, start + count)]


@torch.no_grad()
def trajectory_probes(
    unet,
    task: TaskDef,
    examples: list[Example],
    components: Components,
    sampler: SamplerConfig,
    bundle: tuple[int, int] | None = None,
) -> Probes:
    """Record every graph's inputs for `examples` (one trajectory each) of `task` sampled with `unet`.

    `unet` is the task's folded diffusers UNet; with `bundle` = (task id, channels) the recorded UNet feeds are
    zero-padded to the bundle's channels and carry `task_id` (the trajectory itself is the folded model's, which
    the bundle equals).
    """
    probes = Probes()
    for example in examples:
        ids = tokenize(components.tokenizer, [example.prompt, ""])
        probes.add("text_encoder", {"input_ids": ids[:1]})
        probes.add("text_encoder", {"input_ids": ids[1:]})
        probes.add("vae_encoder", {"sample": _encoder_image(task, example)})
        latents = sample_latents(_recorder(unet, probes, bundle), task, [example], components, sampler)
        probes.add("vae_decoder", {"latent_sample": latents / components.vae.config.scaling_factor})
    return probes


def _encoder_image(task: TaskDef, example: Example) -> torch.Tensor:
    """What the VAE encoder sees for `task`: the source image, the masked image, or the target."""
    image = image_tensor([example.input if task.condition.encodes_input else example.target])  # (1, 3, H, W)
    return masked_image(image, mask_tensor([example.mask])) if task.condition.masked else image


def _recorder(unet, probes: Probes, bundle: tuple[int, int] | None):
    """`unet` as a denoiser that records each call's feeds (padded to the bundle's channels, with its task id)."""

    def record(sample, timestep, hidden):
        feed = {"sample": sample, "timestep": timestep[0].float(), "encoder_hidden_states": hidden}
        if bundle is not None:
            task_id, channels = bundle
            feed["sample"] = pad_to_channels(sample, channels)
            feed["task_id"] = torch.tensor(task_id, dtype=torch.int64)
        probes.add("unet", feed)
        return unet(sample, timestep, hidden).sample

    return record
