"""`mtu-export coreml`: an MTU checkpoint -> Core ML `.mlpackage`s (mlprogram), one per component.

- `TextEncoder.mlpackage`, `VAEEncoder.mlpackage`, `VAEDecoder.mlpackage`: batch 1, fixed size;
- `Unet.mlpackage`: one task's folded UNet, batch fixed to the task's guidance batch (2 for t2i / inpaint, 3 for
  edit / sr with InstructPix2Pix's two-scale guidance; Core ML cannot make the diffusers UNet's batch dynamic);
  with all tasks, one *multifunction* package, a function per task, whose identical weights Core ML stores once
  (needs the iOS18 target).

Conversion traces each module and converts it with fp16 compute by default. On Linux nothing can run a Core ML
model, so every package is checked structurally: it is reloaded, its inputs and outputs are read from the spec and
its MIL ops are counted (a folded task has exactly the op census of a stock UNet: no routing left). On macOS each
package is also run on the trajectory inputs of the ONNX validation and compared with torch (PSNR per output).

`--attention split-einsum` converts the UNet with the Neural Engine's attention layout (split_einsum.py), checked
first in torch against the UNet as it was (>= 60 dB, anywhere); the manifest's `attention` records that and the
UNet's einsum / matmul / softmax census. Its speed can only be measured on a Mac.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mtu_export import __version__
from mtu_export.checkpoint import Checkpoint, file_sha256
from mtu_export.config import CoreMLConfig
from mtu_export.errors import ConfigError, DriftError
from mtu_export.export.graphs import TextEncoderGraph, UNetGraph, VaeDecoderGraph, VaeEncoderGraph
from mtu_export.export.prepare import IMAGE_PSNR_GOAL_DB, Prepared, record_probes, require_kind
from mtu_export.export.skeleton import run_export
from mtu_export.export.split_einsum import split_einsum_attention_
from mtu_export.metrics import psnr_db
from mtu_export.quantize import quantize_coreml
from mtu_export.sample import Components
from mtu_export.storage import tree_bytes

PACKAGES = {"text_encoder": "TextEncoder", "vae_encoder": "VAEEncoder", "vae_decoder": "VAEDecoder", "unet": "Unet"}
COREML_PSNR_FLOOR_DB = 35.0  # Apple's own converter refuses a Stable Diffusion component under 35 dB
SPLIT_EINSUM_PSNR_FLOOR_DB = 60.0  # the split-einsum UNet against the original, both torch fp32: same math
ATTENTION_OPS = ("einsum", "matmul", "softmax")  # the MIL ops counted in the manifest's attention census
logger = logging.getLogger(__name__)


def require_coremltools():
    # coremltools logs its untested-torch / sklearn / missing-native-runtime notices at import; the manifest
    # records the versions instead. Its progress bars (tqdm) are silenced around conversions.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError:
        raise ConfigError(
            "Core ML export needs coremltools, which is not installed here (it has wheels for macOS and x86_64 "
            "Linux): pip install coremltools==9.0"
        ) from None
    return ct


def resolve_target(config: CoreMLConfig, bundled: bool) -> str:
    """iOS17 by default; a multifunction UNet (all tasks) needs iOS18 and says so rather than changing it."""
    if bundled and config.target != "iOS18":
        raise ConfigError(
            "--task all writes one multifunction UNet package, which needs Core ML's iOS18 target; "
            "add --target iOS18, or export the tasks one by one"
        )
    return config.target


def export_coreml(
    checkpoint: Path,
    config: CoreMLConfig,
    out: Path,
    overwrite: bool = False,
    data: dict | None = None,
) -> dict:
    """Convert, check and describe; returns the manifest. `data` (task -> DataSpec) gives tasks their validation
    examples (default: the shapes world)."""
    require_kind(config, CoreMLConfig)
    if config.layout == "apple":  # per task, the resource folder of Apple's Swift package (apple.py)
        from mtu_export.export.apple import export_apple

        return export_apple(checkpoint, config, out, overwrite=overwrite, data=data)
    return run_export(CoreMLConverter(config), checkpoint, config, out, overwrite, data)


class CoreMLConverter:
    """Core ML as the export skeleton (skeleton.py) runs it: a package per component, one multifunction UNet for
    all tasks."""

    config_type = CoreMLConfig

    def __init__(self, config: CoreMLConfig):
        self.ct = require_coremltools()
        self.config = config
        self.target = resolve_target(config, bundled=not config.tasks)

    def fits(self, ckpt: Checkpoint, components: Components) -> None:
        """Every checkpoint the toolchain loads converts to Core ML."""

    def write(self, job: Prepared, tmp: Path, scratch: Path) -> dict:
        ct, config = self.ct, self.config
        ckpt, tasks, components, unets = job.ckpt, job.tasks, job.components, job.unets
        bundled = not config.tasks
        probes = record_probes(config, unets, job.sources, components)
        logger.info(f"recorded validation trajectories ({config.probe_steps} steps) for {', '.join(tasks)}")
        attention = _set_attention(config, unets, probes)
        vae, text_encoder = components.vae, components.text_encoder
        first = probes[tasks[0]].feeds
        converter = _Converter(ct, config, self.target, scratch)
        packages = {
            "text_encoder": converter.convert(TextEncoderGraph(text_encoder), first["text_encoder"][0], tmp),
            "vae_encoder": converter.convert(VaeEncoderGraph(vae), first["vae_encoder"][0], tmp, "vae_encoder"),
            "vae_decoder": converter.convert(VaeDecoderGraph(vae), first["vae_decoder"][0], tmp, "vae_decoder"),
        }
        unet = converter.convert_unets(unets, {t: probes[t].feeds["unet"][0] for t in tasks}, tmp, bundled)
        packages["unet"] = unet
        checks = {name: describe_package(ct, tmp / path) for name, path in _package_files(packages).items()}
        agreement = _mac_agreement(ct, tmp, packages, unets, probes, (vae, text_encoder))
        return {
            "format": "mtu-export-coreml/2",
            "kind": "multifunction" if bundled else "task",
            "tasks": manifest_tasks(ckpt, tasks, bundled),
            "source": {"checkpoint": str(ckpt.path), "sha256": file_sha256(ckpt.path / "mtu_unet.safetensors")},
            "export": config.to_dict() | {"target": self.target},
            "versions": {"mtu_export": __version__, "coremltools": ct.__version__, "torch": torch.__version__},
            "packages": checks,
            "sizes": converter.sizes,
            **agreement,
            "attention": attention | {"ops": _attention_census(checks["unet"])},
            "image_psnr_goal_db": IMAGE_PSNR_GOAL_DB,
        }

    def after_validation(self, job: Prepared, tmp: Path, manifest: dict) -> dict:
        return manifest


def manifest_tasks(ckpt, tasks: list[str], bundled: bool) -> dict[str, dict]:
    """The manifest's `tasks`, keyed by name as the ONNX manifest's: each task's UNet input channels and, in a
    multifunction package, the function that runs it (Core ML selects a task by function name, not by a task_id)."""
    return {
        task: {"in_channels": ckpt.model.config.task(task).in_channels, "function": task if bundled else None}
        for task in tasks
    }


def _set_attention(config: CoreMLConfig, unets: dict, probes: dict) -> dict:
    """`--attention split-einsum`: give each folded UNet the Neural Engine's attention layout, in place, and check
    it against the UNet as it was on the first recorded UNet input (torch vs torch: this runs anywhere)."""
    if config.attention == "default":
        return {"layout": "default", "torch_agreement": []}
    rows = []
    for task, unet in unets.items():
        feed = probes[task].feeds["unet"][0]
        inputs = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
        with torch.no_grad():
            before = unet(*inputs).sample.numpy()
            layers = split_einsum_attention_(unet)
            after = unet(*inputs).sample.numpy()
        value = psnr_db(before, after)
        rows.append(
            {
                "package": f"unet[{task}]",
                "output": "out_sample",
                "psnr_db": value,
                "max_abs_diff": float(np.abs(before - after).max()),
                "floor_db": SPLIT_EINSUM_PSNR_FLOOR_DB,
                "ok": value is None or value >= SPLIT_EINSUM_PSNR_FLOOR_DB,
            }
        )
        shown = "identical" if value is None else f"{value:.1f} dB"
        logger.info(f"{task}: split-einsum attention in {layers} layers; torch vs the original UNet {shown}")
    failed = [r for r in rows if not r["ok"]]
    if failed and not config.allow_drift:
        listed = "; ".join(f"{r['package']}: {r['psnr_db']:.1f} dB (floor {r['floor_db']:.0f} dB)" for r in failed)
        raise DriftError(f"split-einsum attention drifts from the original UNet: {listed}; nothing was written")
    return {"layout": config.attention, "layers": layers, "torch_agreement": rows}


def _attention_census(unet_package: dict) -> dict[str, dict[str, int]]:
    """Per UNet function, the MIL ops that carry attention (einsum, matmul, softmax), zeros included."""
    return {
        name: {op: function["ops"].get(op, 0) for op in ATTENTION_OPS}
        for name, function in unet_package["functions"].items()
    }


def _package_files(packages: dict) -> dict[str, str]:
    return {name: value if isinstance(value, str) else value["path"] for name, value in packages.items()}


def convert_module(
    ct, module, feed: dict, outputs: list[str], config: CoreMLConfig, target: str, dtypes: dict | None = None
):
    """Trace `module` on `feed` and convert it to an mlprogram for `target` with `config`'s compute precision (not
    saved, not loaded); `ct` is `require_coremltools()`. `dtypes` (name -> numpy type) fixes input and output
    types; by default token and task ids are int32 and everything else keeps its traced type."""
    dtypes = {"input_ids": np.int32, "task_id": np.int32} | (dtypes or {})
    names = list(feed)
    args = tuple(feed[n] for n in names)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_tqdm():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), args, check_trace=False)
        inputs = [
            ct.TensorType(name=n, shape=tuple(a.shape), dtype=dtypes.get(n)) for n, a in zip(names, args, strict=True)
        ]
        precision = ct.precision.FLOAT16 if config.compute_precision == "fp16" else ct.precision.FLOAT32
        model = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name=n, dtype=dtypes.get(n)) for n in outputs],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=precision,
            skip_model_load=True,
        )
    model.user_defined_metadata["mtu_export.version"] = __version__
    return model


class _Converter:
    def __init__(self, ct, config: CoreMLConfig, target: str, scratch: Path):
        self.ct, self.config, self.target, self.scratch = ct, config, target, scratch
        self.sizes: dict[str, int | float] = {}

    def convert(self, module, feed: dict, tmp: Path, component: str = "text_encoder") -> str:
        outputs = {
            "text_encoder": ["last_hidden_state", "pooler_output"],
            "vae_encoder": ["latent_parameters"],
            "vae_decoder": ["sample"],
        }[component]
        feed = {k: v.int() if k == "input_ids" else v for k, v in feed.items()}
        model = convert_module(self.ct, module, feed, outputs, self.config, self.target)
        name = f"{PACKAGES[component]}.mlpackage"
        model.save(str(tmp / name))
        logger.info(f"converted {component} -> {name}")
        return name

    def convert_unets(self, unets: dict, feeds: dict, tmp: Path, bundled: bool) -> dict:
        paths = {}
        for task, unet in unets.items():
            feed = dict(feeds[task])
            feed["timestep"] = feed["timestep"].reshape(1).expand(feed["sample"].shape[0]).contiguous()  # (B,)
            model = convert_module(self.ct, UNetGraph(unet), feed, ["out_sample"], self.config, self.target)
            model.user_defined_metadata["mtu_export.task"] = task
            if self.config.quantize != "none":
                logger.info(f"quantizing {task} unet: {self.config.quantize}")
                with _quiet_tqdm():
                    model = quantize_coreml(self.config.quantize, model)
            path = (self.scratch if bundled else tmp) / f"Unet-{task}.mlpackage"
            model.save(str(path))
            paths[task] = path
            logger.info(f"converted unet {task} (batch {feed['sample'].shape[0]})")
        if not bundled:
            (task,) = paths
            final = tmp / "Unet.mlpackage"
            paths[task].rename(final)
            return {"path": final.name, "functions": [task]}
        return self._multifunction(paths, tmp)

    def _multifunction(self, paths: dict[str, Path], tmp: Path) -> dict:
        ct = self.ct
        descriptor = ct.utils.MultiFunctionDescriptor()
        for task, path in paths.items():
            descriptor.add_function(str(path), src_function_name="main", target_function_name=task)
        descriptor.default_function_name = next(iter(paths))
        final = tmp / "Unet.mlpackage"
        with warnings.catch_warnings(), _quiet_tqdm():
            warnings.simplefilter("ignore")
            ct.utils.save_multifunction(descriptor, str(final))
        merged, separate = tree_bytes(final), sum(tree_bytes(p) for p in paths.values())
        single = tree_bytes(next(iter(paths.values())))
        self.sizes = {
            "multifunction_bytes": merged,
            "separate_packages_bytes": separate,
            "single_task_bytes": single,
            "ratio_to_separate": merged / separate,
            "ratio_to_single_task": merged / single,
        }
        logger.info(f"multifunction UNet: {merged / 1e6:.2f} MB vs {separate / 1e6:.2f} MB as {len(paths)} packages")
        return {"path": final.name, "functions": list(paths)}


def describe_package(ct, path: Path) -> dict:
    """Reload a package without running it and read its functions' inputs, outputs and MIL op census."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    functions = {}
    program = spec.mlProgram
    for name, function in program.functions.items():
        census: Counter[str] = Counter()
        for block in function.block_specializations.values():
            _count_ops(block, census)
        functions[name] = {
            "inputs": {i.name: [d.constant.size for d in i.type.tensorType.dimensions] for i in function.inputs},
            "ops": dict(sorted(census.items())),
        }
    description = spec.description
    return {
        "path": path.name,
        "bytes": tree_bytes(path),
        "spec_version": spec.specificationVersion,
        "inputs": [i.name for i in description.input],
        "outputs": [o.name for o in description.output],
        "functions": functions,
    }


def _count_ops(block, census: Counter) -> None:
    for op in block.operations:
        census[op.type] += 1
        for nested in op.blocks:
            _count_ops(nested, census)


def _mac_agreement(ct, tmp: Path, packages: dict, unets: dict, probes: dict, modules) -> dict:
    """Run every package on the recorded inputs and compare with torch (macOS only: Core ML prediction)."""
    if sys.platform != "darwin":
        return agreement_fields([], "Core ML prediction needs macOS; structure was checked instead")
    vae, text_encoder = modules
    rows = []
    shared = {
        "text_encoder": TextEncoderGraph(text_encoder),
        "vae_encoder": VaeEncoderGraph(vae),
        "vae_decoder": VaeDecoderGraph(vae),
    }
    for component, module in shared.items():
        model = ct.models.MLModel(str(tmp / packages[component]))
        outputs = [o.name for o in model.get_spec().description.output]
        per_output: dict[str, list] = {name: [] for name in outputs}
        for task in unets:
            for feed in probes[task].feeds[component]:
                with torch.no_grad():
                    reference = module(*feed.values())
                reference = reference if isinstance(reference, tuple) else (reference,)
                inputs = {k: (v.int() if k == "input_ids" else v).numpy() for k, v in feed.items()}
                got = model.predict(inputs)
                for name, ref in zip(outputs, reference, strict=True):
                    per_output[name].append((ref.numpy(), got[name]))
        rows += [_row(component, name, pairs) for name, pairs in per_output.items()]
    for task, unet in unets.items():
        functions = packages["unet"]["functions"]
        kwargs = {"function_name": task} if len(functions) > 1 else {}
        model = ct.models.MLModel(str(tmp / packages["unet"]["path"]), **kwargs)
        pairs = []
        for feed in probes[task].feeds["unet"]:
            batch = feed["sample"].shape[0]
            inputs = {
                "sample": feed["sample"].numpy(),
                "timestep": feed["timestep"].reshape(1).expand(batch).numpy(),
                "encoder_hidden_states": feed["encoder_hidden_states"].numpy(),
            }
            with torch.no_grad():
                reference = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample.numpy()
            pairs.append((reference, model.predict(inputs)["out_sample"]))
        rows.append(_row(f"unet[{task}]", "out_sample", pairs))
    return agreement_fields(rows, None)


def agreement_fields(rows: list[dict], skipped: str | None) -> dict:
    """The manifest's graph checks: each package output against torch (`graph_agreement`, as the ONNX manifest's),
    or why none ran (`graph_agreement_skipped`), and the floor they are held to."""
    return {"graph_agreement": rows, "graph_agreement_skipped": skipped, "graph_floor_db": COREML_PSNR_FLOOR_DB}


def _row(component: str, output: str, pairs: list) -> dict:
    ref = np.concatenate([r.ravel() for r, _ in pairs])
    got = np.concatenate([np.asarray(g, np.float32).ravel() for _, g in pairs])
    value = psnr_db(ref, got)
    return {
        "component": component,
        "output": output,
        "psnr_db": value,
        "max_abs_diff": float(np.abs(ref - got).max()),
        "ok": value is None or value >= COREML_PSNR_FLOOR_DB,
    }


@contextlib.contextmanager
def _quiet_tqdm():
    """coremltools draws tqdm bars on stderr for every pass; this command logs one line per package instead."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
