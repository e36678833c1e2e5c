"""Plain helpers the test modules share: the CLI runner and its failure check, tiny UNet inputs, a training-like
perturbation. Fixtures live in conftest.py; this module holds what tests call directly."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import torch
from typer.testing import CliRunner

from mtu_export.cli import app
from mtu_export.moe import MTUUNet
from mtu_export.shapes.tiny import CROSS_DIM

runner = CliRunner()
FAST = ("--image-count", "1")  # export options: validate one image per task instead of the default count
PROMPT = "a large red circle in the middle on a white background"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


MANIFEST_SCHEMA = Path(__file__).resolve().parents[1] / "mtu_export" / "export" / "manifest.schema.json"


def assert_valid_manifest(folder: Path) -> dict:
    """The folder's manifest.json validates against the committed JSON Schema (every error listed); returns it."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    validator = jsonschema.Draft202012Validator(json.loads(MANIFEST_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message[:200]}" for e in validator.iter_errors(manifest)]
    assert not errors, f"{folder}/manifest.json: {errors}"
    return manifest


def assert_clean_failure(result, pattern: str, exit_code: int | None = None) -> None:
    assert result.exit_code != 0, result.output
    if exit_code is not None:
        assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # the progress lines logged before it, then the one error line
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert pattern in errors[0], errors[0]


def unet_inputs(in_channels: int = 4, batch: int = 2, size: int = 16, seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, in_channels, size, size, generator=g).to(dtype),
        timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, 7, CROSS_DIM, generator=g).to(dtype),
    )


@torch.no_grad()
def perturb_(mtu: MTUUNet, seed: int = 0, scale: float = 0.3) -> MTUUNet:
    """Move every trainable parameter as training would, so routing becomes non-uniform and tasks differ."""
    g = torch.Generator().manual_seed(seed)
    for _, param in mtu.trainable_parameters():
        noise = torch.randn(param.shape, generator=g).to(param.dtype)
        param.add_(noise * scale * (param.std() if param.numel() > 1 and param.std() > 0 else 1.0))
    return mtu
