"""`mtu-export coreml --layout apple` on the toy shapes-world MTU checkpoint: per task, the resource folder of Apple's
Swift `StableDiffusion` package. Linux cannot compile or run Core ML models, so these tests reload every package's
spec and hold its names, dtypes and shapes to Apple's conventions (the constants in export/apple.py, each citing
apple/ml-stable-diffusion's sources), check the adapter modules against the original ones in torch, and run the
packages with Core ML on macOS only."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler
from helpers import assert_clean_failure, assert_valid_manifest, invoke

from mtu_export.checkpoint import load_checkpoint, load_components
from mtu_export.conditioning import tokenize
from mtu_export.config import CoreMLConfig
from mtu_export.errors import ConfigError
from mtu_export.export.apple import (
    APPLE_CONVENTIONS,
    APPLE_RESOURCE_FILES,
    AppleTextEncoder,
    AppleUNet,
    check_fits_apple,
    convention_problems,
    package_io,
    timestep_map,
)
from mtu_export.export.coreml import require_coremltools
from mtu_export.export.graphs import TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from mtu_export.fold import fold_task
from mtu_export.metrics import psnr_db
from mtu_export.sample import Components, SamplerConfig, denoiser_for, sample_examples
from mtu_export.shapes.tiny import tiny_unet
from mtu_export.shapes.world import make_example
from mtu_export.tasks import BUILTIN

ADAPTER_ATOL = 1e-5  # an adapter against the module it wraps, both torch fp32
ALPHA_ATOL = 1e-6  # ᾱ of the model timestep the UNet maps an Apple timestep to, against Apple's ᾱ
COREML_PSNR_MIN_DB = 35.0  # Apple's converter's own floor (torch2coreml.py ABSOLUTE_MIN_PSNR)
# The shipped t2i model sampled through Apple's UNet I/O by an ε scheduler on Apple's schedule vs our own pipeline
# (v-prediction, zero terminal SNR): measured 46.1 dB (10 steps, 2 images); the UNet unconverted: 16.4 dB.
APPLE_SAMPLER_PSNR_MIN_DB = 35.0
UNCONVERTED_PSNR_MAX_DB = 25.0
SHIPPED = Path(__file__).parents[1] / "models" / "shapes-mtu"
SHIPPED_SCHEDULER = Path(__file__).parents[1] / "models" / "shapes-base" / "scheduler" / "scheduler_config.json"
PROMPTS = ("a large red circle in the middle on a white background", "make the square blue", "")


def _export(mtu_world: Path, root: Path, task: str) -> Path:
    out = root / task
    result = invoke("coreml", mtu_world, "--task", task, "--layout", "apple", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exports(mtu_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("apple")
    return {task: _export(mtu_world, root, task) for task in ("t2i", "edit")}


@pytest.fixture(scope="module")
def components(world_pipeline: Path) -> Components:
    return load_components(world_pipeline)


def _sizes(components: Components, task: str) -> dict[str, int]:
    """What each symbolic size of Apple's conventions is for the world pipeline and `task` (its guidance batch)."""
    vae = components.vae.config
    image = vae.sample_size
    latent = image // 2 ** (len(vae.block_out_channels) - 1)
    extra = BUILTIN[task].extra_channels(vae.latent_channels)
    return {
        "batch": 3 if BUILTIN[task].image_guidance else 2,
        "in_channels": vae.latent_channels + extra,
        "latent_channels": vae.latent_channels,
        "moments": 2 * vae.latent_channels,
        "latent": latent,
        "image": image,
        "tokens": components.tokenizer.model_max_length,
        "hidden": components.text_encoder.config.hidden_size,
    }


def _spec(path: Path):
    ct = require_coremltools()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def _ports(features) -> dict[str, dict]:
    """name -> Core ML array type and shape, read straight from a spec (nothing of apple.py's)."""
    name = require_coremltools().proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    return {
        f.name: {"dtype": name(f.type.multiArrayType.dataType).lower(), "shape": list(f.type.multiArrayType.shape)}
        for f in features
    }


def _spec_io(path: Path) -> dict[str, dict[str, dict]]:
    description = _spec(path).description
    return {"input": _ports(description.input), "output": _ports(description.output)}


# ------------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_each_task_folder_holds_the_files_apples_pipeline_loads(exports, task):
    folder = exports[task] / task
    assert sorted(p.name for p in (folder / "Resources").iterdir()) == sorted(APPLE_RESOURCE_FILES)
    assert (folder / "README.md").is_file()
    assert sorted(p.name for p in exports[task].iterdir()) == sorted(["manifest.json", task])


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_every_package_has_apples_names_dtypes_and_shapes(exports, components, task):
    sizes = _sizes(components, task)
    for convention in APPLE_CONVENTIONS.values():
        io = _spec_io(exports[task] / task / "Resources" / f"{convention.package}.mlpackage")
        for kind, ports in (("input", convention.inputs), ("output", convention.outputs)):
            want = {name: port.resolve(sizes) for name, port in ports.items()}
            assert io[kind] == want, (convention.package, kind)


def test_the_exports_own_check_lists_every_difference_from_apples_io(exports, components):
    """Tamper with a package's I/O as the export reads it: a renamed input and an fp16 output are both named."""
    ct = require_coremltools()
    io = package_io(ct, exports["t2i"] / "t2i" / "Resources" / "Unet.mlpackage")["main"]
    sizes = _sizes(components, "t2i")
    assert convention_problems("t2i/Unet", io, APPLE_CONVENTIONS["Unet"], sizes) == []
    io["inputs"]["latent"] = io["inputs"].pop("sample")
    io["outputs"]["noise_pred"]["dtype"] = "float16"
    problems = convention_problems("t2i/Unet", io, APPLE_CONVENTIONS["Unet"], sizes)
    assert len(problems) == 2 and "latent" in problems[0] and "float16" in problems[1], problems


def test_the_conventions_are_apples(components):
    """Spot checks of the constants against the facts of Apple's sources, for this pipeline's sizes."""
    sizes = _sizes(components, "t2i")
    unet = {n: p.resolve(sizes) for n, p in APPLE_CONVENTIONS["Unet"].inputs.items()}
    assert unet["encoder_hidden_states"] == {"dtype": "float16", "shape": [2, sizes["hidden"], 1, sizes["tokens"]]}
    assert unet["timestep"] == {"dtype": "float16", "shape": [2]}
    assert list(APPLE_CONVENTIONS["Unet"].outputs) == ["noise_pred"]
    assert list(APPLE_CONVENTIONS["TextEncoder"].inputs) == ["input_ids"]
    assert APPLE_CONVENTIONS["TextEncoder"].inputs["input_ids"].dtype == "float32"
    assert list(APPLE_CONVENTIONS["TextEncoder"].outputs) == ["last_hidden_state", "pooled_outputs"]
    assert (list(APPLE_CONVENTIONS["VAEDecoder"].inputs), list(APPLE_CONVENTIONS["VAEDecoder"].outputs)) == (
        ["z"],
        ["image"],
    )
    assert (list(APPLE_CONVENTIONS["VAEEncoder"].inputs), list(APPLE_CONVENTIONS["VAEEncoder"].outputs)) == (
        ["x"],
        ["latent"],
    )


def test_edit_unet_takes_the_source_latent_channels_and_the_two_scale_batch(exports, components):
    io = _spec_io(exports["edit"] / "edit" / "Resources" / "Unet.mlpackage")
    assert io["input"]["sample"]["shape"] == [3, 8, 16, 16] and io["input"]["timestep"]["shape"] == [3]
    assert io["output"]["noise_pred"]["shape"] == [3, 4, 16, 16]


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_tokenizer_files_are_the_pipelines(exports, world_pipeline, task):
    for name in ("vocab.json", "merges.txt"):
        written = exports[task] / task / "Resources" / name
        assert written.read_bytes() == (world_pipeline / "tokenizer" / name).read_bytes()


def _swift_bpe_ids(folder: Path, text: str, length: int) -> list[int]:
    """Apple's BPETokenizer.tokenize(input:minCount:) (BPETokenizer.swift:59-169, reading at
    BPETokenizer+Reading.swift:13-48), transcribed: lower-case, split on spaces, merge by rank, pad with EOS."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    ranks = {tuple(line.split(" ")): i for i, line in enumerate(lines) if line and not line.startswith("#")}
    tokens = ["<|startoftext|>"]
    for word in (w for w in text.strip().lower().split(" ") if w):
        symbols = [*word[:-1], word[-1] + "</w>"]
        while True:
            pairs = [p for p in zip(symbols, symbols[1:], strict=False) if p in ranks]
            if not pairs:
                break
            first, second = min(pairs, key=ranks.get)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        tokens += symbols
    tokens += ["<|endoftext|>"] * (length - len(tokens))
    return [vocab.get(t, vocab["<|endoftext|>"]) for t in tokens]


def test_apples_tokenizer_reads_our_files_as_clip_does(exports, components):
    """Apple's Swift BPE tokenizer is simpler than CLIP's (no byte-level map, no regex split); on the world's prompts
    it must give CLIPTokenizer's ids, or the stock pipeline would encode other tokens."""
    folder = exports["t2i"] / "t2i" / "Resources"
    length = components.tokenizer.model_max_length
    for prompt in PROMPTS:
        want = tokenize(components.tokenizer, [prompt])[0].tolist()
        assert _swift_bpe_ids(folder, prompt, length) == want, prompt


def test_manifest_says_what_swift_sets_and_which_folder_runs_stock(exports, components):
    t2i, edit = (json.loads((exports[t] / "manifest.json").read_text()) for t in ("t2i", "edit"))
    scaling = components.vae.config.scaling_factor
    assert t2i["swift"]["encoderScaleFactor"] == pytest.approx(scaling)
    assert t2i["swift"]["decoderScaleFactor"] == pytest.approx(scaling)
    assert t2i["resources"]["t2i"]["stock_pipeline"] and not edit["resources"]["edit"]["stock_pipeline"]
    assert t2i["export"]["layout"] == "apple" and t2i["conventions"]["source"].startswith("apple/ml-stable-diffusion@")
    if sys.platform != "darwin":
        assert "needs macOS" in t2i["graph_agreement_skipped"] and t2i["graph_agreement"] == []


def test_edit_readme_says_what_the_swift_side_must_add(exports):
    text = (exports["edit"] / "edit" / "README.md").read_text()
    for fact in ("8 input channels", "posterior *mode*", "*unscaled*", "three-way guidance", "3 copies of t"):
        assert fact in text, fact
    t2i = (exports["t2i"] / "t2i" / "README.md").read_text()
    assert "loads `Resources/` as it is" in t2i


@pytest.mark.slow
def test_all_tasks_write_every_folder_and_keep_the_multifunction_unet(mtu_world, components, tmp_path):
    """--task all: a folder per task (shared packages stored once, by hard link) and the multifunction UNet beside
    them, each function with Apple's UNet I/O. Slow tier: four UNets and the merge take about a minute on 2 cores."""
    out = _export(mtu_world, tmp_path, "all")
    tasks = ["t2i", "edit", "sr", "inpaint"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*tasks, "multifunction", "manifest.json"])
    weights = [out / t / "Resources" / "TextEncoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" for t in tasks]
    assert len({(w / "weight.bin").stat().st_ino for w in weights}) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["multifunction"]["functions"] == tasks and manifest["export"]["target"] == "iOS18"
    functions = _spec(out / "multifunction" / "Unet.mlpackage").description.functions
    assert sorted(f.name for f in functions) == sorted(tasks)
    for function in functions:
        sizes = _sizes(components, function.name)
        want = {n: p.resolve(sizes) for n, p in APPLE_CONVENTIONS["Unet"].inputs.items()}
        assert _ports(function.input) == want, function.name
        assert list(_ports(function.output)) == ["noise_pred"]


# ---------------------------------------------------------------------------------------------- adapters in torch
@torch.no_grad()
def test_adapters_equal_the_modules_they_wrap(mtu_world, components):
    """Apple's I/O around our modules changes names, dtypes of ids and layouts only: the same numbers."""
    g = torch.Generator().manual_seed(0)
    sizes = _sizes(components, "t2i")
    ids = tokenize(components.tokenizer, [PROMPTS[0]])  # (1, L)
    got, want = AppleTextEncoder(components.text_encoder)(ids.float()), TextEncoderGraph(components.text_encoder)(ids)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ADAPTER_ATOL, rtol=0)
    image = torch.rand(1, 3, sizes["image"], sizes["image"], generator=g) * 2 - 1
    torch.testing.assert_close(VaeEncoderGraph(components.vae)(image), components.vae._encode(image), atol=0, rtol=0)
    z = torch.randn(1, sizes["latent_channels"], sizes["latent"], sizes["latent"], generator=g)
    decoded = components.vae.decode(z).sample
    torch.testing.assert_close(VaeDecoderGraph(components.vae)(z), decoded, atol=0, rtol=0)

    unet = fold_task(load_checkpoint(mtu_world, dtype=torch.float32).model, "t2i").eval()
    assert timestep_map(components.scheduler) is None  # the world's schedule is Apple's: a layout change only
    sample = torch.randn(2, 4, sizes["latent"], sizes["latent"], generator=g)
    hidden = torch.randn(2, sizes["tokens"], sizes["hidden"], generator=g)  # (B, L, D)
    t = torch.tensor([981.0, 981.0])
    apple = AppleUNet(unet, components.scheduler)(sample, t, hidden.transpose(1, 2).unsqueeze(2))
    torch.testing.assert_close(apple, unet(sample, t, hidden).sample, atol=ADAPTER_ATOL, rtol=0)


def _apple_alphas() -> np.ndarray:
    """Apple's ᾱ as Scheduler.swift:175-186 computes it (Float32 there)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    return np.cumprod(1 - betas, dtype=np.float32).astype(np.float64)


@torch.no_grad()
def test_unet_adapter_turns_a_v_prediction_zero_snr_model_into_apples_epsilon():
    """The shipped base's schedule (v-prediction, zero terminal SNR) under Apple's ε schedulers: at each Apple
    timestep the UNet runs at the model timestep of the same ᾱ and its v becomes ε = σ·x_t + α·v."""
    config = json.loads(SHIPPED_SCHEDULER.read_text())
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    model_alphas = DDPMScheduler.from_config(config).alphas_cumprod.double().numpy()  # diffusers' own computation
    mapped = timestep_map(scheduler)
    assert mapped is not None
    at_mapped = np.interp(mapped, np.arange(len(model_alphas)), model_alphas)
    np.testing.assert_allclose(at_mapped, _apple_alphas(), atol=ALPHA_ATOL, rtol=0)

    unet = tiny_unet().eval()
    adapter = AppleUNet(unet, scheduler)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)  # (B, L, D)
    for t in (999, 500, 21):
        alpha = float(np.sqrt(_apple_alphas()[t]))
        sigma = float(np.sqrt(1 - _apple_alphas()[t]))
        v = unet(sample, torch.tensor([mapped[t]] * 2, dtype=torch.float32), hidden).sample
        want = sigma * sample + alpha * v
        got = adapter(sample, torch.tensor([float(t)] * 2), hidden.transpose(1, 2).unsqueeze(2))
        torch.testing.assert_close(got, want, atol=ADAPTER_ATOL, rtol=0)


@torch.no_grad()
def test_apples_scheduler_on_the_adapted_unet_draws_what_our_pipeline_draws():
    """The stock Swift pipeline's sampling, in torch: DPM-Solver++ on Apple's schedule (scaled-linear betas, ε,
    linspace spacing: DPMSolverMultistepScheduler.swift) driving the shipped t2i UNet through AppleUNet, against
    our own pipeline with the model's scheduler. Without the schedule conversion the images are lost (control)."""
    ckpt = load_checkpoint(SHIPPED, dtype=torch.float32)
    ours = load_components(ckpt.pipeline_dir)
    unet = fold_task(ckpt.model, "t2i").eval()
    examples = [make_example("t2i", "heldout", i) for i in range(2)]
    config = SamplerConfig(steps=10, text_guidance=3.0, seed=0)
    apple_scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace"
    )
    apples = Components(ours.vae, ours.text_encoder, ours.tokenizer, apple_scheduler)
    adapter = AppleUNet(unet, ours.scheduler)

    def apple_unet(x, t, h):  # (B, C, h, w), (B,), (B, L, D) as Swift sends them: t as float, h transposed
        return adapter(x, t.float(), h.transpose(1, 2).unsqueeze(2))

    reference = sample_examples(denoiser_for(unet), BUILTIN["t2i"], examples, ours, config).astype(np.float32)
    through_apple = sample_examples(apple_unet, BUILTIN["t2i"], examples, apples, config).astype(np.float32)
    unconverted = sample_examples(denoiser_for(unet), BUILTIN["t2i"], examples, apples, config).astype(np.float32)
    assert psnr_db(reference, through_apple) >= APPLE_SAMPLER_PSNR_MIN_DB
    assert psnr_db(reference, unconverted) <= UNCONVERTED_PSNR_MAX_DB


# ---------------------------------------------------------------------------------------------------- refusals
def test_layout_choices_and_exporter_are_checked():
    with pytest.raises(ConfigError, match="--layout must be one of default, apple"):
        CoreMLConfig(layout="swift")


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("--task", "t2i", "--layout", "swift"), "--layout must be one of default, apple", 3),
        (("--task", "all", "--layout", "apple", "--target", "iOS17"), "needs Core ML's iOS18 target", 3),
        (("--task", "t2i", "--layout", "apple", "--attention", "fused"), "is not offered", 3),
    ],
)
def test_bad_apple_options_are_one_line_errors(mtu_world, tmp_path, args, message, code):
    result = invoke("coreml", mtu_world, "--out", tmp_path / "x", *args)
    assert_clean_failure(result, message, exit_code=code)
    assert not (tmp_path / "x").exists()


def test_an_existing_output_is_kept_without_overwrite(mtu_world, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    result = invoke("coreml", mtu_world, "--task", "t2i", "--layout", "apple", "--out", tmp_path / "x")
    assert_clean_failure(result, "already exists", exit_code=5)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_a_vae_apples_encoder_cannot_split_is_refused(world_pipeline, components):
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=8, down_block_types=("DownEncoderBlock2D",)
    )
    wide = Components(vae, components.text_encoder, components.tokenizer, components.scheduler)
    with pytest.raises(ConfigError, match="8 latent channels; Encoder.swift reads 4"):
        check_fits_apple(world_pipeline, wide)


# ------------------------------------------------------------------------------------------------------- macOS
@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction exists only on macOS")
def test_apple_packages_match_torch_on_macos(exports, mtu_world, components):
    """The export's own comparison (recorded trajectory inputs), then every t2i package on fresh inputs against its
    torch module, fed in Apple's input dtypes; outputs come back float32 as Swift reads them."""
    for task, out in exports.items():
        rows = json.loads((out / "manifest.json").read_text())["graph_agreement"]
        assert {r["component"] for r in rows} == {"TextEncoder", "VAEDecoder", "VAEEncoder", f"{task}/Unet"}
        assert all(r["psnr_db"] is None or r["psnr_db"] >= COREML_PSNR_MIN_DB for r in rows), rows
    ct = require_coremltools()
    sizes, g = _sizes(components, "t2i"), torch.Generator().manual_seed(2)
    unet = fold_task(load_checkpoint(mtu_world, dtype=torch.float32).model, "t2i").eval()
    latent = (sizes["latent"], sizes["latent"])
    cases = {
        "TextEncoder": (
            AppleTextEncoder(components.text_encoder),
            {"input_ids": tokenize(components.tokenizer, [PROMPTS[0]]).float()},
        ),
        "VAEDecoder": (VaeDecoderGraph(components.vae), {"z": torch.randn(1, 4, *latent, generator=g)}),
        "VAEEncoder": (
            VaeEncoderGraph(components.vae),
            {"x": torch.rand(1, 3, sizes["image"], sizes["image"], generator=g) * 2 - 1},
        ),
        "Unet": (
            AppleUNet(unet, components.scheduler),
            {
                "sample": torch.randn(2, 4, *latent, generator=g),
                "timestep": torch.tensor([500.0, 500.0]),
                "encoder_hidden_states": torch.randn(2, sizes["hidden"], 1, sizes["tokens"], generator=g),
            },
        ),
    }
    for name, (module, feed) in cases.items():
        convention = APPLE_CONVENTIONS[name]
        model = ct.models.MLModel(str(exports["t2i"] / "t2i" / "Resources" / f"{name}.mlpackage"))
        got = model.predict({k: v.numpy().astype(convention.inputs[k].dtype) for k, v in feed.items()})
        with torch.no_grad():
            want = module(*feed.values())
        for output, reference in zip(convention.outputs, want if isinstance(want, tuple) else (want,), strict=True):
            assert got[output].dtype == np.float32, (name, output)
            value = psnr_db(reference.numpy(), got[output])
            assert value is None or value >= COREML_PSNR_MIN_DB, (name, output, value)


def test_manifests_validate_against_the_schema(exports) -> None:
    for folder in exports.values():  # Apple's layout
        assert_valid_manifest(folder)
