"""The base-model recipe on a tiny scale: the world tokenizer, resumable training, and a pipeline that plain
diffusers loads and runs. (The shipped model itself is checked in test_shipped_model.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import assert_clean_failure, invoke

from mtu_export.config import BaseRecipe
from mtu_export.shapes.pretrain import load_recipe, train_vae
from mtu_export.shapes.tiny import TINY_RECIPE
from mtu_export.shapes.vocab import MAX_LENGTH, world_tokenizer, world_words
from mtu_export.shapes.world import TASKS, make_example


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return world_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


def test_every_world_word_is_one_token_and_prompts_fit(tokenizer):
    for word in world_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
    for task in TASKS:
        for index in range(200):
            prompt = make_example(task, "heldout", index).prompt
            ids = tokenizer(prompt).input_ids
            assert len(ids) <= MAX_LENGTH
            assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == prompt


def test_unknown_words_fall_back_to_bytes_not_unk(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a zebra", add_special_tokens=False).input_ids)
    assert tokens == ["a</w>", "z", "e", "b", "r", "a</w>"]


def test_resumed_training_matches_an_uninterrupted_run(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    train_vae(recipe, tmp_path / "straight")
    train_vae(recipe, tmp_path / "resumed", stop_at=2)  # stops after a checkpoint at step 2
    assert not (tmp_path / "resumed" / "vae").exists()
    train_vae(recipe, tmp_path / "resumed")
    from safetensors.torch import load_file

    want = load_file(tmp_path / "straight" / "vae" / "diffusion_pytorch_model.safetensors")
    got = load_file(tmp_path / "resumed" / "vae" / "diffusion_pytorch_model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow  # end to end: the whole recipe, as the world_pipeline fixture runs it
def test_pretrain_writes_a_pipeline_plain_diffusers_runs(recipe_file, tmp_path):
    result = invoke("pretrain", "--recipe", recipe_file, "--work", tmp_path / "work", "--out", tmp_path / "pipe")
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float32, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the encoded data, not SD's constant
    image = pipe("a small red circle on the left on a white background", num_inference_steps=2, output_type="np")
    assert image.images.shape == (1, 64, 64, 3)
    # a second run resumes nothing and refuses to overwrite the pipeline
    assert_clean_failure(
        invoke("pretrain", "--recipe", recipe_file, "--work", tmp_path / "work", "--out", tmp_path / "pipe"),
        "already exists",
        5,
    )


@pytest.mark.slow  # end to end: the whole recipe again, v-prediction
def test_v_prediction_recipe_ships_a_matching_scheduler(tmp_path):
    recipe_file = tmp_path / "v.toml"
    recipe_file.write_text('prediction_type = "v_prediction"\nzero_terminal_snr = true\n' + TINY_RECIPE)
    result = invoke("pretrain", "--recipe", recipe_file, "--work", tmp_path / "work", "--out", tmp_path / "pipe")
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float32, local_files_only=True)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps[0] == 999  # sampling starts from pure noise, where training saw SNR 0
    image = pipe("a small red circle on the left on a white background", num_inference_steps=4, output_type="np")
    assert image.images.shape == (1, 64, 64, 3) and np.isfinite(image.images).all()


def test_shipped_recipe_parses():
    recipe = load_recipe(Path(__file__).parents[1] / "models" / "shapes-base.toml")
    assert isinstance(recipe, BaseRecipe) and recipe.unet["down_block_types"][0] == "CrossAttnDownBlock2D"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed = ", "not valid TOML"),
        ("learning_rate = 1\n" + TINY_RECIPE, "unknown key(s) learning_rate"),
        (TINY_RECIPE + "\nlearning_rate = 1\n", "[unet_training]: unknown key(s) learning_rate"),
        (TINY_RECIPE.replace("steps = 4", "steps = 0"), "steps must be a positive integer"),
        ('prediction_type = "flow"\n' + TINY_RECIPE, "prediction_type 'flow' is not one of epsilon, v_prediction"),
        ("zero_terminal_snr = true\n" + TINY_RECIPE, "zero_terminal_snr needs prediction_type"),
    ],
    ids=["syntax", "unknown key", "unknown stage key", "zero steps", "unknown prediction", "zero snr with eps"],
)
def test_bad_recipe_fails_cleanly(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    result = invoke("pretrain", "--recipe", tmp_path / "bad.toml", "--work", tmp_path / "w", "--out", tmp_path / "p")
    assert_clean_failure(result, message)
    assert not (tmp_path / "p").exists()


def test_eval_of_a_pipeline_reports_the_reader_ceiling_through_its_vae(world_pipeline, tmp_path):
    import json

    args = ["eval", world_pipeline, "--count", "2", "--steps", "1", "--guidance", "3", "--json", tmp_path / "e.json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "scene reader on those reconstructions" in result.output
    ceiling = json.loads((tmp_path / "e.json").read_text())["vae"]["reader_accuracy_on_reconstructions"]
    assert set(ceiling) == {"colour", "shape", "size", "position", "background", "all"}
    assert all(0 <= v <= 1 for v in ceiling.values())
