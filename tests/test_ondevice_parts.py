"""The torch-free runtime's parts against the real libraries: the numpy schedulers step for step against diffusers'
(same random model outputs), the CLIP tokenizer id for id against transformers' CLIPTokenizer, the refusals of what
they do not implement, and that importing them pulls in no torch, transformers or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from mtu_export.ondevice.schedulers import SCHEDULERS, scheduler_from_config
from mtu_export.ondevice.tokenizer import ClipTokenizer
from mtu_export.shapes.tiny import char_tokenizer
from mtu_export.shapes.vocab import learn_merges

# One step from the same sample and model output: |ours - diffusers| <= STEP_RTOL x the step's largest magnitude
# (sample in or out). A step subtracts numbers of that size, so diffusers' own float32 result is only that precise:
# zero-SNR Euler's first step starts at sigma 4096. Measured worst: 2e-6.
STEP_RTOL = 1e-5
# Both loops free-running (each fed its own samples) on the must-have configs: |ours - diffusers| <= TRAJECTORY_RTOL
# x max(1, |diffusers' sample|) at every step. Measured worst at <= 25 steps: 2e-6.
TRAJECTORY_RTOL = 1e-5
SCALE_RTOL = 1e-6  # scale_model_input and init_noise_sigma: one multiplication, tables an ulp apart at most
STEP_COUNTS = (1, 2, 5, 20, 25)
LATENT_SHAPE = (2, 4, 8, 8)  # (B, C, H, W)
CHILD_TIMEOUT_S = 60

ROOT = Path(__file__).resolve().parents[1]
SHAPES_BASE = ROOT / "models" / "shapes-base"

# Stable Diffusion 1.5's schedule, as its scheduler_config.json gives it to every scheduler converted from it
SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD15 |= {"steps_offset": 1}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
DPM, EULER, DDIM, PNDM = (
    {"_class_name": f"{name}Scheduler"} for name in ("DPMSolverMultistep", "EulerDiscrete", "DDIM", "PNDM")
)
ORDER3_HEUN = {"solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"}
# lambda_min_clipped cuts the cosine schedule's last train steps: its first timestep is 995, not 999
COSINE_CLIPPED = {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "prediction_type": "sample"}
COSINE_CLIPPED |= {"euler_at_final": True, "lower_order_final": False}
PLMS = {"skip_prk_steps": True}
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "shapes-base": json.loads((SHAPES_BASE / "scheduler" / "scheduler_config.json").read_text()),
    "sd15-dpm-leading": DPM | SD15 | {"timestep_spacing": "leading"},
    "sd15-dpm-linspace": DPM | SD15 | {"timestep_spacing": "linspace"},
    "sd15-dpm-order3-heun-sigma-min": DPM | SD15 | ORDER3_HEUN | {"timestep_spacing": "leading"},
    "cosine-dpm-clipped-lambda": DPM | COSINE_CLIPPED,
    "sd15-euler-leading": EULER | SD15 | {"timestep_spacing": "leading"},
    "sd15-euler-linspace": EULER | SD15 | {"timestep_spacing": "linspace"},
    "zero-snr-euler": EULER | SD15 | ZERO_SNR,
    "sd15-ddim": DDIM | SD15 | {"clip_sample": False, "set_alpha_to_one": False},  # tiny.py's pipeline scheduler
    "zero-snr-ddim": DDIM | SD15 | ZERO_SNR,
    "ddim-clipped-sample": DDIM | {"prediction_type": "sample", "timestep_spacing": "linspace"},  # clip_sample on
    "sd15-pndm": PNDM | SD15 | PLMS | {"set_alpha_to_one": False},  # SD 1.5's shipped scheduler
    "pndm-v-trailing": PNDM | SD15 | PLMS | {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
MUST_HAVE = ("shapes-base", "sd15-dpm-leading", "sd15-dpm-linspace", "sd15-euler-leading", "sd15-euler-linspace")


def _scheduler_pair(config: dict[str, Any], steps: int):
    """diffusers' scheduler and ours from one config dict, both set to `steps`."""
    reference = getattr(diffusers, config["_class_name"]).from_config(config)
    ours = scheduler_from_config(config)
    reference.set_timesteps(steps)
    ours.set_timesteps(steps)
    return reference, ours


def _max_abs(*arrays: np.ndarray) -> float:
    return max(1.0, *(float(np.abs(a).max()) for a in arrays))


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", SCHEDULER_CONFIGS)
def test_scheduler_steps_match_diffusers(name: str, steps: int) -> None:
    reference, ours = _scheduler_pair(SCHEDULER_CONFIGS[name], steps)
    assert ours.timesteps.dtype == reference.timesteps.numpy().dtype
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    np.testing.assert_allclose(ours.init_noise_sigma, float(reference.init_noise_sigma), rtol=SCALE_RTOL)

    rng = np.random.default_rng(steps)
    sample = rng.standard_normal(LATENT_SHAPE, dtype=np.float32) * np.float32(ours.init_noise_sigma)  # (B, C, H, W)
    for t_ref, t_ours in zip(reference.timesteps, ours.timesteps, strict=True):
        model_output = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)  # (B, C, H, W)
        scaled_ref = reference.scale_model_input(torch.from_numpy(sample), t_ref).numpy()
        scaled = ours.scale_model_input(sample, t_ours)
        np.testing.assert_allclose(scaled, scaled_ref, rtol=0, atol=SCALE_RTOL * _max_abs(scaled_ref))

        expected = reference.step(torch.from_numpy(model_output), t_ref, torch.from_numpy(sample)).prev_sample.numpy()
        got = ours.step(model_output, t_ours, sample).prev_sample
        assert got.dtype == np.float32 and got.shape == LATENT_SHAPE
        np.testing.assert_allclose(got, expected, rtol=0, atol=STEP_RTOL * _max_abs(sample, expected), err_msg=name)
        sample = expected  # both go on from diffusers' sample: every step is checked on its own


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", MUST_HAVE)
def test_scheduler_trajectory_matches_diffusers(name: str, steps: int) -> None:
    reference, ours = _scheduler_pair(SCHEDULER_CONFIGS[name], steps)
    rng = np.random.default_rng(100 + steps)
    sample = rng.standard_normal(LATENT_SHAPE, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    sample_ref = torch.from_numpy(sample.copy())
    for t_ref, t_ours in zip(reference.timesteps, ours.timesteps, strict=True):
        model_output = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)  # the same "UNet" answer for both
        ours.scale_model_input(sample, t_ours)  # called as a pipeline calls it: Euler finds its step index there
        reference.scale_model_input(sample_ref, t_ref)
        sample_ref = reference.step(torch.from_numpy(model_output), t_ref, sample_ref).prev_sample
        sample = ours.step(model_output, t_ours, sample).prev_sample
        expected = sample_ref.numpy()
        np.testing.assert_allclose(sample, expected, rtol=0, atol=TRAJECTORY_RTOL * _max_abs(expected), err_msg=name)


def test_scheduler_step_before_set_timesteps_is_refused() -> None:
    scheduler = scheduler_from_config(SCHEDULER_CONFIGS["shapes-base"])
    zeros = np.zeros(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(zeros, 999, zeros)


@pytest.mark.parametrize(
    ("base", "option", "value"),
    [
        (DPM, "use_karras_sigmas", True),
        (DPM, "thresholding", True),
        (DPM, "algorithm_type", "sde-dpmsolver++"),
        (DPM, "use_lu_lambdas", True),
        (DPM, "variance_type", "learned_range"),
        (DPM, "prediction_type", "flow_prediction"),
        (EULER, "use_karras_sigmas", True),
        (EULER, "timestep_type", "continuous"),
        (EULER, "interpolation_type", "log_linear"),
        (DDIM, "thresholding", True),
        (PNDM, "skip_prk_steps", False),
        (DPM, "some_future_option", 1),  # unknown options are refused too: they may change the math
    ],
)
def test_scheduler_refuses_unimplemented_options(base: dict[str, Any], option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option) as refused:
        scheduler_from_config(base | SD15 | {option: value})
    assert "\n" not in str(refused.value)


def test_scheduler_refuses_unknown_classes_naming_the_supported() -> None:
    with pytest.raises(ValueError, match="LMSDiscreteScheduler") as refused:
        scheduler_from_config({"_class_name": "LMSDiscreteScheduler"} | SD15)
    message = str(refused.value)
    assert "\n" not in message and all(name in message for name in SCHEDULERS)


# --- tokenizer -----------------------------------------------------------------------------------------------------

PROMPTS = [
    "",
    "a red circle",
    "A Photo of an ASTRONAUT riding a Horse on MARS",
    "hello, world!!! what's up? it's 5:30pm... (really) #tag @user",
    "don't WON'T i'LL we'd they've you're",
    "   lots \t of\n\n whitespace  \u3000 here ",
    "unknown words: zyxqv blorptastic",
    "café naïve résumé Ångström",
    "東京タワー and 中文字",
    "emoji 🚀🔥 test",
    "control\x00chars\x07here\ufffd",
    "<|startoftext|> literal <|ENDOFTEXT|> specials<|endoftext|>",
    "a!b wow!! 3.14 12345",
    " ".join(["a large red circle on the left of a small blue square"] * 12),  # far past any max length
]
ENGLISH = " ".join(PROMPTS[1:5]).lower() + " large small blue square the left of photo riding horse"


def _sd_like_folder(path: Path, pad_token: str) -> Path:
    """An SD-like CLIP folder: CLIP's 512 byte tokens, merges learnt on a few English words, length 77, saved by
    transformers itself."""
    alphabet = list(bytes_to_unicode().values())
    words = Counter(w for w in ENGLISH.split() if w.isalpha())
    merges = learn_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>"]
    tokens.append("<|endoftext|>")
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(path / "saved")
    return path / "saved"


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    char_dir = root / "char"
    char_tokenizer().save_pretrained(char_dir)  # tiny.py's: no merges, most characters unknown
    return {
        "shapes-base": SHAPES_BASE / "tokenizer",
        "char": char_dir,
        "sd-like": _sd_like_folder(root / "sd", pad_token="<|endoftext|>"),
        "sd2-like-pad-bang": _sd_like_folder(root / "sd2", pad_token="!"),  # SD 2.x pads with "!"
    }


@pytest.mark.parametrize("folder", ["shapes-base", "char", "sd-like", "sd2-like-pad-bang"])
def test_tokenizer_ids_match_transformers(tokenizer_folders: dict[str, Path], folder: str) -> None:
    reference = CLIPTokenizer.from_pretrained(tokenizer_folders[folder])
    expected = reference(
        PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True, return_tensors="np"
    ).input_ids  # (B, L)
    ours = ClipTokenizer.from_folder(tokenizer_folders[folder])
    ids = ours.encode(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), reference.model_max_length)
    for prompt, got, want in zip(PROMPTS, ids, expected, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=repr(prompt))


def test_tokenizer_truncates_long_prompts(tokenizer_folders: dict[str, Path]) -> None:
    ours = ClipTokenizer.from_folder(tokenizer_folders["sd-like"])
    row = ours.encode(PROMPTS[-1:])[0]  # (L,)
    # a full row: BOS, tokens only (no EOS/pad before the end), EOS kept in the last place
    assert row[0] == ours.bos_token_id and row[-1] == ours.eos_token_id
    assert ours.eos_token_id not in row[1:-1] and ours.pad_token_id not in row[1:-1]


def test_tokenizer_refuses_what_it_cannot_reproduce(tokenizer_folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab.json"):
        ClipTokenizer.from_folder(tmp_path)
    extended = CLIPTokenizer.from_pretrained(tokenizer_folders["sd-like"])
    extended.add_tokens(["<my-concept>"])  # a textual-inversion token: the text encoder would not know its id
    extended.save_pretrained(tmp_path / "extended")
    with pytest.raises(ValueError, match="<my-concept>"):
        ClipTokenizer.from_folder(tmp_path / "extended")
    config_path = tokenizer_folders["sd-like"] / "tokenizer_config.json"
    for key, value in (("model_max_length", None), ("padding_side", "left"), ("tokenizer_class", "T5Tokenizer")):
        broken = tmp_path / f"broken-{key}"
        broken.mkdir()
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (broken / name).write_bytes((tokenizer_folders["sd-like"] / name).read_bytes())
        config = json.loads(config_path.read_text()) | {key: value}
        (broken / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        with pytest.raises(ValueError, match=key) as refused:
            ClipTokenizer.from_folder(broken)
        assert "\n" not in str(refused.value)


# --- layering ------------------------------------------------------------------------------------------------------

IMPORT_CHECK = (
    "import sys; import mtu_export.ondevice.schedulers, mtu_export.ondevice.tokenizer, mtu_export.ondevice.noise, "
    "mtu_export.ondevice.graphs, mtu_export.ondevice.pipeline, mtu_export.ondevice.__main__; "
    "heavy = sorted({'torch', 'diffusers', 'transformers', 'optimum', 'typer'} & set(sys.modules)); "
    "assert not heavy, heavy"
)


def test_ondevice_imports_no_torch_transformers_or_diffusers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
