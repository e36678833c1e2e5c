"""The task registry and the data seam: declared tasks, user datasets in the formats users have, the world as one
source among others, the on-disk latent cache, mixed precision and gradient checkpointing, and every kind of bad
data refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_clean_failure, invoke
from PIL import Image

from mtu_export.cache import LatentCache, build_cache, encode_rows
from mtu_export.conditioning import tokenize
from mtu_export.config import DataSpec, TaskSpec, TrainConfig
from mtu_export.data import DatasetSource, WorldSource, export_world_dataset, open_source, random_mask
from mtu_export.errors import ConfigError, InputError
from mtu_export.tasks import BUILTIN, parse_tasks, resolve
from mtu_export.train import TaskLoss, build_caches, fit, load_base, make_batches, prepare_model, training_sources

TINY = dict(steps=3, batch_size=8, cache_size=12, checkpoint_every=3, warmup=1, lr=1e-3)
TASKS = ("t2i", "edit", "sr", "inpaint")


# ------------------------------------------------------------------------------------------------------- registry
def test_built_in_tasks_take_their_conventions_channels_and_sr_follows_the_vae():
    assert {s.name: s.in_channels for s in parse_tasks("t2i,edit,sr,inpaint")} == {
        "t2i": 4,
        "edit": 8,
        "sr": 7,
        "inpaint": 9,
    }
    sd15 = {s.name: s.in_channels for s in parse_tasks("sr,colorize:8", latent_channels=4, vae_factor=8)}
    assert sd15 == {"sr": 8, "colorize": 8}  # x4 SR through the latent of the upsampled image, not x8 RGB
    assert resolve(TaskSpec("sr", 8)).condition.name == "low_res_latent"
    assert resolve(TaskSpec("sr", 7)).condition.name == "low_res_rgb"
    colorize = resolve(TaskSpec("colorize", 8))
    assert (colorize.condition.name, colorize.image_guidance, colorize.pipeline) == (
        "source_latent",
        True,
        "StableDiffusionInstructPix2PixPipeline",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("t2i,all:8", "reserved"),
        ("t2i:9", "built-in task 't2i' takes 4 input channels, not 9"),
        ("inpait", "did you mean 'inpaint'"),
        ("depth:x", "channel count must be an integer"),
    ],
)
def test_task_declarations_no_command_could_run_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_tasks(text)


def test_a_declared_task_that_is_not_image_conditioned_is_refused_past_fold():
    with pytest.raises(ConfigError, match="re-upcycle with 'depth:8'"):
        resolve(TaskSpec("depth", 5))


# -------------------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("task", TASKS)
def test_exported_world_dataset_reads_back_as_the_same_examples(task, tmp_path):
    export_world_dataset(tmp_path / task, task, "train", 6)
    data = DatasetSource(BUILTIN[task], DataSpec(task, str(tmp_path / task)), 64, 16)
    world = WorldSource(BUILTIN[task], "train", 64, 16)
    assert len(data) == 6
    for i in range(6):
        a, b = data.example(i), world.example(i)
        assert a.prompt == b.prompt and np.array_equal(a.target, b.target)
        for role in ("source", "low_res"):
            assert (getattr(a, role) is None) == (getattr(b, role) is None)
            assert getattr(a, role) is None or np.array_equal(getattr(a, role), getattr(b, role))
        assert a.mask is None or np.array_equal(a.mask, b.mask)


def _write_photos(folder: Path, count: int, size=(80, 60)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    rng = np.random.default_rng(0)
    for i in range(count):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


@pytest.mark.parametrize("fmt", ["imagefolder-csv", "jsonl", "parquet", "save_to_disk"])
def test_every_supported_format_reads_with_resize_and_centre_crop(fmt, tmp_path):
    import datasets

    names = _write_photos(tmp_path / "photos", 3)
    rows = [{"file_name": n, "text": f"photo {i}"} for i, n in enumerate(names)]
    if fmt == "imagefolder-csv":
        path = tmp_path / "photos"
        (path / "metadata.csv").write_text(
            "file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows)
        )
    elif fmt == "jsonl":
        path = tmp_path / "photos" / "rows.jsonl"
        path.write_text("".join(json.dumps({"image": r["file_name"], "text": r["text"]}) + "\n" for r in rows))
    else:
        table = datasets.Dataset.from_dict(
            {"image": [str(tmp_path / "photos" / n) for n in names], "text": [r["text"] for r in rows]}
        ).cast_column("image", datasets.Image())
        if fmt == "parquet":
            path = tmp_path / "rows.parquet"
            table.to_parquet(str(path))
        else:
            path = tmp_path / "saved"
            table.save_to_disk(str(path))
    source = open_source(BUILTIN["t2i"], DataSpec("t2i", str(path)), "train", 32, 4)
    example = source.example(1)
    assert len(source) == 3 and example.prompt == "photo 1" and example.target.shape == (32, 32, 3)
    original = np.asarray(Image.open(tmp_path / "photos" / names[1]).convert("RGB").resize((42, 32), Image.BICUBIC))
    # shorter side to 32 (the longer to floor(40 * 32 / 30), as diffusers' VaeImageProcessor), the centre 32 columns
    assert np.array_equal(example.target, original[:, 5:37])


def test_sr_derives_its_low_res_input_and_inpaint_draws_random_masks(tmp_path):
    names = _write_photos(tmp_path / "photos", 2, size=(64, 64))
    (tmp_path / "photos" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": "a photo"}) + "\n" for n in names)
    )
    spec = str(tmp_path / "photos")
    sr = open_source(
        resolve(TaskSpec("sr", 8)), DataSpec("sr", spec), "train", 64, 8
    )  # factor-8 VAE: x4 via the latent
    assert sr.example(0).low_res.shape == (16, 16, 3)
    inpaint = open_source(BUILTIN["inpaint"], DataSpec("inpaint", spec), "train", 64, 4)
    masks = [inpaint.example(i).mask for i in range(2)]
    assert all(m.dtype == bool and 0 < m.sum() < m.size for m in masks)
    assert np.array_equal(masks[0], inpaint.example(0).mask)  # seeded by the row: cacheable
    assert random_mask(np.random.default_rng(3), (40, 30)).shape == (30, 40)


# ---------------------------------------------------------------------------------------------------------- cache
def test_cache_shards_match_a_direct_encoding_and_a_resumed_build_reuses_finished_shards(world_pipeline, tmp_path):
    vae, _, tokenizer, _, _ = load_base(world_pipeline)
    source = WorldSource(BUILTIN["inpaint"], "train", 64, 16, count=10)
    cache = build_cache(tmp_path / "c", source, vae, tokenizer, shard_rows=4)
    assert len(cache) == 10 and sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [
        "shard-00000",
        "shard-00001",
        "shard-00002",
    ]
    direct = encode_rows(source, vae, tokenizer, range(0, 10))
    index = torch.tensor([9, 0, 5, 5, 3])
    for key, value in cache.gather(index).items():
        assert np.array_equal(value.numpy(), direct[key][index.numpy()]), key
    stamp = (tmp_path / "c" / "shard-00001" / "input_ids.npy").stat().st_mtime_ns
    (tmp_path / "c" / "meta.json").unlink()  # as if interrupted before the last step
    build_cache(tmp_path / "c", source, vae, tokenizer, shard_rows=4)
    assert (tmp_path / "c" / "shard-00001" / "input_ids.npy").stat().st_mtime_ns == stamp
    other = WorldSource(BUILTIN["inpaint"], "train", 64, 16, count=11)
    with pytest.raises(Exception, match="caches another dataset"):
        build_cache(tmp_path / "c", other, vae, tokenizer, shard_rows=4)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta | {"format": "mtu-export-cache/1"}))
    with pytest.raises(Exception, match="holds a mtu-export-cache/1 cache, this version writes"):
        build_cache(tmp_path / "c", source, vae, tokenizer, shard_rows=4)
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    assert isinstance(LatentCache(tmp_path / "c").gather(torch.tensor([1]))["input_ids"], torch.Tensor)


# ------------------------------------------------------------------------------------------------------- training
def test_training_from_the_exported_world_dataset_gives_identical_losses(world_pipeline, tmp_path):
    data = []
    for task in TASKS:
        export_world_dataset(tmp_path / "data" / task, task, "train", TINY["cache_size"])
        data.append(DataSpec(task, str(tmp_path / "data" / task)))
    built_in = TrainConfig(**TINY)
    from_disk = TrainConfig(**TINY, data=tuple(data))
    a, _ = fit(built_in, world_pipeline, tmp_path / "w1")
    b, _ = fit(from_disk, world_pipeline, tmp_path / "w2")
    log_a = [json.loads(line) for line in (tmp_path / "w1" / "train-log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "w2" / "train-log.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in row.items() if k.startswith("loss")} for row in log_a]
    assert losses == [{k: v for k, v in row.items() if k.startswith("loss")} for row in log_b]
    assert {"loss_t2i", "loss_edit", "loss_sr", "loss_inpaint"} <= losses[-1].keys()
    wa, wb = a.state_dict(), b.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_mixed_precision_trains_on_cpu(world_pipeline, tmp_path):
    config = TrainConfig(**{**TINY, "steps": 2}, mixed_precision="bf16")
    mtu, progress = fit(config, world_pipeline, tmp_path / "w")
    log = [json.loads(line) for line in (tmp_path / "w" / "train-log.jsonl").read_text().splitlines()]
    assert progress["step"] == 2 and np.isfinite(log[-1]["loss"])
    assert any(p.dtype == torch.float32 for p in mtu.parameters())  # autocast: weights stay fp32


def test_gradient_checkpointing_gives_the_same_gradients(world_pipeline, tmp_path):
    config = TrainConfig(**TINY)
    vae, text_encoder, tokenizer, unet, scheduler = load_base(world_pipeline)
    from mtu_export.loop import process_state

    caches = build_caches(tmp_path / "w", training_sources(config, world_pipeline), vae, tokenizer, process_state())
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = prepare_model(TrainConfig(**TINY, gradient_checkpointing=checkpointing), load_base(world_pipeline)[3])
        loss_model = TaskLoss(model, 0.0, scheduler).train()
        generator = torch.Generator().manual_seed(1)
        args = (text_encoder, tokenize(tokenizer, [""]), scheduler, vae.config.scaling_factor, generator)
        loss, _ = loss_model(make_batches(config, caches, *args, torch.device("cpu")))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ bad data
def _bad(tmp_path: Path, kind: str) -> tuple[str, Path]:
    """A dataset folder with one kind of defect, and the task it is given for."""
    folder = tmp_path / kind
    names = _write_photos(folder, 2, size=(64, 64))
    rows = [{"file_name": n, "text": "a photo"} for n in names]
    task = "t2i"
    if kind == "missing-column":
        rows = [{"file_name": n, "caption": "a photo"} for n in names]
    elif kind == "corrupt-image":
        (folder / names[1]).write_bytes(b"not a png at all")
        rows[1]["image"] = rows[1].pop("file_name")
        path = folder / "rows.jsonl"
        path.write_text(
            "".join(json.dumps({"image": r.get("image", r.get("file_name")), "text": "x"}) + "\n" for r in rows)
        )
        return task, path
    elif kind == "empty":
        path = folder / "rows.jsonl"
        path.write_text("")
        return task, path
    elif kind in ("mask-not-binary", "mask-wrong-size"):
        task = "inpaint"
        mask = np.zeros((64, 64), np.uint8)
        mask[10:20, 10:20] = 128 if kind == "mask-not-binary" else 255
        if kind == "mask-wrong-size":
            mask = mask[:32]
        Image.fromarray(mask).save(folder / "mask.png")
        rows = [dict(r, mask_file_name="mask.png") for r in rows]
    elif kind == "edit-sizes-differ":
        task = "edit"
        _write_photos(folder / "small", 1, size=(32, 32))
        rows = [
            {"input_image_file_name": "small/0.png", "edited_image_file_name": n, "edit_prompt": "x"} for n in names
        ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task, folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing-column", "has no column(s) text; found: image, caption"),
        ("corrupt-image", "row 1 column 'image'"),
        ("empty", "is empty; it needs at least one row"),
        ("mask-not-binary", "is not binary"),
        ("mask-wrong-size", "masks must match their image's size"),
        ("edit-sizes-differ", "edit pairs must have the same size"),
    ],
)
def test_bad_data_is_refused_in_one_line_and_nothing_is_written(kind, message, world_pipeline, tmp_path):
    task, path = _bad(tmp_path, kind)
    out, work = tmp_path / "out", tmp_path / "work"
    result = invoke(
        "train", world_pipeline, "--out", out, "--work", work, "--single-task", task, "--data", f"{task}={path}",
        "--steps", "1", "--batch-size", "2",
    )  # fmt: skip
    assert_clean_failure(result, message)
    assert not out.exists() and not work.exists()


def test_data_for_a_task_the_checkpoint_lacks_is_refused(world_pipeline, tmp_path):
    export_world_dataset(tmp_path / "edit", "edit", "train", 2)
    ckpt = tmp_path / "t2i-only"
    assert invoke("upcycle", world_pipeline, "--out", ckpt, "--tasks", "t2i").exit_code == 0
    for command in (["onnx", ckpt, "--out", tmp_path / "o"], ["eval", ckpt, "--count", "1"]):
        assert_clean_failure(invoke(*command, "--data", f"edit={tmp_path / 'edit'}"), "lacks", exit_code=3)
        assert not (tmp_path / "o").exists()


def test_a_declared_task_without_data_is_refused_up_front(world_pipeline, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert invoke("upcycle", world_pipeline, "--out", ckpt, "--tasks", "t2i,colorize:8").exit_code == 0
    result = invoke("onnx", ckpt, "--task", "colorize", "--out", tmp_path / "o")
    assert_clean_failure(result, "pass --data colorize=DATASET", exit_code=3)
    result = invoke(
        "train", world_pipeline, "--tasks", "t2i,colorize:8", "--out", tmp_path / "t", "--work", tmp_path / "w"
    )
    assert_clean_failure(result, "pass --data colorize=DATASET", exit_code=3)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_missing_dataset_path_is_an_input_error():
    with pytest.raises(InputError, match="does not exist"):
        open_source(BUILTIN["t2i"], DataSpec("t2i", "/nonexistent/data"), "train", 64, 4)


def test_fold_refuses_a_pipeline_label_no_class_would_run(world_pipeline, unet_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert invoke("upcycle", world_pipeline, "--out", ckpt, "--tasks", "t2i,depth:5").exit_code == 0
    assert_clean_failure(invoke("fold", ckpt, "--task", "depth", "--out", tmp_path / "f"), "depth:8", exit_code=3)
    assert not (tmp_path / "f").exists()
    bare = tmp_path / "bare"
    assert invoke("upcycle", unet_dir, "--out", bare, "--tasks", "t2i,depth:5").exit_code == 0
    assert invoke("fold", bare, "--task", "depth", "--out", tmp_path / "unet").exit_code == 0
    assert (tmp_path / "unet" / "config.json").is_file()


def test_sr_of_an_sdxl_base_has_no_class_and_is_refused():
    from mtu_export.tasks import pipeline_class

    assert pipeline_class(BUILTIN["t2i"], "StableDiffusionXLPipeline") == "StableDiffusionXLPipeline"
    assert pipeline_class(BUILTIN["edit"], "StableDiffusionXLPipeline") == "StableDiffusionXLInstructPix2PixPipeline"
    with pytest.raises(ConfigError, match="no pipeline class runs a folded 'sr'"):
        pipeline_class(BUILTIN["sr"], "StableDiffusionXLPipeline")


def test_column_overrides_map_a_users_names_onto_roles(tmp_path):
    from mtu_export.data import parse_data

    names = _write_photos(tmp_path / "photos", 2, size=(64, 64))
    rows = "".join(json.dumps({"file_name": n, "caption": f"photo {i}"}) + "\n" for i, n in enumerate(names))
    (tmp_path / "photos" / "metadata.jsonl").write_text(rows)
    specs = parse_data([f"t2i={tmp_path / 'photos'}"], ["t2i.prompt=caption"])
    assert open_source(BUILTIN["t2i"], specs["t2i"], "train", 64, 4).example(1).prompt == "photo 1"
    with pytest.raises(ConfigError, match="unknown role"):
        open_source(BUILTIN["t2i"], DataSpec("t2i", str(tmp_path / "photos"), {"caption": "x"}), "train", 64, 4)
    with pytest.raises(ConfigError, match="which has no --data"):
        parse_data([], ["t2i.prompt=caption"])


def test_eval_of_t2i_on_a_users_images_is_refused(world_pipeline, tmp_path):
    export_world_dataset(tmp_path / "t2i", "t2i", "heldout", 2)
    ckpt = tmp_path / "ckpt"
    assert invoke("upcycle", world_pipeline, "--out", ckpt, "--tasks", "t2i").exit_code == 0
    result = invoke("eval", ckpt, "--task", "t2i", "--data", f"t2i={tmp_path / 't2i'}", "--count", "1")
    assert_clean_failure(result, "text-to-image has no reference metric", exit_code=3)


def test_world_export_through_the_cli_starts_where_asked(tmp_path):
    out = tmp_path / "edit"
    result = invoke("world", "--export-dataset", out, "--task", "edit", "--count", "2", "--start", "5")
    assert result.exit_code == 0, result.output
    data = DatasetSource(BUILTIN["edit"], DataSpec("edit", str(out)), 64, 16)
    assert len(data) == 2 and data.example(0).prompt == WorldSource(BUILTIN["edit"], "train", 64, 16).example(5).prompt
    assert_clean_failure(invoke("world", "--export-dataset", out, "--task", "edit"), "exists", exit_code=5)
    assert_clean_failure(invoke("world", "--task", "edit"), "--out PNG", exit_code=3)
