"""The shapes world: determinism, exact ground truth per task, split hygiene, and the scene reader's accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mtu_export.shapes import world
from mtu_export.shapes.reader import accuracy, parse_caption, score
from mtu_export.shapes.world import TASKS, UNSEEN_PAIRS, downsample, make_example, render

READER_MIN_ACCURACY = 0.95  # the floor on ground-truth images
READER_MAX_WRONG_CAPTION = 0.6  # a caption of another scene must score clearly lower
N_EXAMPLES = 200


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_by_seed(task):
    a, b = make_example(task, "train", 7), make_example(task, "train", 7)
    assert a.prompt == b.prompt and np.array_equal(a.target, b.target)
    assert a.input is None or np.array_equal(a.input, b.input)
    others = [make_example(task, "train", i) for i in range(8, 14)]
    assert any(not np.array_equal(a.target, o.target) for o in others)


def test_sr_input_is_the_area_downsampled_target():
    for i in range(50):
        ex = make_example("sr", "train", i)
        assert ex.low_res.shape == (16, 16, 3) and ex.source is None and ex.input is ex.low_res
        assert np.array_equal(ex.low_res, downsample(ex.target))
        manual = ex.target.astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
        assert np.abs(ex.low_res - manual).max() <= 0.5


def test_inpaint_target_equals_source_outside_the_mask():
    kinds = set()
    for i in range(N_EXAMPLES):
        ex = make_example("inpaint", "train", i)
        assert ex.mask.dtype == bool and 0 < ex.mask.sum() < ex.mask.size
        assert ex.source is None and ex.low_res is None  # the input is the target with its hole zeroed
        assert np.array_equal(ex.input[~ex.mask], ex.target[~ex.mask])
        assert (ex.input[ex.mask] == 0).all() and ex.input.dtype == np.uint8
        filled = ndimage.binary_fill_holes(ex.mask)
        ys, xs = np.nonzero(ex.mask)
        is_box = ex.mask.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1) and filled.sum() == ex.mask.sum()
        kinds.add("box" if is_box else "free-form")
    assert kinds == {"box", "free-form"}


def test_edit_target_is_the_rendered_edited_scene_and_differs_from_source():
    verbs = set()
    for i in range(N_EXAMPLES):
        ex = make_example("edit", "train", i)
        assert np.array_equal(ex.target, render(ex.scene))
        assert np.array_equal(ex.source, render(ex.source_scene))
        assert not np.array_equal(ex.source, ex.target), ex.prompt
        verbs.add(ex.prompt.split()[0])
    assert verbs == {"make", "remove", "add", "move", "change"}


def test_unseen_combinations_never_appear_in_train_or_heldout():
    for split in ("train", "heldout"):
        for task in TASKS:
            for i in range(N_EXAMPLES):
                ex = make_example(task, split, i)
                scenes = [ex.scene] + ([ex.source_scene] if ex.source_scene else [])
                assert not {(o.shape, o.colour) for s in scenes for o in s.objects} & UNSEEN_PAIRS
    for i in range(N_EXAMPLES):
        scene = make_example("t2i", "unseen", i).scene
        assert {(o.shape, o.colour) for o in scene.objects} & UNSEEN_PAIRS


def test_splits_draw_from_disjoint_seeds():
    seeds = {
        split: {world.example_seed(split, t, i) for t in TASKS for i in range(N_EXAMPLES)} for split in world.SPLITS
    }
    assert not seeds["train"] & seeds["heldout"] and not seeds["train"] & seeds["unseen"]
    train = [make_example("t2i", "train", i).target.tobytes() for i in range(N_EXAMPLES)]
    heldout = {make_example("t2i", "heldout", i).target.tobytes() for i in range(N_EXAMPLES)}
    assert sum(t in heldout for t in train) <= N_EXAMPLES // 50  # only chance repeats of one-object scenes


def test_world_has_the_promised_variety():
    assert len(world.SHAPES) >= 3 and len(world.COLOURS) >= 6 and len(world.RADIUS) == 2
    scenes = [make_example("t2i", "train", i).scene for i in range(N_EXAMPLES)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.layout for s in scenes} == {"none", "vertical", "horizontal"}


def test_caption_round_trips_through_the_parser():
    for i in range(100):
        scene = make_example("t2i", "train", i).scene
        parsed = parse_caption(scene.caption())
        assert [(o.shape, o.colour, o.size, o.cell) for o in parsed.objects] == [
            (o.shape, o.colour, o.size, o.cell) for o in scene.objects
        ]
        assert parsed.background == scene.background


@pytest.mark.parametrize("split", ["heldout", "unseen"])
def test_scene_reader_is_accurate_on_ground_truth(split):
    examples = [make_example("t2i", split, i) for i in range(N_EXAMPLES)]
    acc = accuracy([score(ex.target, ex.prompt) for ex in examples])
    print(f"scene reader on {split} ground truth: {acc}")
    assert acc["all"] >= READER_MIN_ACCURACY


def test_scene_reader_tolerates_blur_and_noise_but_not_wrong_captions():
    rng = np.random.default_rng(0)
    examples = [make_example("t2i", "heldout", i) for i in range(N_EXAMPLES)]
    blurred = []
    for ex in examples:  # roughly what a VAE round trip does to edges and flat colours
        soft = ndimage.gaussian_filter(ex.target.astype(float), sigma=(0.7, 0.7, 0)) + rng.normal(0, 6, ex.target.shape)
        blurred.append(score(np.clip(soft, 0, 255).astype(np.uint8), ex.prompt))
    assert accuracy(blurred)["all"] >= READER_MIN_ACCURACY
    wrong = [score(ex.target, examples[(i + 1) % len(examples)].prompt) for i, ex in enumerate(examples)]
    assert accuracy(wrong)["all"] <= READER_MAX_WRONG_CAPTION


def test_world_command_writes_a_grid_and_rejects_bad_values(tmp_path):
    from helpers import assert_clean_failure, invoke
    from PIL import Image

    result = invoke("world", "--out", tmp_path / "grid.png", "--count", "3")
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(tmp_path / "grid.png"))
    assert image.shape[0] == 3 * 128 + 2 * 4 and image.shape[2] == 3
    assert_clean_failure(invoke("world", "--out", tmp_path / "x.png", "--task", "inpait"), "did you mean 'inpaint'", 3)
    assert_clean_failure(invoke("world", "--out", tmp_path / "grid.png"), "--overwrite", 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
