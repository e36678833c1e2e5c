"""The MTU checkpoint format: safetensors + JSON, exact round trip, validated against its config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturb_, unet_inputs

from mtu_export.checkpoint import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, load_checkpoint, save_checkpoint
from mtu_export.config import MoEConfig, TaskSpec
from mtu_export.errors import CheckpointError, InputError, OutputExistsError
from mtu_export.upcycle import upcycle_unet


@pytest.fixture
def trained(unet):
    return perturb_(upcycle_unet(unet, MoEConfig(tasks=(TaskSpec("t2i", 4), TaskSpec("edit", 8)), num_experts=2)))


def test_checkpoint_round_trip_is_bit_exact(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.config == trained.config
    want, got = trained.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        for task, channels in (("t2i", 4), ("edit", 8)):
            inputs = unet_inputs(channels)
            assert torch.equal(trained(**inputs, task=task).sample, loaded(**inputs, task=task).sample)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, _ in loaded.trainable_parameters()}


def test_checkpoint_holds_no_pickle(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS]


def test_config_that_disagrees_with_weights_names_the_mismatch(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CHECKPOINT_CONFIG).read_text())
    meta["moe"]["num_experts"] = 4
    (tmp_path / "ckpt" / CHECKPOINT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not match mtu_config.json: .* missing \(e\.g\. .*experts\.2") as err:
        load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


def test_channel_mismatch_is_reported_with_both_shapes(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CHECKPOINT_CONFIG).read_text())
    meta["moe"]["tasks"][1]["in_channels"] = 9
    (tmp_path / "ckpt" / CHECKPOINT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"conv_in\.convs\.edit\.weight: config \[32, 9, 3, 3\], file \[32, 8, 3, 3\]"
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_truncated_weights_are_refused(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / CHECKPOINT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file .*truncated or corrupt"):
        load_checkpoint(tmp_path / "ckpt")


def test_plain_diffusers_folder_is_not_a_checkpoint(unet_dir):
    with pytest.raises(InputError, match="not an MTU checkpoint.*run `mtu-export upcycle` on it first"):
        load_checkpoint(unet_dir)


def test_existing_output_is_kept_without_overwrite(trained, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_checkpoint(trained, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "user data"
    save_checkpoint(trained, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left behind


def _edit_meta(path, edit) -> None:
    meta = json.loads((path / CHECKPOINT_CONFIG).read_text())
    edit(meta)
    (path / CHECKPOINT_CONFIG).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(pipeline="/abs/elsewhere"), "'pipeline' must be a relative folder"),
        (lambda m: m["moe"].update(num_experts=2.7), "num_experts must be an integer, found 2.7"),
        (lambda m: m["moe"]["tasks"][0].update(in_channels=4.7), "in_channels must be an integer"),
        (lambda m: m["moe"].update(num_experts=0), "--experts must be a positive integer"),
        (lambda m: m.pop("unet_config"), "has no 'unet_config' object"),
    ],
    ids=["pipeline path", "float experts", "float channels", "zero experts", "no unet config"],
)
def test_damaged_config_is_a_checkpoint_error(trained, tmp_path, edit, message):
    save_checkpoint(trained, tmp_path / "ckpt")
    _edit_meta(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(tmp_path / "ckpt")
    assert err.value.exit_code == 4


def test_pack_shares_the_base_pipeline_and_casts_to_fp16(trained, pipeline_dir, tmp_path):
    """Shipped checkpoints point at the base pipeline they share ('../shapes-base') instead of copying it."""
    import shutil

    from mtu_export.checkpoint import pack_checkpoint

    shutil.copytree(pipeline_dir, tmp_path / "models" / "base")
    source = save_checkpoint(trained, tmp_path / "full", pipeline_dir=pipeline_dir, extra={"training": {"steps": 3}})
    packed = pack_checkpoint(source, tmp_path / "models" / "mtu", "../base", dtype="fp16")
    assert not (packed / "pipeline").exists()
    loaded = load_checkpoint(packed)
    assert loaded.pipeline_dir.resolve() == (tmp_path / "models" / "base").resolve()
    assert loaded.meta["training"] == {"steps": 3} and loaded.meta["pipeline"] == "../base"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    want = dict(load_checkpoint(source).model.state_dict())
    got = loaded.model.state_dict()
    assert max((want[k].half().float() - got[k].float()).abs().max().item() for k in want) == 0.0
    with pytest.raises(InputError, match="not a pipeline folder"):
        pack_checkpoint(source, tmp_path / "models" / "other", "../missing")
    shutil.rmtree(tmp_path / "models" / "base")
    with pytest.raises(CheckpointError, match="has no model_index.json"):
        load_checkpoint(packed)


def test_trained_only_pack_reads_the_frozen_rest_from_the_shared_unet(pipeline_dir, tmp_path):
    """`pack --trained-only` keeps the experts, routers, task embeddings, LayerNorms and conv_ins; the rest loads,
    bit for bit, from the shared pipeline's UNet, and a changed UNet there is refused instead of silently used."""
    import shutil

    from safetensors import safe_open

    from mtu_export.checkpoint import pack_checkpoint
    from mtu_export.upcycle import load_unet

    config = MoEConfig(tasks=(TaskSpec("t2i", 4), TaskSpec("edit", 8)), num_experts=2)
    model = perturb_(upcycle_unet(load_unet(pipeline_dir), config))
    shutil.copytree(pipeline_dir, tmp_path / "models" / "base")
    source = save_checkpoint(model, tmp_path / "full", pipeline_dir=pipeline_dir)
    full = pack_checkpoint(source, tmp_path / "models" / "full", "../base", dtype="fp16")
    packed = pack_checkpoint(source, tmp_path / "models" / "mtu", "../base", dtype="fp16", trained_only=True)
    with safe_open(str(packed / CHECKPOINT_WEIGHTS), framework="pt") as handle:
        kept = set(handle.keys())
    assert kept == {name for name, _ in model.trainable_parameters()}
    assert (packed / CHECKPOINT_WEIGHTS).stat().st_size < (full / CHECKPOINT_WEIGHTS).stat().st_size / 2
    want, got = load_checkpoint(full).model.state_dict(), load_checkpoint(packed).model.state_dict()
    assert want.keys() == got.keys() and all(
        torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want
    )

    weights = tmp_path / "models" / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of the last weight changed
    with pytest.raises(CheckpointError, match="not the one it was packed against") as err:
        load_checkpoint(packed)
    assert err.value.exit_code == 4
    _edit_meta(packed, lambda m: m["frozen_from_pipeline"].update(dtype="int4"))
    with pytest.raises(CheckpointError, match="needs a shared pipeline and a dtype"):
        load_checkpoint(packed)


def test_trained_only_pack_of_a_full_fine_tune_keeps_everything(pipeline_dir, tmp_path):
    """Tensors that differ from the shared UNet (a full fine-tune changes all of them) are never left out."""
    import shutil

    from safetensors import safe_open

    from mtu_export.checkpoint import pack_checkpoint
    from mtu_export.upcycle import load_unet

    model = upcycle_unet(load_unet(pipeline_dir), MoEConfig(tasks=(TaskSpec("t2i", 4),), num_experts=1))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.125)
    shutil.copytree(pipeline_dir, tmp_path / "models" / "base")
    source = save_checkpoint(model, tmp_path / "full", pipeline_dir=pipeline_dir)
    packed = pack_checkpoint(source, tmp_path / "models" / "single", "../base", trained_only=True)
    with safe_open(str(packed / CHECKPOINT_WEIGHTS), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
    assert "frozen_from_pipeline" not in load_checkpoint(packed).meta
