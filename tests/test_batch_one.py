"""`mtu-export onnx --batch 1`: every graph at fixed shapes taking one row, as NPUs (Qualcomm's QNN) take them; the
guidance batch's conditional and unconditional rows become separate calls, validated like any export, and `generate`
gives the image the dynamic export gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import PROMPT, assert_clean_failure, assert_valid_manifest, invoke
from PIL import Image

from mtu_export.shapes.world import make_example

IMAGE_MAX_DIFF = 1  # uint8 levels: one row per call against whole batches, same graphs otherwise
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="module")
def exports(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch1")
    jobs = {"dynamic": (), "batch1": ("--batch", "1"), "batch1-int8": ("--batch", "1", "--quantize", "static-int8")}
    for name, options in jobs.items():
        result = invoke("onnx", mtu_world, "--task", "edit", *options, "--image-count", "1", "--out", root / name)
        assert result.exit_code == 0, result.output
    return {name: root / name for name in jobs}


def test_every_graph_takes_one_row_at_fixed_shapes(exports):
    for name in ("batch1", "batch1-int8"):
        manifest = json.loads((exports[name] / "manifest.json").read_text())
        assert manifest["export"]["batch"] == 1 and all(row["ok"] for row in manifest["graph_agreement"])
        for component in COMPONENTS:
            graph = onnx.load(str(exports[name] / component / "model.onnx"), load_external_data=False).graph
            for value in graph.input:
                dims = [
                    d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim
                ]
                assert all(isinstance(d, int) and d > 0 for d in dims), (component, value.name, dims)
                assert not dims or value.name in ("timestep", "task_id") or dims[0] == 1, (component, value.name)


def test_generate_gives_the_dynamic_export_s_image(exports, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(make_example("edit", "heldout", 4).source).save(source)
    images = {}
    for name in ("dynamic", "batch1"):
        out = tmp_path / f"{name}.png"
        result = invoke("generate", exports[name], "--task", "edit", "--prompt", PROMPT, "--image", source,
                        "--steps", "3", "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(images["batch1"] - images["dynamic"]).max() <= IMAGE_MAX_DIFF


def test_only_batch_one_is_offered(mtu_world, tmp_path):
    result = invoke("onnx", mtu_world, "--task", "edit", "--batch", "2", "--out", tmp_path / "x")
    assert_clean_failure(result, "--batch 2 is not offered")
    assert not (tmp_path / "x").exists()


def test_manifests_validate_against_the_schema(exports) -> None:
    for folder in exports.values():  # batch-1 fp32 and static int8
        assert_valid_manifest(folder)
