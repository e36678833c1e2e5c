"""`mtu-export coreml --layout apple`: per task, the resource folder that apple/ml-stable-diffusion's Swift package
(`StableDiffusion`) loads, with Apple's file names and Apple's I/O conventions.

    <out>/<task>/Resources/   TextEncoder, Unet, VAEDecoder, VAEEncoder (.mlpackage), vocab.json, merges.txt
    <out>/<task>/README.md    what the Swift side does with this folder (stock pipeline, or what it must add)
    <out>/multifunction/      --task all: the UNets of every task in one multifunction Unet.mlpackage (iOS18)
    <out>/manifest.json

Apple's package loads compiled `.mlmodelc` files, which only macOS makes (`make coreml-resources`). Each Resources
folder is self-contained because Apple's pipeline takes one folder; the text encoder and VAE are the same for every
task, so their packages are hard-linked across task folders (stored once on disk). The multifunction UNet sits
beside them, not inside: Apple's pipeline loads every model with one shared `MLModelConfiguration`, so choosing a
function (`functionName`, iOS18) there would break the single-function text encoder and VAE.

The conventions below are Apple's, read from its sources at APPLE_SOURCE (file:line on each). The UNet wrapper also
converts the model's noise schedule to Apple's: Apple's schedulers are built with scaled-linear betas
0.00085-0.012 over 1000 steps and step on ε (noise) predictions only, whatever the model was trained with. For a
model trained otherwise (the shapes world: v-prediction, zero terminal SNR) the wrapper evaluates the UNet at the
model timestep of the same ᾱ as Apple's timestep and returns ε; for a stock SD 1.x schedule it is a transpose only.

This module owns the conventions, the wrapper modules and the folder writer; conversion, quantization and the op
census are coreml.py's. It must not import train or cli.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtu_export import __version__
from mtu_export.checkpoint import Checkpoint, file_sha256
from mtu_export.config import CoreMLConfig
from mtu_export.errors import ConfigError, MtuError
from mtu_export.export.coreml import (
    CoreMLConverter,
    _attention_census,
    _Converter,
    _quiet_tqdm,
    _row,
    _set_attention,
    agreement_fields,
    convert_module,
    describe_package,
    manifest_tasks,
)
from mtu_export.export.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from mtu_export.export.prepare import Prepared, record_probes
from mtu_export.export.probes import Probes
from mtu_export.export.skeleton import run_export
from mtu_export.quantize import quantize_coreml
from mtu_export.sample import Components
from mtu_export.tasks import Condition, TaskDef, part_channels

logger = logging.getLogger(__name__)

APPLE_SOURCE = "apple/ml-stable-diffusion@e12202c1f6405b83918b58a5d097cd61e3e1f702"
SWIFT = "swift/StableDiffusion/pipeline/"  # paths below are relative to the repository, Swift ones to this folder
TORCH2COREML = "python_coreml_stable_diffusion/torch2coreml.py"


@dataclass(frozen=True)
class Port:
    """One input or output: Core ML array type and shape, with symbolic sizes (`resolve`)."""

    dtype: str  # "float16" | "float32"
    dims: tuple[str | int, ...]

    def resolve(self, sizes: dict[str, int]) -> dict:
        return {"dtype": self.dtype, "shape": [sizes[d] if isinstance(d, str) else d for d in self.dims]}


@dataclass(frozen=True)
class Convention:
    """A package as Apple's Swift pipeline reads it: its file name and its inputs and outputs, in Apple's order."""

    package: str
    inputs: dict[str, Port]
    outputs: dict[str, Port]
    source: str


# Text encoder: one input, float32 token ids (1, tokenizer.model_max_length) (torch2coreml.py:391-401, float32 for
# coremltools issue 1423; inputs typed as traced, :49-56); outputs "last_hidden_state", "pooled_outputs" (:441), float32
# like every output of Apple's converter (:135). TextEncoder.swift:92-100 takes the model's only input, whatever its
# name, fills it with Float32 ids padded to its last dimension (:55-58, :75-82) and reads "last_hidden_state" (:88).
APPLE_TEXT_ENCODER = Convention(
    "TextEncoder",
    {"input_ids": Port("float32", (1, "tokens"))},
    {
        "last_hidden_state": Port("float32", (1, "tokens", "hidden")),
        "pooled_outputs": Port("float32", (1, "hidden")),
    },
    f"{TORCH2COREML}:379-497; {SWIFT}TextEncoder.swift:52-100",
)
# UNet: batch 2 for guidance (torch2coreml.py:824), encoder_hidden_states (B, hidden, 1, tokens) (:846-851; Swift
# transposes (B, tokens, hidden) so, StableDiffusionPipeline.swift:449-463), timestep (B,) (:859-861; Unet.swift:97-103
# sends [t, t] for a batch of 2, else [t]), every input float16 (:980-982); one float32 output "noise_pred" (:988,
# :135), read as the only output (Unet.swift:125-130). The "sample" shape sets the latent shape (Unet.swift:61-70,
# StableDiffusionPipeline.swift:361-370); batch >= 2 is one batched call (:287-293) of rows [negative, prompt]
# (:214-223).
APPLE_UNET = Convention(
    "Unet",
    {
        "sample": Port("float16", ("batch", "in_channels", "latent", "latent")),
        "timestep": Port("float16", ("batch",)),
        "encoder_hidden_states": Port("float16", ("batch", "hidden", 1, "tokens")),
    },
    {"noise_pred": Port("float32", ("batch", "latent_channels", "latent", "latent"))},
    f"{TORCH2COREML}:799-1050; {SWIFT}Unet.swift:61-144",
)
# VAE decoder: input "z" float16 (torch2coreml.py:563-582), the *unscaled* latent (Decoder.swift:47-53 divides by the
# Configuration's decoderScaleFactor first), post_quant_conv + decoder (:594); output "image" float32 (:605, :135) in
# [-1, 1] (:623-624), read as the only output (Decoder.swift:64-68); its one input is taken by position (:74-78).
APPLE_VAE_DECODER = Convention(
    "VAEDecoder",
    {"z": Port("float16", (1, "latent_channels", "latent", "latent"))},
    {"image": Port("float32", (1, 3, "image", "image"))},
    f"{TORCH2COREML}:548-641; {SWIFT}Decoder.swift:40-78",
)
# VAE encoder: input "x" float16 (1, 3, H, W) in [-1, 1] (torch2coreml.py:718-737; Encoder.swift:53-57), encoder +
# quant_conv (:749): output "latent" float32 (:760, :135) = the posterior's mean and log-variance stacked on channels.
# Encoder.swift:64-91 takes the only output, splits channels 0..<4 / 4..<8, samples and multiplies by
# encoderScaleFactor itself.
APPLE_VAE_ENCODER = Convention(
    "VAEEncoder",
    {"x": Port("float16", (1, 3, "image", "image"))},
    {"latent": Port("float32", (1, "moments", "latent", "latent"))},
    f"{TORCH2COREML}:700-796; {SWIFT}Encoder.swift:48-107",
)
APPLE_CONVENTIONS = {c.package: c for c in (APPLE_TEXT_ENCODER, APPLE_UNET, APPLE_VAE_DECODER, APPLE_VAE_ENCODER)}
# The names StableDiffusionPipeline+Resources.swift:28-43 looks for (compiled: .mlmodelc) and the tokenizer files
# it reads (:36-37, :82); VAEEncoder is optional there (:133-139) and written here for image-conditioned use.
APPLE_RESOURCE_FILES = (
    "TextEncoder.mlpackage",
    "Unet.mlpackage",
    "VAEDecoder.mlpackage",
    "VAEEncoder.mlpackage",
    "vocab.json",
    "merges.txt",
)
TOKENIZER_FILES = ("vocab.json", "merges.txt")
BPE_SPECIAL = ("<|startoftext|>", "<|endoftext|>")  # BPETokenizer.swift:19-25 (the pad token too, :36)
# Apple's stock schedulers: scaled-linear betas from 0.00085 to 0.012 over 1000 training steps (Scheduler.swift:
# 165-186, DPMSolverMultistepScheduler.swift:61-82), built with these defaults (StableDiffusionPipeline.swift:233-239)
# and stepping on ε (DPMSolverMultistepScheduler.swift:133-134).
APPLE_TRAIN_STEPS, APPLE_BETA_START, APPLE_BETA_END = 1000, 0.00085, 0.012
APPLE_LATENT_CHANNELS = 4  # Encoder.swift:69-71 reads the mean from channels 0..<4 and the log-variance from 4..<8
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHARED = ("TextEncoder", "VAEDecoder", "VAEEncoder")  # the same for every task


# -------------------------------------------------------------------------------------------- schedule, modules
def apple_alphas_cumprod() -> np.ndarray:
    """ᾱ_t of Apple's stock schedulers, t = 0..999 (Scheduler.swift:175-186)."""
    betas = np.linspace(APPLE_BETA_START**0.5, APPLE_BETA_END**0.5, APPLE_TRAIN_STEPS) ** 2
    return np.cumprod(1.0 - betas)


def model_alphas_cumprod(scheduler) -> np.ndarray:
    """ᾱ_t of the model's own (training) schedule, as its diffusers scheduler computes it (zero-SNR rescaling too)."""
    return np.asarray(scheduler.alphas_cumprod, dtype=np.float64)


def timestep_map(scheduler) -> np.ndarray | None:
    """Per Apple timestep, the model timestep of the same ᾱ (linear interpolation between the model's integer
    timesteps), (1000,); None when the schedules are the same."""
    apple, model = apple_alphas_cumprod(), model_alphas_cumprod(scheduler)
    if len(model) == len(apple) and np.allclose(model, apple, rtol=0, atol=1e-6):
        return None
    steps = np.arange(len(model), dtype=np.float64)
    return np.interp(apple, model[::-1], steps[::-1])  # ᾱ falls with t; np.interp wants a rising xp


def apple_timestep(scheduler, model_timestep: float) -> int:
    """The Apple timestep whose ᾱ is the model's at `model_timestep`: what Apple's scheduler passes at that noise."""
    apple, model = apple_alphas_cumprod(), model_alphas_cumprod(scheduler)
    alpha = np.interp(model_timestep, np.arange(len(model)), model)
    return int(round(float(np.interp(alpha, apple[::-1], np.arange(len(apple), dtype=np.float64)[::-1]))))


class AppleTextEncoder(nn.Module):
    """Float32 token ids, as TextEncoder.swift:79-82 sends them -> (last_hidden_state, pooled_outputs)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = TextEncoderGraph(text_encoder)  # not `graph`: a TorchScript attribute

    def forward(self, input_ids: torch.Tensor):  # (1, L) float -> (1, L, D), (1, D)
        return self.encoder(input_ids.long())


class AppleUNet(nn.Module):
    """A folded task UNet with Apple's UNet I/O: timestep (B,) on Apple's schedule, encoder_hidden_states
    (B, D, 1, L), output ε. The condition channels of an image-conditioned task follow the latent in `sample`."""

    def __init__(self, unet: nn.Module, scheduler) -> None:
        super().__init__()
        self.unet = unet
        self.prediction = scheduler.config.prediction_type
        mapped = timestep_map(scheduler)
        self.plain = mapped is None and self.prediction == "epsilon"  # a stock SD 1.x schedule: nothing to convert
        alphas = apple_alphas_cumprod()
        steps = np.arange(len(alphas)) if mapped is None else mapped
        self.register_buffer("model_timestep", torch.tensor(steps, dtype=torch.float32), persistent=False)
        self.register_buffer("alpha", torch.tensor(np.sqrt(alphas), dtype=torch.float32), persistent=False)
        self.register_buffer("sigma", torch.tensor(np.sqrt(1 - alphas), dtype=torch.float32), persistent=False)

    def forward(self, sample, timestep, encoder_hidden_states):  # (B, C, h, w), (B,), (B, D, 1, L) -> (B, 4, h, w)
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)  # (B, L, D)
        if self.plain:
            return self.unet(sample, timestep, hidden, return_dict=False)[0]
        index = timestep.round().clamp(0, len(self.alpha) - 1).long()  # (B,)
        out = self.unet(sample, self.model_timestep[index], hidden, return_dict=False)[0]  # ε, v or x0
        latent = sample[:, : out.shape[1]]  # x_t; an image-conditioned task's condition channels follow
        alpha, sigma = self.alpha[index][:, None, None, None], self.sigma[index][:, None, None, None]
        if self.prediction == "v_prediction":
            return sigma * latent + alpha * out  # x_t = α·x0 + σ·ε, v = α·ε − σ·x0  =>  ε = σ·x_t + α·v
        if self.prediction == "sample":
            return (latent - alpha * out) / sigma
        return out


def apple_modules(components, unets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every package's torch module, keyed "TextEncoder", "VAEDecoder", "VAEEncoder" and "<task>/Unet". The VAE
    graphs are ours unchanged: Apple's names "z", "x", "image", "latent" are given at conversion."""
    vae = components.vae
    modules = {
        "TextEncoder": AppleTextEncoder(components.text_encoder),
        "VAEDecoder": VaeDecoderGraph(vae),
        "VAEEncoder": VaeEncoderGraph(vae),
    }
    return modules | {f"{task}/Unet": AppleUNet(unet, components.scheduler) for task, unet in unets.items()}


def apple_feeds(probes: dict[str, Probes], scheduler) -> dict[str, list[dict]]:
    """The recorded trajectory inputs (probes.py) in Apple's names and layouts, keyed as `apple_modules`."""
    feeds: dict[str, list[dict]] = {name: [] for name in SHARED}
    for task, probe in probes.items():
        feeds["TextEncoder"] += [{"input_ids": f["input_ids"].float()} for f in probe.feeds["text_encoder"]]
        feeds["VAEEncoder"] += [{"x": f["sample"]} for f in probe.feeds["vae_encoder"]]
        feeds["VAEDecoder"] += [{"z": f["latent_sample"]} for f in probe.feeds["vae_decoder"]]
        feeds[f"{task}/Unet"] = [_unet_feed(f, scheduler) for f in probe.feeds["unet"]]
    return feeds


def _unet_feed(feed: dict, scheduler) -> dict:
    batch = feed["sample"].shape[0]
    return {
        "sample": feed["sample"],  # (B, C, h, w)
        "timestep": torch.full((batch,), float(apple_timestep(scheduler, float(feed["timestep"])))),  # (B,)
        "encoder_hidden_states": feed["encoder_hidden_states"].transpose(1, 2).unsqueeze(2),  # (B, D, 1, L)
    }


# ------------------------------------------------------------------------------------------------- fit and sizes
def apple_sizes(components, task: TaskDef, unet: nn.Module, height: int, factor: int) -> dict[str, int]:
    """The sizes the conventions' symbolic dimensions stand for, for one task's folder."""
    latent_channels = components.vae.config.latent_channels
    return {
        "batch": 3 if task.image_guidance else 2,  # the task's guidance batch (coreml.py's UNet convention)
        "in_channels": unet.config.in_channels,
        "latent_channels": latent_channels,
        "moments": 2 * latent_channels,
        "latent": height // factor,
        "image": height,
        "tokens": components.tokenizer.model_max_length,
        "hidden": components.text_encoder.config.hidden_size,
    }


def check_fits_apple(pipeline_dir: Path, components) -> None:
    """Refuse, in one line listing every reason, a pipeline Apple's Swift package cannot run."""
    problems = []
    channels = components.vae.config.latent_channels
    if channels != APPLE_LATENT_CHANNELS:
        problems.append(f"its VAE has {channels} latent channels; Encoder.swift reads 4 (mean) + 4 (log-variance)")
    scheduler = components.scheduler
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if not hasattr(scheduler, "alphas_cumprod") or prediction not in PREDICTIONS:
        problems.append(
            f"its scheduler ({type(scheduler).__name__}, {prediction}) has no DDPM noise schedule to map onto Apple's"
        )
    problems += _tokenizer_problems(Path(pipeline_dir) / "tokenizer")
    if problems:
        raise ConfigError(f"--layout apple cannot serve {pipeline_dir}: {'; '.join(problems)}; use --layout default")


def _tokenizer_problems(folder: Path) -> list[str]:
    """Apple's BPETokenizer reads vocab.json as {token: id} and merges.txt as `a b` lines, '#' lines skipped
    (BPETokenizer+Reading.swift:13-48), with CLIP's start / end tokens (BPETokenizer.swift:19-25)."""
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        return [f"its tokenizer has no {' or '.join(missing)} (Apple's Swift package reads a CLIP BPE tokenizer)"]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    problems = [f"vocab.json lacks {token}" for token in BPE_SPECIAL if token not in vocab]
    lines = (folder / "merges.txt").read_bytes().split(b"\n")
    bad = [i + 1 for i, line in enumerate(lines) if line and not line.startswith(b"#") and len(line.split(b" ")) != 2]
    return problems + ([f"merges.txt lines {bad[:3]} are not `a b` pairs"] if bad else [])


# ---------------------------------------------------------------------------------------------------- the export
def export_apple(
    checkpoint: Path,
    config: CoreMLConfig,
    out: Path,
    overwrite: bool = False,
    data: dict | None = None,
) -> dict:
    """Write Apple's resource folder per task (and the multifunction UNet for all tasks); check every package's
    spec against Apple's conventions (and, on macOS, its numbers against torch); returns the manifest."""
    return run_export(AppleConverter(config), checkpoint, config, out, overwrite, data)


class AppleConverter(CoreMLConverter):
    """Apple's Swift-package layout as the export skeleton (skeleton.py) runs it: Core ML's options and target,
    Apple's packages."""

    def fits(self, ckpt: Checkpoint, components: Components) -> None:
        check_fits_apple(ckpt.pipeline_dir, components)

    def write(self, job: Prepared, tmp: Path, scratch: Path) -> dict:
        ct, config = self.ct, self.config
        ckpt, tasks, components, sources, unets = job.ckpt, job.tasks, job.components, job.sources, job.unets
        bundled = not config.tasks
        height, _, factor = job.size
        probes = record_probes(config, unets, sources, components)
        attention = _set_attention(config, unets, probes)
        modules, feeds = apple_modules(components, unets), apple_feeds(probes, components.scheduler)
        sizes = {t: apple_sizes(components, sources.tasks[t], unets[t], height, factor) for t in tasks}
        converter = _Converter(ct, config, self.target, tmp)
        packages = _write_packages(converter, tasks, modules, feeds, tmp)
        scaling = float(components.vae.config.scaling_factor)
        resources = {t: _write_task_files(tmp, ckpt.pipeline_dir, sources.tasks[t], sizes[t], scaling) for t in tasks}
        multifunction = _multifunction(converter, tasks, tmp) if bundled else None
        _check_conventions(ct, tmp, tasks, sizes, multifunction)
        described = {name: describe_package(ct, tmp / path) | {"path": path} for name, path in packages.items()}
        agreement = _mac_agreement(ct, tmp, packages, modules, feeds)
        return {
            "format": "mtu-export-coreml-apple/2",
            "layout": "apple",
            "kind": "multifunction" if bundled else "task",
            "tasks": manifest_tasks(ckpt, tasks, bundled),
            "source": {"checkpoint": str(ckpt.path), "sha256": file_sha256(ckpt.path / "mtu_unet.safetensors")},
            "export": config.to_dict() | {"target": self.target},
            "versions": {"mtu_export": __version__, "coremltools": ct.__version__, "torch": torch.__version__},
            "conventions": {
                "source": APPLE_SOURCE,
                "packages": {c.package: c.source for c in APPLE_CONVENTIONS.values()},
            },
            "swift": _swift_settings(components),
            "resources": resources,
            "packages": described,
            "multifunction": multifunction,
            **agreement,
            "attention": attention | {"ops": {t: _attention_census(described[f"{t}/Unet"])["main"] for t in tasks}},
        }


def _write_packages(converter: _Converter, tasks, modules: dict, feeds: dict, tmp: Path) -> dict[str, str]:
    """Convert every package into its task folders; returns package key -> path relative to `tmp`. The shared
    packages are converted once into the first task's folder and hard-linked into the others."""
    first = tmp / tasks[0] / "Resources"
    for task in tasks:
        (tmp / task / "Resources").mkdir(parents=True)
    paths = {}
    for name in SHARED:
        model = _convert(converter, modules[name], feeds[name][0], APPLE_CONVENTIONS[name])
        model.save(str(first / f"{name}.mlpackage"))
        for task in tasks[1:]:
            _link_tree(first / f"{name}.mlpackage", tmp / task / "Resources" / f"{name}.mlpackage")
        paths[name] = f"{tasks[0]}/Resources/{name}.mlpackage"
        logger.info(f"converted {name} (Apple's I/O) -> {paths[name]}")
    for task in tasks:
        key = f"{task}/Unet"
        model = _convert(converter, modules[key], feeds[key][0], APPLE_UNET)
        model.user_defined_metadata["mtu_export.task"] = task
        if converter.config.quantize != "none":
            logger.info(f"quantizing {task} unet: {converter.config.quantize}")
            with _quiet_tqdm():
                model = quantize_coreml(converter.config.quantize, model)
        model.save(str(tmp / task / "Resources" / "Unet.mlpackage"))
        paths[key] = f"{task}/Resources/Unet.mlpackage"
        logger.info(f"converted unet {task} (Apple's I/O, batch {feeds[key][0]['sample'].shape[0]}) -> {paths[key]}")
    return paths


def _write_task_files(tmp: Path, pipeline_dir: Path, task: TaskDef, sizes: dict[str, int], scaling: float) -> dict:
    """The tokenizer files beside the packages (Apple's pipeline reads them from the same folder) and the README."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(pipeline_dir) / "tokenizer" / name, tmp / task.name / "Resources" / name)
    (tmp / task.name / "README.md").write_text(task_readme(task, sizes, scaling))
    return {
        "folder": f"{task.name}/Resources",
        "stock_pipeline": not task.has_image_input,
        "readme": f"{task.name}/README.md",
        "sizes": sizes,
    }


def _convert(converter: _Converter, module: nn.Module, feed: dict, convention: Convention):
    ports = {**convention.inputs, **convention.outputs}
    dtypes = {name: np.dtype(port.dtype).type for name, port in ports.items()}
    model = convert_module(
        converter.ct, module, feed, list(convention.outputs), converter.config, converter.target, dtypes
    )
    model.user_defined_metadata["mtu_export.layout"] = "apple"
    model.user_defined_metadata["mtu_export.apple_convention"] = f"{APPLE_SOURCE} {convention.source}"
    return model


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link a package folder (one copy on disk, each folder self-contained); copy where links are refused."""
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def _multifunction(converter: _Converter, tasks, tmp: Path) -> dict:
    """All tasks' Apple-I/O UNets as one multifunction package (a function per task, shared weights stored once)."""
    folder = tmp / "multifunction"
    folder.mkdir()
    unet = converter._multifunction({t: tmp / t / "Resources" / "Unet.mlpackage" for t in tasks}, folder)
    return {
        "path": f"multifunction/{unet['path']}",
        "functions": unet["functions"],
        "sizes": converter.sizes,
        "load": "the Unet alone, with MLModelConfiguration.functionName = <task> (iOS 18 / macOS 15)",
    }


# -------------------------------------------------------------------------------------------------------- checks
def package_io(ct, path: Path) -> dict[str, dict[str, dict]]:
    """Per function, the inputs and outputs a package's spec declares: {"inputs": {name: {dtype, shape}}, ...}."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    names = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def ports(features) -> dict[str, dict]:
        return {
            f.name: {"dtype": names(f.type.multiArrayType.dataType).lower(), "shape": list(f.type.multiArrayType.shape)}
            for f in features
        }

    described = list(spec.description.functions) or [spec.description]
    return {getattr(d, "name", "") or "main": {"inputs": ports(d.input), "outputs": ports(d.output)} for d in described}


def convention_problems(label: str, io: dict, convention: Convention, sizes: dict[str, int]) -> list[str]:
    """Every way one function's I/O differs from Apple's convention (names, order-free; dtypes; shapes)."""
    problems = []
    for kind in ("inputs", "outputs"):
        want = {name: port.resolve(sizes) for name, port in getattr(convention, kind).items()}
        got = io[kind]
        if set(got) != set(want):
            problems.append(f"{label} {kind} {sorted(got)}, Apple's are {sorted(want)}")
        problems += [f"{label}.{n}: {got[n]}, Apple's is {want[n]}" for n in want if n in got and got[n] != want[n]]
    return problems


def _check_conventions(ct, tmp: Path, tasks, sizes: dict, multifunction: dict | None) -> None:
    """Reload every written package and hold its spec to Apple's conventions; raise once, listing every mismatch."""
    problems = []
    for task in tasks:
        for convention in APPLE_CONVENTIONS.values():
            io = package_io(ct, tmp / task / "Resources" / f"{convention.package}.mlpackage")["main"]
            problems += convention_problems(f"{task}/{convention.package}", io, convention, sizes[task])
    if multifunction is not None:
        for function, io in package_io(ct, tmp / multifunction["path"]).items():
            problems += convention_problems(f"multifunction[{function}]", io, APPLE_UNET, sizes[function])
    if problems:
        raise MtuError(
            f"the packages do not have Apple's I/O: {'; '.join(problems)}; coremltools {ct.__version__} may write "
            "other types than 9.0 does (pip install coremltools==9.0)"
        )


def _mac_agreement(ct, tmp: Path, packages: dict, modules: dict, feeds: dict) -> dict:
    """Run every package on its recorded inputs and compare with its torch module (macOS only: Core ML prediction)."""
    if sys.platform != "darwin":
        return agreement_fields([], "Core ML prediction needs macOS; every package's spec was checked against Apple's")
    rows = []
    for key, path in packages.items():
        model = ct.models.MLModel(str(tmp / path))
        convention = APPLE_CONVENTIONS[key.split("/")[-1]]
        outputs = list(convention.outputs)
        pairs: dict[str, list] = {name: [] for name in outputs}
        for feed in feeds[key]:
            with torch.no_grad():
                reference = modules[key](*feed.values())
            reference = reference if isinstance(reference, tuple) else (reference,)
            got = model.predict({n: v.numpy().astype(convention.inputs[n].dtype) for n, v in feed.items()})
            for name, ref in zip(outputs, reference, strict=True):
                pairs[name].append((ref.numpy(), got[name]))
        rows += [_row(key, name, value) for name, value in pairs.items()]
    return agreement_fields(rows, None)


# ------------------------------------------------------------------------------------------------- what Swift needs
def _swift_settings(components) -> dict:
    """What the Swift app sets in StableDiffusionPipeline.Configuration, and what the UNet did to the schedule."""
    scaling = float(components.vae.config.scaling_factor)
    scheduler = components.scheduler.config
    return {
        # StableDiffusionPipeline.Configuration.swift:53-56 (Apple's default 0.18215 is SD's VAE's, not this one's)
        "encoderScaleFactor": scaling,
        "decoderScaleFactor": scaling,
        "noise_pred": "epsilon on Apple's stock schedule (scaled-linear betas 0.00085-0.012, 1000 steps)",
        "model_schedule": {
            "prediction_type": scheduler.get("prediction_type", "epsilon"),
            "beta_schedule": scheduler.get("beta_schedule"),
            "rescale_betas_zero_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
            "converted_in_unet": timestep_map(components.scheduler) is not None
            or scheduler.get("prediction_type", "epsilon") != "epsilon",
        },
    }


# How each part of a condition (tasks.PARTS) is built, for the Swift side (conditioning.py is the reference
# implementation); `{input}` is the image the VAE encodes
PART_STEPS = {
    "image": (
        "the low-res RGB image itself in [-1, 1] at latent resolution, (1, 3, {latent}, {latent}) "
        "(`planarRGBShapedArray(minValue: -1, maxValue: 1)`); no VAE"
    ),
    "image_latent": (
        "{input}, (1, 3, {image}, {image}), through VAEEncoder; take the posterior *mode*: channels "
        "0..<{latent_channels} of `latent` (the mean), *unscaled* and not sampled (Encoder.swift samples and scales: "
        "skip both)"
    ),
    "mask": "the mask (1 = repaint) resized to {latent}x{latent} (nearest)",
    "masked_latent": (
        "the image with the hole set to 0 in [-1, 1] through VAEEncoder, a posterior *sample* times the scaling "
        "factor {scaling:.6g} (exactly what Encoder.encode(_:scaleFactor:random:) returns)"
    ),
}


def condition_steps(condition: Condition, sizes: dict[str, int], scaling: float) -> str:
    """The UNet's condition channels, part by part with their channel ranges, as the Swift side builds them."""
    latent_channels = sizes["latent_channels"]
    side = sizes["image"]
    upsampled = f"the low-res image upsampled bicubically to {side}x{side}, clamped to [-1, 1]"
    source = "the source image in [-1, 1]" if condition.scale == 1 else upsampled
    steps, start = [], latent_channels
    for part in condition.parts:
        end = start + part_channels(part, latent_channels)
        text = PART_STEPS[part].format(
            input=source, image=sizes["image"], latent=sizes["latent"], latent_channels=latent_channels,
            scaling=scaling,
        )  # fmt: skip
        steps.append(f"channels {start}..<{end}: {text}")
        start = end
    return "; ".join(steps)


def task_readme(task: TaskDef, sizes: dict[str, int], scaling: float) -> str:
    """The task folder's README: how Apple's Swift package runs it, or exactly what it must add."""
    latent, extra = sizes["latent_channels"], sizes["in_channels"] - sizes["latent_channels"]
    head = (
        f"# {task.name}: Core ML resources in the layout of Apple's Swift `StableDiffusion` package\n\n"
        "Compile on macOS first: `make coreml-resources COREML_DIR=<this export>` (xcrun coremlcompiler) writes the "
        "`.mlmodelc` files next to the packages. In `StableDiffusionPipeline.Configuration` set "
        f"`encoderScaleFactor` and `decoderScaleFactor` to {scaling:.6g} (this VAE's; Apple's default is SD's "
        "0.18215). `noise_pred` is ε on Apple's stock noise schedule, so its PNDM and DPM-Solver++ schedulers step "
        "it. Apple's BPETokenizer lower-cases and splits on spaces only (BPETokenizer.swift:94-98), not on "
        "punctuation as CLIP's tokenizer does: keep punctuation apart from words in prompts.\n\n"
    )
    if not task.has_image_input:
        return head + (
            "Apple's stock pipeline loads `Resources/` as it is: `StableDiffusionPipeline(resourcesAt: resources, "
            "controlNet: [], configuration: config, disableSafety: true)` (there is no safety checker).\n"
        )
    steps = condition_steps(task.condition, sizes, scaling)
    batch = sizes["batch"]
    if task.image_guidance:
        guidance = (
            "- Guidance: InstructPix2Pix's three-way guidance, one batch of 3 rows: (prompt, image), (empty prompt, "
            "image), (empty prompt, condition channels zeroed). ε = ε(∅,∅) + s_img·(ε(∅,img) − ε(∅,∅)) + "
            "s_txt·(ε(txt,img) − ε(∅,img)). The stock pipeline sends 2 rows [negative, prompt] "
            "(StableDiffusionPipeline.swift:216-223) and guides two ways (:465-483); `timestep` must be 3 copies of t "
            "(Unet.swift:97-103 only makes 1 or 2).\n"
        )
    else:
        guidance = (
            "- Guidance: text only, the stock two-way guidance on 2 rows [negative, prompt]; the condition channels "
            "are the same in both rows (as StableDiffusionInpaintPipeline).\n"
        )
    return head + (
        f"Apple's stock pipeline cannot run this task as it is: its UNet takes {sizes['in_channels']} input channels "
        f"({latent} latent + {extra} condition), batch {batch}. The Swift side needs:\n\n"
        f"- Latents: draw the initial noise with {latent} channels, not the UNet's {sizes['in_channels']} (the stock "
        "pipeline takes the shape of `sample`, StableDiffusionPipeline.swift:361-370); the scheduler steps these "
        f"{latent} channels with `noise_pred` ({latent} channels) and VAEDecoder decodes them as usual.\n"
        f"- UNet input: before every UNet call, concatenate the condition after the latent on axis 1: `sample` = "
        f"[latent ({latent}), condition ({extra})], the condition built once per image: {steps}.\n"
        + guidance
        + "- No img2img strength: sampling starts from pure noise (the condition carries the input image).\n"
    )
