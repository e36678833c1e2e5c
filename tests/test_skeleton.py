"""The one export skeleton (export/skeleton.py) every format runs: a converter's drifting output refuses the export
and leaves nothing on disk, before the step that needs validated graphs; `--allow-drift` keeps it with a warning;
the ONNX, Core ML and Apple exporters are converters of that skeleton."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from mtu_export.config import CoreMLConfig, ExportConfig, OnnxConfig
from mtu_export.errors import ConfigError, DriftError
from mtu_export.export import skeleton
from mtu_export.export.onnx import OnnxConverter


class _Recording:
    """A converter that writes one file and reports one output at `psnr_db` against a 40 dB floor."""

    config_type = OnnxConfig

    def __init__(self, psnr_db: float):
        self.psnr_db, self.calls = psnr_db, []

    def fits(self, ckpt, components) -> None:
        self.calls.append("fits")

    def write(self, job, tmp: Path, scratch: Path) -> dict:
        self.calls.append(("write", job.tasks))
        (tmp / "graph.bin").write_bytes(b"weights")
        row = {"component": "unet", "task": job.tasks[0], "output": "out_sample", "psnr_db": self.psnr_db}
        row |= {"floor_db": 40.0, "max_abs_diff": 0.5, "ok": self.psnr_db >= 40.0}
        return {"graph_agreement": [row]}

    def after_validation(self, job, tmp: Path, manifest: dict) -> dict:
        self.calls.append("after_validation")
        return manifest | {"after": True}


def test_a_drifting_output_refuses_the_export_and_writes_nothing(mtu_world, tmp_path):
    converter, out = _Recording(psnr_db=12.0), tmp_path / "out"
    with pytest.raises(DriftError, match=r"1 exported output\(s\) drift from torch: unet\[edit\]\.out_sample: 12\.0"):
        skeleton.run_export(converter, mtu_world, OnnxConfig(tasks="edit"), out)
    assert converter.calls == ["fits", ("write", ("edit",))]  # nothing made of unvalidated graphs
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_allow_drift_keeps_the_export_with_a_warning(mtu_world, tmp_path, caplog):
    converter, out = _Recording(psnr_db=12.0), tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="mtu_export"):
        manifest = skeleton.run_export(converter, mtu_world, OnnxConfig(tasks="edit", allow_drift=True), out)
    assert converter.calls[-1] == "after_validation" and manifest["after"] is True
    assert json.loads((out / "manifest.json").read_text()) == manifest and (out / "graph.bin").is_file()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "mtu_export.export.skeleton"]
    assert [r.getMessage()[:58] for r in warned] == ["drift kept (--allow-drift): unet[edit].out_sample: 12.0 dB"]
    assert any(r.getMessage().startswith("folded edit (fold vs routed") for r in caplog.records)  # prepare's line


def test_the_exporters_are_converters_of_the_skeleton():
    from mtu_export.export.apple import AppleConverter
    from mtu_export.export.coreml import CoreMLConverter

    for converter in (OnnxConverter, CoreMLConverter, AppleConverter):
        assert all(callable(getattr(converter, step, None)) for step in ("fits", "write", "after_validation"))
        assert issubclass(converter.config_type, ExportConfig) and converter.config_type is not ExportConfig


@pytest.mark.parametrize("given", [CoreMLConfig(tasks="edit"), ExportConfig(tasks="edit")])
def test_a_converter_refuses_a_config_of_another_kind(mtu_world, tmp_path, given):
    converter, out = _Recording(psnr_db=50.0), tmp_path / "out"
    with pytest.raises(ConfigError, match=f"`mtu-export onnx` takes a OnnxConfig, not a {type(given).__name__}"):
        skeleton.run_export(converter, mtu_world, given, out)
    assert converter.calls == [] and not out.exists()


def test_each_kind_holds_its_own_options_only():
    """What one format reads is not a field of the other's config, so no manifest records the other's options."""
    common = {f.name for f in fields(ExportConfig)}
    onnx = {f.name for f in fields(OnnxConfig)} - common
    coreml = {f.name for f in fields(CoreMLConfig)} - common
    assert {"opset", "dynamo", "optimize", "format", "batch"} <= onnx and {"target", "layout"} <= coreml
    assert not onnx & coreml
    with pytest.raises(TypeError, match="target"):
        OnnxConfig(target="iOS18")
    with pytest.raises(TypeError, match="opset"):
        CoreMLConfig(opset=18)
