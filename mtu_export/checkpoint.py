"""The MTU checkpoint on disk: its format, writing, loading with name and shape checks, packing for shipping, the
`mtu-export upcycle` command that writes one, and the frozen pipeline components a checkpoint points at.

A checkpoint folder holds `mtu_config.json` (format, MoE config, the base UNet's diffusers config, provenance),
`mtu_unet.safetensors` and, unless it shares one by reference, the base pipeline's other components. A checkpoint
packed with `trained_only` keeps only the tensors training changed: the frozen rest is read, bit for bit, from the
UNet of the pipeline it shares, whose weights' SHA-256 it records (`frozen_from_pipeline`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from mtu_export import __version__
from mtu_export.config import MoEConfig
from mtu_export.errors import CheckpointError, ConfigError, InputError
from mtu_export.moe import MTUUNet
from mtu_export.sample import Components
from mtu_export.storage import (
    CHECKPOINT_CONFIG,
    PIPELINE_INDEX,
    atomic_output,
    check_safetensors,
    link_or_copy_tree,
    locate_unet,
    read_json,
    refuse_pickles,
    refuse_pipeline_pickles,
    unet_weights,
    write_json,
)
from mtu_export.upcycle import load_unet, upcycle_unet

CHECKPOINT_WEIGHTS = "mtu_unet.safetensors"
CHECKPOINT_PIPELINE = "pipeline"
CHECKPOINT_FORMAT = "mtu-export-checkpoint/1"
PACK_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Checkpoint:
    """An MTU checkpoint loaded from disk: the model and where its frozen pipeline components live (if any)."""

    model: MTUUNet
    path: Path
    pipeline_dir: Path | None
    meta: dict


def save_checkpoint(
    mtu: MTUUNet,
    out: Path,
    pipeline_dir: Path | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
    pipeline_ref: str | None = None,
    omit: frozenset[str] = frozenset(),
) -> Path:
    """Write `mtu_config.json` + `mtu_unet.safetensors` (+ the frozen pipeline components) atomically.

    With `pipeline_ref` (a path relative to `out`, e.g. '../shapes-base') the checkpoint points at a pipeline
    folder it shares with others instead of holding a copy. Tensors named in `omit` are left out of the weights
    file (`pack_checkpoint` omits those the shared pipeline's UNet holds; `extra` must then say so)."""
    out = Path(out)
    with atomic_output(out, [pipeline_dir], overwrite) as tmp:
        write_checkpoint(mtu, tmp, out, pipeline_dir, extra, pipeline_ref, omit)
    return out


def write_checkpoint(
    mtu: MTUUNet,
    folder: Path,
    out: Path,
    pipeline_dir: Path | None = None,
    extra: dict | None = None,
    pipeline_ref: str | None = None,
    omit: frozenset[str] = frozenset(),
) -> None:
    """save_checkpoint's files, written into `folder`: the temporary folder that becomes `out` (storage.
    atomic_output), where `pipeline_ref` is resolved."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in mtu.state_dict().items() if k not in omit}
    save_file(state, str(folder / CHECKPOINT_WEIGHTS), metadata={"format": CHECKPOINT_FORMAT})
    if pipeline_ref is not None:
        shared = Path(os.path.normpath(Path(out) / pipeline_ref))  # `out` itself does not exist yet
        if not (shared / PIPELINE_INDEX).is_file():
            raise InputError(f"{shared} is not a pipeline folder; --pipeline-ref is relative to --out")
    elif pipeline_dir is not None:
        link_or_copy_tree(Path(pipeline_dir), folder / CHECKPOINT_PIPELINE, skip=("unet",))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "mtu_export_version": __version__,
        "moe": mtu.config.to_dict(),
        "unet_config": {k: v for k, v in mtu.unet.config.items() if not k.startswith("_")},
        "pipeline": pipeline_ref or (CHECKPOINT_PIPELINE if pipeline_dir is not None else None),
        **(extra or {}),
    }
    write_json(folder / CHECKPOINT_CONFIG, meta)


def load_checkpoint(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Load an MTU checkpoint folder, validating its config against the weights' names and shapes."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} does not exist or is not a folder; pass a folder written by `mtu-export upcycle`")
    if not (path / CHECKPOINT_CONFIG).is_file():
        hint = " (it is a plain diffusers folder: run `mtu-export upcycle` on it first)" if _is_diffusers(path) else ""
        raise InputError(f"{path} is not an MTU checkpoint: no {CHECKPOINT_CONFIG}{hint}")
    meta = read_json(path / CHECKPOINT_CONFIG)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path / CHECKPOINT_CONFIG} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}; "
            "re-run `mtu-export upcycle` with this version"
        )
    config = _checkpoint_moe(meta, path)
    ref = meta.get("pipeline")
    if ref is not None and (not isinstance(ref, str) or not ref or Path(ref).is_absolute()):
        raise CheckpointError(
            f"{path / CHECKPOINT_CONFIG}: 'pipeline' must be a relative folder ({CHECKPOINT_PIPELINE!r}, or a shared "
            f"one such as '../shapes-base') or null, found {ref!r}; restore the file or re-run `mtu-export upcycle`"
        )
    if not isinstance(meta.get("unet_config"), dict):
        raise CheckpointError(
            f"{path / CHECKPOINT_CONFIG} has no 'unet_config' object; restore the file or re-run `mtu-export upcycle`"
        )
    pipeline = path / meta["pipeline"] if meta.get("pipeline") else None
    if pipeline is not None and not (pipeline / PIPELINE_INDEX).is_file():
        raise CheckpointError(
            f"the checkpoint's pipeline {ref!r} ({pipeline}) has no {PIPELINE_INDEX}; the checkpoint was copied "
            "incompletely or without the pipeline folder it shares"
        )
    if pipeline is not None:
        refuse_pipeline_pickles(pipeline)  # before anything downstream loads or copies a component
    shapes = check_safetensors(path / CHECKPOINT_WEIGHTS)
    with torch.device("meta"):
        model = build_skeleton(meta["unet_config"], config)
    state = read_safetensors(path / CHECKPOINT_WEIGHTS)
    if meta.get("frozen_from_pipeline") is not None:
        frozen = _frozen_from_pipeline(meta, pipeline, set(model.state_dict()) - set(shapes), path)
        shapes |= {k: (list(v.shape), "") for k, v in frozen.items()}
        state |= frozen
    _check_state_shapes(model, shapes, path)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(dtype) if dtype is not None else model
    return Checkpoint(model.eval().freeze_(), path, pipeline, meta)


def pack_checkpoint(
    source: Path,
    out: Path,
    pipeline_ref: str,
    dtype: str = "fp16",
    overwrite: bool = False,
    trained_only: bool = False,
) -> Path:
    """Re-save a checkpoint for shipping: weights cast to `dtype`, the pipeline shared by reference.

    With `trained_only`, every tensor that equals (bit for bit, in `dtype`) its counterpart in the shared pipeline's
    UNet is left out, and loading reads it from there: for an MTU trained with the paper's split that is everything
    but the experts, routers, task embeddings, task LayerNorms and conv_ins (about a sixth of the UNet)."""
    if dtype not in PACK_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(PACK_DTYPES)}, got {dtype!r}")
    out = Path(out)
    shared = Path(os.path.normpath(out / pipeline_ref))  # the pipeline the packed checkpoint will read
    with atomic_output(out, [source, shared], overwrite) as tmp:
        ckpt = load_checkpoint(Path(source), dtype=PACK_DTYPES[dtype])
        own = ("format", "mtu_export_version", "moe", "unet_config", "pipeline", "frozen_from_pipeline")
        extra = {k: v for k, v in ckpt.meta.items() if k not in own}
        omit: frozenset[str] = frozenset()
        if trained_only:
            if not (shared / PIPELINE_INDEX).is_file():
                raise InputError(f"{shared} is not a pipeline folder; --pipeline-ref is relative to --out")
            omit = _unchanged_from_base(ckpt.model, shared, PACK_DTYPES[dtype])
        if omit:  # a full fine-tune changed every tensor: nothing to read from the pipeline, nothing to check there
            digest = _unet_digest(shared)
            extra["frozen_from_pipeline"] = {"unet_sha256": digest, "dtype": dtype, "tensors": len(omit)}
        write_checkpoint(ckpt.model, tmp, out, extra=extra, pipeline_ref=pipeline_ref, omit=omit)
    return out


def _base_state(pipeline: Path) -> dict[str, torch.Tensor]:
    """The pipeline UNet's tensors under the names the MTU model gives them ('unet.' + the diffusers name)."""
    files = unet_weights(locate_unet(pipeline).unet_dir)
    return {f"unet.{k}": v for f in files for k, v in read_safetensors(f).items()}


def _unet_digest(pipeline: Path) -> str:
    """One SHA-256 over the SHA-256s of a UNet's (or a pipeline's UNet's) weight files."""
    files = unet_weights(locate_unet(pipeline).unet_dir)
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _unchanged_from_base(model: MTUUNet, pipeline: Path, dtype: torch.dtype) -> frozenset[str]:
    base = _base_state(pipeline)
    trained = {name for name, _ in model.trainable_parameters()}
    return frozenset(
        k
        for k, v in model.state_dict().items()
        if k not in trained and k in base and base[k].shape == v.shape and torch.equal(base[k].to(dtype), v)
    )


def _frozen_from_pipeline(meta: dict, pipeline: Path | None, missing: set[str], path: Path) -> dict[str, torch.Tensor]:
    """The tensors a trained-only checkpoint leaves to its pipeline's UNet, after checking it is the one packed."""
    record = meta["frozen_from_pipeline"]
    repack = "restore that UNet, or re-pack the checkpoint from its full training run without --trained-only"
    if pipeline is None or not isinstance(record, dict) or record.get("dtype") not in PACK_DTYPES:
        raise CheckpointError(
            f"{path / CHECKPOINT_CONFIG}: 'frozen_from_pipeline' needs a shared pipeline and a dtype; "
            "restore the file or re-pack the checkpoint"
        )
    if _unet_digest(pipeline) != record.get("unet_sha256"):
        raise CheckpointError(
            f"{path} keeps only its trained tensors, and the UNet of its pipeline {pipeline} is not the one it was "
            f"packed against (SHA-256 differs); {repack}"
        )
    base = _base_state(pipeline)
    dtype = PACK_DTYPES[record["dtype"]]
    absent = sorted(k for k in missing if k not in base)
    if absent or len(missing) != record.get("tensors"):
        raise CheckpointError(
            f"{path / CHECKPOINT_WEIGHTS} lacks {len(missing)} tensors (the config says {record.get('tensors')}), "
            f"{len(absent)} of them not in the pipeline's UNet (e.g. {(absent or ['-'])[0]}); {repack}"
        )
    return {k: base[k].to(dtype) for k in missing}


def _checkpoint_moe(meta: dict, path: Path) -> MoEConfig:
    """The checkpoint's MoE section; any defect in it is a damaged checkpoint (exit 4), not a user option error."""
    try:
        return MoEConfig.from_dict(meta.get("moe", {}))
    except ConfigError as exc:
        raise CheckpointError(f"{path / CHECKPOINT_CONFIG}: {exc}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each in its own allocation (a shared, unaligned buffer changes CPU kernels
    and hence the last bits of outputs; per-tensor reads keep a reload bit-identical to the saved model)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name).clone() for name in handle.keys()}


def build_skeleton(unet_config: dict, config: MoEConfig) -> MTUUNet:
    """An MTU UNet of the right structure with untrained weights (use under torch.device('meta'))."""
    try:
        base = UNet2DConditionModel.from_config(unet_config)
    except Exception as exc:  # diffusers raises many types for a bad config
        raise CheckpointError(f"the checkpoint's unet_config does not build a UNet2DConditionModel: {exc}") from None
    return upcycle_unet(base, config)


def _check_state_shapes(model: MTUUNet, shapes: dict[str, tuple[list[int], str]], path: Path) -> None:
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k][0])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with another shape (e.g. {k}: config {expected[k]}, file {shapes[k][0]})")
        raise CheckpointError(
            f"{path} weights do not match {CHECKPOINT_CONFIG}: {'; '.join(parts)}; "
            "the two files come from different models — re-run `mtu-export upcycle`"
        )


def _is_diffusers(path: Path) -> bool:
    return (path / PIPELINE_INDEX).is_file() or (path / "config.json").is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------- command
def upcycle_folder(source: Path, out: Path, config: MoEConfig, overwrite: bool = False) -> Checkpoint:
    """`mtu-export upcycle`: a diffusers UNet or pipeline folder -> an MTU checkpoint folder."""
    located = locate_unet(Path(source))
    if located.pipeline_dir is not None:
        refuse_pipeline_pickles(located.pipeline_dir)  # its components are copied into the checkpoint
    out = Path(out)
    with atomic_output(out, [located.pipeline_dir or located.unet_dir], overwrite) as tmp:  # before the heavy load
        base = load_unet(Path(source))
        mtu = upcycle_unet(base, config)
        del base
        extra = {"source": {"path": str(Path(source).resolve()), "unet_sha256": _unet_digest(located.unet_dir)}}
        write_checkpoint(mtu, tmp, out, located.pipeline_dir, extra=extra)
    pipeline = out / CHECKPOINT_PIPELINE if located.pipeline_dir else None
    return Checkpoint(mtu, out, pipeline, read_json(out / CHECKPOINT_CONFIG))


# ------------------------------------------------------------------------------------------- pipeline components
def load_components(pipeline_dir: Path) -> Components:
    """The frozen VAE, text encoder, tokenizer and scheduler of a pipeline folder (fp32), each by the class its
    config names; weights from safetensors only."""
    import json

    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline_dir = Path(pipeline_dir)
    refuse_pickles(pipeline_dir / "vae", pipeline_dir / "text_encoder")
    safe = dict(use_safetensors=True, local_files_only=True)
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(pipeline_dir / "vae", torch_dtype=torch.float32, **safe)
        text_encoder = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", dtype=torch.float32, **safe)
        tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer", local_files_only=True)
        scheduler_config = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    except Exception as exc:  # a missing or broken component
        raise InputError(f"could not load the components of {pipeline_dir}: {str(exc).splitlines()[0]}") from None
    return Components(vae.eval(), text_encoder.eval(), tokenizer, scheduler)
