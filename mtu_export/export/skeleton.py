"""The one export skeleton every format runs (ONNX, Core ML, Apple's layout): prepare (every refusal before heavy
work, fold, examples) → in a temporary output folder, the format's converter writes its graphs, validates them on
trajectory probes and returns the manifest → the manifest written → drift refused (nothing written) → the
converter's step after validation (ONNX Runtime Mobile files) → the folder renamed into place."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Protocol

from mtu_export.checkpoint import Checkpoint
from mtu_export.config import ExportConfig
from mtu_export.errors import DriftError
from mtu_export.export.prepare import Prepared, prepare_export, require_kind
from mtu_export.sample import Components
from mtu_export.storage import atomic_output, write_json

MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)


class Converter(Protocol):
    """What the skeleton is handed: one format's conversion."""

    config_type: type[ExportConfig]  # OnnxConfig or CoreMLConfig: the options it reads

    def fits(self, ckpt: Checkpoint, components: Components) -> None:
        """Refuse (ConfigError) a checkpoint the format cannot hold, before heavy work."""

    def write(self, job: Prepared, tmp: Path, scratch: Path) -> dict:
        """Write and validate the graphs into `tmp` (`scratch`: files that are not kept); the manifest, its
        `graph_agreement` rows each with `component`, `output`, `psnr_db` and `ok`."""

    def after_validation(self, job: Prepared, tmp: Path, manifest: dict) -> dict:
        """What is made of validated graphs only; the manifest, updated."""


def run_export(
    converter: Converter,
    checkpoint: Path,
    config: ExportConfig,
    out: Path,
    overwrite: bool = False,
    data: dict | None = None,
) -> dict:
    """Export `checkpoint` to `out` with `converter` (see the module docstring); returns the manifest. Raises
    DriftError listing every drifting output, unless `config.allow_drift`."""
    require_kind(config, converter.config_type)
    reads = [checkpoint, *(spec.path for spec in (data or {}).values())]
    with atomic_output(Path(out), reads, overwrite) as tmp:  # refused before any loading if it overlaps or exists
        job = prepare_export(checkpoint, config, data, converter.fits)
        with tempfile.TemporaryDirectory(prefix=f"mtu-{converter.config_type.command}-") as scratch:
            manifest = converter.write(job, tmp, Path(scratch))
            write_json(tmp / MANIFEST, manifest)
            raise_on_drift(manifest["graph_agreement"], config.allow_drift)
            manifest = converter.after_validation(job, tmp, manifest)
            write_json(tmp / MANIFEST, manifest)
    return manifest


def describe_row(row: dict) -> str:
    """One agreement row as a refusal lists it."""
    where = f"{row['component']}[{row['task']}]" if row.get("task") else row["component"]
    psnr = "exact" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB"
    floor = f" (floor {row['floor_db']:.0f} dB)" if row.get("floor_db") is not None else ""
    return f"{where}.{row['output']}: {psnr}{floor}, max |diff| {row['max_abs_diff']:.3g}"


def raise_on_drift(rows: list[dict], allow_drift: bool) -> None:
    """A DriftError naming every output under its floor (the output folder is then not written); with
    `allow_drift`, a warning per kept output instead."""
    failed = [r for r in rows if not r["ok"]]
    if failed and not allow_drift:
        listed = "; ".join(describe_row(r) for r in failed)
        raise DriftError(
            f"{len(failed)} exported output(s) drift from torch: {listed}; nothing was written "
            "(pass --allow-drift to keep such an export)"
        )
    for row in failed:
        logger.warning(f"drift kept (--allow-drift): {describe_row(row)}")
