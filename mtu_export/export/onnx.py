"""`mtu-export onnx`: an MTU checkpoint -> ONNX graphs in optimum's folder layout, validated against torch.

One task (`--task t2i`) gives the folder `ORTStableDiffusionPipeline` (or its inpainting / InstructPix2Pix
siblings) loads as it is: `model_index.json`, `scheduler/`, `tokenizer/`, `text_encoder/`, `unet/`, `vae_encoder/`,
`vae_decoder/`, each graph `model.onnx` (+ `model.onnx_data` past 2 GB) beside its `config.json`. All tasks
(`--task all`) give the same layout with one UNet graph that takes a `task_id` (bundle.py): every shared weight
stored once.

Every export checks itself: each graph runs in onnxruntime on inputs recorded along each task's sampling
trajectory and is compared with the torch module (max |diff|, PSNR per output); then each task's full sampling loop
runs on the exported graphs and is compared, as images, with the fp32 torch pipeline. Figures go to
`manifest.json` and into each graph's metadata; a graph under its PSNR floor fails the export (every failure
listed) unless `allow_drift`.

Validation and calibration examples come from the shapes world or from a task's `--data` dataset (probes.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mtu_export import __version__, pipelines
from mtu_export.bundle import bundle_tasks
from mtu_export.checkpoint import Checkpoint, file_sha256
from mtu_export.config import REDUCE_RANGE_MODES, OnnxConfig
from mtu_export.errors import ConfigError, DriftError
from mtu_export.export.attention import fuse_attention_
from mtu_export.export.graphs import (
    BUNDLE,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    BundleGraph,
    GraphSpec,
    TextEncoderGraph,
    UNetGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
)
from mtu_export.export.prepare import IMAGE_PSNR_GOAL_DB, Prepared, record_probes
from mtu_export.export.probes import Probes
from mtu_export.export.runtime import OrtTextEncoder, OrtUNet, OrtVae, run, session
from mtu_export.export.skeleton import run_export
from mtu_export.image_processor import size_multiple
from mtu_export.metrics import UINT8_PEAK, psnr_db
from mtu_export.quantize import quantize_onnx, saturating_int8_cpu
from mtu_export.sample import Components, SamplerConfig, denoiser_for, sample_examples
from mtu_export.storage import (
    PIPELINE_INDEX,
    read_json,
    tree_bytes,
    write_json,
)
from mtu_export.tasks import pipeline_class

MODEL = "model.onnx"
EXTERNAL_DATA = "model.onnx_data"
PROTOBUF_LIMIT = 2_000_000_000  # bytes; larger graphs must keep their weights in external data
# Lowest PSNR (dB) an exported graph may have against its torch module, by what was done to it.
GRAPH_PSNR_FLOOR = {"none": 60.0, "fp16": 35.0, "dynamic-int8": 20.0, "static-int8": 15.0, "w8a16": 30.0}
ORT_PSNR_FLOOR = 60.0  # a graph's .ort against its .onnx on onnxruntime's CPU provider (same math); below: fails
CALIBRATION_COUNT = 4  # examples per task whose trajectories calibrate static int8 and w8a16
CALIBRATED = ("static-int8", "w8a16")  # the modes whose activation ranges come from calibration
OPTIMIZE_LEVEL = "extended"  # --optimize: all but the layout transforms, whose NCHWc blocks fit only this CPU

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphAgreement:
    component: str
    task: str | None  # the UNet's task (None: a graph shared by all tasks)
    output: str
    feeds: int
    max_abs_diff: float
    psnr_db: float | None  # None: bit-exact
    floor_db: float

    @property
    def ok(self) -> bool:
        return self.psnr_db is None or self.psnr_db >= self.floor_db


# ------------------------------------------------------------------------------------------------------ the command
def export_onnx(
    checkpoint: Path,
    config: OnnxConfig,
    out: Path,
    overwrite: bool = False,
    data: dict | None = None,
) -> dict:
    """Export, validate and describe; returns the manifest. Raises DriftError listing every drifting graph.
    `data` (task -> DataSpec) gives tasks their validation and calibration examples (default: the shapes world)."""
    return run_export(OnnxConverter(config), checkpoint, config, out, overwrite, data)


class OnnxConverter:
    """ONNX as the export skeleton (skeleton.py) runs it: optimum's layout, then the .ort files of validated graphs."""

    config_type = OnnxConfig

    def __init__(self, config: OnnxConfig):
        self.config = config
        self.exporter: _Exporter | None = None

    def fits(self, ckpt: Checkpoint, components: Components) -> None:
        """Every checkpoint the toolchain loads exports to ONNX."""

    def write(self, job: Prepared, tmp: Path, scratch: Path) -> dict:
        self.exporter = _Exporter(job.ckpt, self.config, job.components, scratch, tmp, job.sources)
        return self.exporter.run(job.tasks, job.unets, job.size)

    def after_validation(self, job: Prepared, tmp: Path, manifest: dict) -> dict:
        if self.config.format == "onnx":
            return manifest
        # the validated graphs, metadata stamped, as ONNX Runtime Mobile files
        return manifest | {"ort": self.exporter.convert_to_ort(job.tasks)}


class _Exporter:
    """One export run: writes graphs into `tmp`, validates them, returns the manifest."""

    def __init__(
        self,
        ckpt: Checkpoint,
        config: OnnxConfig,
        components: Components,
        scratch: Path,
        tmp: Path,
        sources,
    ):
        self.ckpt, self.config, self.components, self.sources = ckpt, config, components, sources
        self.scratch, self.tmp = scratch, tmp
        self.agreement: list[GraphAgreement] = []
        self.probes: dict[str, Probes] = {}  # the validation probes, which also check the .ort files
        self.calibration: dict[str, dict] | None = None  # static int8, w8a16: what each task was calibrated on
        self.size = (0, 0, 1)  # (height, width, VAE factor), set by run
        # int8's 7-bit weights: as asked, else where this CPU's int8 kernels saturate 8-bit ones
        self.reduce_range = config.quantize in REDUCE_RANGE_MODES and (
            config.reduce_range if config.reduce_range is not None else saturating_int8_cpu()
        )

    # -- orchestration -------------------------------------------------------------------------------------------
    def run(self, tasks: tuple[str, ...], unets: dict, size: tuple[int, int, int]) -> dict:
        bundled, self.size = not self.config.tasks, size
        vae, text_encoder = self.components.vae, self.components.text_encoder
        bundle = bundle_tasks(self.ckpt.model) if bundled else None
        if self.config.attention == "fused":  # same math in torch; one MultiHeadAttention node per layer in ONNX
            for unet in [*unets.values(), *([bundle.unet] if bundle is not None else [])]:
                fuse_attention_(unet)
        probes = self._probes(tasks, unets, bundle, "validation", 1)
        self._copy_pipeline_files(tasks, bundled)
        self._export(TEXT_ENCODER, TextEncoderGraph(text_encoder), probes["*"], self.ckpt.pipeline_dir / "text_encoder")
        self._export(VAE_ENCODER, VaeEncoderGraph(vae), probes["*"], self.ckpt.pipeline_dir / "vae")
        self._export(VAE_DECODER, VaeDecoderGraph(vae), probes["*"], self.ckpt.pipeline_dir / "vae")
        unet_module, unet_spec = (BundleGraph(bundle), BUNDLE) if bundled else (UNetGraph(unets[tasks[0]]), UNET)
        unet_config = dict((bundle.unet if bundled else unets[tasks[0]]).config)
        self._export_unet(unet_spec, unet_module, probes, tasks, unet_config)
        sizes = self._sizes(tasks, unets, probes) if bundled else None  # fp32 bundle vs fp32 single-task graphs
        if self.config.quantize != "none":
            self._quantize_unet(unet_spec, unet_module, tasks, unets, bundle, probes)
        images = self._image_check(tasks, unets, bundle)
        manifest = self._manifest(tasks, bundle, images, sizes)
        self._stamp_metadata(manifest)
        self.probes = probes
        return manifest

    def _probes(self, tasks, unets, bundle, purpose: str, count: int) -> dict[str, Probes]:
        """Per task, the graph inputs recorded along the sampling trajectories of `count` of its validation or
        calibration examples (`purpose`); '*' merges the shared graphs'."""
        ids = {} if bundle is None else {"bundle": tuple(bundle.tasks), "bundle_channels": bundle.in_channels}
        per_task = record_probes(
            self.config, {t: unets[t] for t in tasks}, self.sources, self.components, purpose, count, **ids
        )
        merged = Probes()
        for task in tasks:
            merged.extend(per_task[task])
        logger.info(f"recorded {purpose} trajectories ({self.config.probe_steps} steps) for {', '.join(tasks)}")
        return {"*": merged, **per_task}

    def _copy_pipeline_files(self, tasks: tuple[str, ...], bundled: bool) -> None:
        """tokenizer/, scheduler/ and model_index.json, labelled with the task's stock class where optimum's ORT
        pipelines run it (t2i, inpaint); the bundle (its UNet takes a task_id) and every task no ORT pipeline runs
        (edit, sr, declared tasks) get mtu-export's ONNX pipeline instead, shipped in the folder (pipelines.py)."""
        source = self.ckpt.pipeline_dir
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(source / name, self.tmp / name)
        index = read_json(source / PIPELINE_INDEX)
        if not bundled:
            index["_class_name"] = pipeline_class(self.sources.tasks[tasks[0]], index.get("_class_name", ""))
        if bundled or self.sources.tasks[tasks[0]].optimum_pipeline is None:
            ids, defs = self.ckpt.model.config.task_names, self.sources.tasks
            table = {
                t: {
                    "task_id": ids.index(t) if bundled else None,
                    **defs[t].condition.describe(),
                    "image_guidance": defs[t].image_guidance,
                }
                for t in tasks
            }
            height, _, factor = self.size
            index = pipelines.ship(
                self.tmp, index, "MTUOnnxPipeline", **pipelines.onnx_components(), tasks=table,
                scaling_factor=self.components.vae.config.scaling_factor, vae_scale_factor=factor,
                sample_size=height // factor,
                size_multiple=size_multiple(factor, len(self.ckpt.model.unet.config.block_out_channels) - 1),
            )  # fmt: skip
        write_json(self.tmp / PIPELINE_INDEX, index)

    # -- graphs --------------------------------------------------------------------------------------------------
    def _export(self, spec: GraphSpec, module, probes: Probes, config_dir: Path | None) -> None:
        feeds = probes.feeds[spec.component]
        path = self.write_graph(spec, module, feeds[0], self.tmp / spec.component)
        if config_dir is not None:
            shutil.copyfile(config_dir / "config.json", self.tmp / spec.component / "config.json")
        logger.info(f"exported {spec.component}")
        self.agreement += validate_graph(spec, module, path, feeds, None, GRAPH_PSNR_FLOOR["none"])

    def _export_unet(self, spec: GraphSpec, module, probes: dict[str, Probes], tasks, unet_config: dict) -> None:
        # a graph to be quantized stays as exported (the quantizers know ONNX operators, not onnxruntime's fused
        # ones); its quantized copy is what --optimize optimizes
        plain = self.config.quantize != "none"
        path = self.write_graph(spec, module, probes[tasks[0]].feeds["unet"][0], self.tmp / "unet", not plain)
        write_json(self.tmp / "unet" / "config.json", unet_config)
        logger.info(f"exported unet ({'all tasks, task_id input' if spec is BUNDLE else tasks[0]})")
        for task in tasks:
            feeds = probes[task].feeds["unet"]
            self.agreement += validate_graph(spec, module, path, feeds, task, GRAPH_PSNR_FLOOR["none"])

    def write_graph(self, spec: GraphSpec, module, example: dict, folder: Path, optimize: bool = True) -> Path:
        return write_graph(spec, module, example, folder, self.config, self.scratch, optimize)

    def _quantize_unet(self, spec, module, tasks, unets, bundle, probes) -> None:
        mode = self.config.quantize
        reference = self.tmp / "unet_fp32"
        (self.tmp / "unet").rename(reference)
        (self.tmp / "unet").mkdir()
        shutil.copyfile(reference / "config.json", self.tmp / "unet" / "config.json")
        calibration = None
        if mode in CALIBRATED:  # each task's own trajectories; a bundle is calibrated on all of them
            train = self._probes(tasks, unets, bundle, "calibration", CALIBRATION_COUNT)
            self.calibration = {t: {"source": self.sources.kind(t), "examples": CALIBRATION_COUNT} for t in tasks}
            feeds = [f for task in tasks for f in train[task].feeds["unet"]]
            if self.config.batch == 1:  # the graph takes one row: calibrate on each row of each guidance batch
                feeds = [_row(f, i, spec) for f in feeds for i in range(f["sample"].shape[0])]
            calibration = [_numpy(f) for f in feeds]
        logger.info(
            f"quantizing unet: {mode}"
            + (f" (calibrated on {len(calibration)} UNet calls)" if calibration else "")
            + (", 7-bit weights (reduce_range)" if self.reduce_range else "")
        )
        quantize_onnx(mode, reference / MODEL, self.tmp / "unet" / MODEL, calibration, self.reduce_range)
        if self.config.optimize:
            optimize_graph(self.tmp / "unet" / MODEL)
        for task in tasks:
            feeds = probes[task].feeds["unet"]
            rows = validate_graph(spec, module, self.tmp / "unet" / MODEL, feeds, task, GRAPH_PSNR_FLOOR[mode])
            self.agreement += [replace(r, component=f"unet[{mode}]") for r in rows]

    def convert_to_ort(self, tasks: tuple[str, ...]) -> dict:
        """Every graph as `model.ort` (ort_format.py), each checked against its .onnx on the validation probes (the
        UNet on every task's); the .onnx files removed for `--format ort`. Raises DriftError under ORT_PSNR_FLOOR."""
        from mtu_export.export.ort_format import convert_folder

        probes = self.probes
        feeds = {c: [_numpy(f) for f in probes["*"].feeds[c]] for c in ("text_encoder", "vae_encoder", "vae_decoder")}
        unet_inputs = (UNET if self.config.tasks else BUNDLE).inputs
        feeds["unet"] = [_numpy({k: f[k] for k in unet_inputs}) for t in tasks for f in probes[t].feeds["unet"]]
        result = convert_folder(self.tmp, keep_onnx=self.config.format == "both", feeds=feeds)
        low = [
            f"{component}.{row['output']}: {row['psnr_db']:.1f} dB"
            for component, graph in result["graphs"].items()
            for row in graph.get("agreement", [])
            if row["psnr_db"] is not None and row["psnr_db"] < ORT_PSNR_FLOOR
        ]
        if low and not self.config.allow_drift:
            raise DriftError(f".ort graphs drift from their .onnx (floor {ORT_PSNR_FLOOR:.0f} dB): {'; '.join(low)}")
        logger.info(f"converted {len(result['graphs'])} graphs to .ort ({result['optimization_style']} optimizations)")
        return result

    # -- end to end ----------------------------------------------------------------------------------------------
    def _image_check(self, tasks, unets, bundle) -> list[dict]:
        """Each task's full sampling loop on the exported graphs vs the fp32 torch pipeline, as uint8 images."""
        if not self.config.image_count:
            return []
        vae = self.components.vae
        sampler = SamplerConfig(
            self.config.image_steps, self.config.guidance, self.config.image_guidance, self.config.seed
        )
        ort_te = OrtTextEncoder(self.tmp / "text_encoder" / MODEL)
        ort_vae = OrtVae(self.tmp / "vae_encoder" / MODEL, self.tmp / "vae_decoder" / MODEL, dict(vae.config))
        ort_components = replace(self.components, vae=ort_vae, text_encoder=ort_te)
        rows = []
        for task in tasks:
            count = self.config.image_count
            examples = self.sources.validation(task, count)
            definition = self.sources.tasks[task]
            ids = {} if bundle is None else {"task_id": bundle.tasks.index(task), "channels": bundle.in_channels}
            ort_unet = OrtUNet(self.tmp / "unet" / MODEL, **ids)
            torch_denoiser = denoiser_for(unets[task])
            torch_images = sample_examples(torch_denoiser, definition, examples, self.components, sampler)
            ort_images = sample_examples(ort_unet, definition, examples, ort_components, sampler)
            value = psnr_db(torch_images, ort_images, peak=UINT8_PEAK)
            rows.append(
                {
                    "task": task,
                    "images": len(examples),
                    "steps": sampler.steps,
                    "psnr_db": value,  # over all images; per image below (one diverging trajectory shows there)
                    "psnr_db_per_image": [
                        psnr_db(t, o, peak=UINT8_PEAK) for t, o in zip(torch_images, ort_images, strict=True)
                    ],
                    "max_abs_diff": int(np.abs(torch_images.astype(int) - ort_images.astype(int)).max()),
                    "meets_goal": value is None or value >= IMAGE_PSNR_GOAL_DB,
                }
            )
            shown = "identical" if value is None else f"{value:.1f} dB"
            logger.info(
                f"{task}: exported pipeline vs torch fp32, {len(examples)} images x {sampler.steps} steps: {shown}"
            )
        return rows

    # -- reporting -----------------------------------------------------------------------------------------------
    def _sizes(self, tasks, unets, probes) -> dict:
        """Bundle bytes vs one single-task export (the first task's folded UNet, exported to scratch to measure)."""
        task = tasks[0]
        example = dict(probes[task].feeds["unet"][0])
        example["sample"] = example["sample"][:, : self.ckpt.model.config.task(task).in_channels]  # unpad
        same = self.config.quantize == "none"  # optimized as the bundle's fp32 graph is
        single = self.write_graph(UNET, UNetGraph(unets[task]), example, self.scratch / "single", same)
        single_unet = tree_bytes(single.parent)
        bundle_unet = tree_bytes(self.tmp / "unet")
        shared = sum(tree_bytes(self.tmp / c) for c in ("text_encoder", "vae_encoder", "vae_decoder"))
        return {
            "tasks": len(tasks),
            "bundle_unet_bytes": bundle_unet,
            "single_task_unet_bytes": single_unet,
            "unet_ratio": bundle_unet / single_unet,
            "bundle_bytes": bundle_unet + shared,
            "single_task_bytes": single_unet + shared,
            "ratio": (bundle_unet + shared) / (single_unet + shared),
            "separate_exports_ratio": float(len(tasks)),
            "precision": "fp32",
        }

    def _manifest(self, tasks, bundle, images, sizes) -> dict:
        import onnx
        import onnxruntime

        model = self.ckpt.model
        return {
            "format": "mtu-export-onnx/1",
            "kind": "bundle" if bundle is not None else "task",
            "tasks": {
                task: {
                    "task_id": None if bundle is None else bundle.tasks.index(task),
                    "in_channels": model.config.task(task).in_channels,
                    "routing_probabilities": {
                        k: [round(float(p), 6) for p in v] for k, v in model.routing_probabilities(task).items()
                    },
                }
                for task in tasks
            },
            "unet_input_channels": bundle.in_channels
            if bundle is not None
            else model.config.task(tasks[0]).in_channels,
            "source": {
                "checkpoint": str(self.ckpt.path),
                "sha256": file_sha256(self.ckpt.path / "mtu_unet.safetensors"),
            },
            "export": self.config.to_dict(),
            "optimized": {
                "level": OPTIMIZE_LEVEL,
                "by": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
                "graphs": sorted(p.parent.name for p in self.tmp.glob(f"*/{MODEL}") if p.parent.name != "unet_fp32"),
            }
            if self.config.optimize
            else None,
            "quantized": {
                "unet": self.config.quantize,
                "reference": "unet_fp32" if self.config.quantize != "none" else None,
                "reduce_range": self.reduce_range,
                "reduce_range_by": self._reduce_range_by(),
            },
            "versions": {
                "mtu_export": __version__,
                "torch": torch.__version__.split("+")[0],
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "graph_agreement": [asdict(r) | {"ok": r.ok} for r in self.agreement],
            "image_agreement": images,
            "data": {task: spec.path for task, spec in self.sources.data.items()},
            "calibration": self.calibration,
            "image_psnr_goal_db": IMAGE_PSNR_GOAL_DB,
            "sizes": sizes,
        }

    def _reduce_range_by(self) -> str | None:
        """Who chose static int8's weight bits: the option, or the default from this machine's CPU."""
        if self.config.quantize not in REDUCE_RANGE_MODES:
            return None
        if self.config.reduce_range is not None:
            return "--reduce-range / --no-reduce-range"
        return (
            "default: this CPU is x86 without VNNI" if self.reduce_range else "default: this CPU has VNNI or is not x86"
        )

    def _stamp_metadata(self, manifest: dict) -> None:
        """Write the source, task(s), versions and each graph's agreement with torch into the graph's ONNX metadata."""
        import onnx

        for folder in sorted(p.parent for p in self.tmp.glob(f"*/{MODEL}")):
            component = folder.name
            if component == "unet" and self.config.quantize != "none":
                component = f"unet[{self.config.quantize}]"
            rows = [r for r in manifest["graph_agreement"] if r["component"] == component.replace("unet_fp32", "unet")]
            model = onnx.load(str(folder / MODEL), load_external_data=False)
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))  # w8a16 raises it to 21
            props = {
                "mtu_export.tasks": json.dumps(list(manifest["tasks"])),
                "mtu_export.source_sha256": manifest["source"]["sha256"],
                "mtu_export.versions": json.dumps(manifest["versions"], sort_keys=True),
                "mtu_export.opset": str(opset),
                "mtu_export.agreement": json.dumps(rows, sort_keys=True),
            }
            if component.startswith("unet"):
                props["mtu_export.routing"] = json.dumps(
                    {t: v["routing_probabilities"] for t, v in manifest["tasks"].items()}
                )
            del model.metadata_props[:]
            for key, value in props.items():
                model.metadata_props.add(key=key, value=value)
            onnx.save_model(model, str(folder / MODEL))


# ------------------------------------------------------------------------------------------------------- writing
def write_graph(
    spec: GraphSpec, module, example: dict, folder: Path, config: OnnxConfig, scratch: Path, optimize: bool = True
) -> Path:
    """torch.onnx.export `module` with `example` feeds into `folder/model.onnx` (+ external data past 2 GB, or
    as `config.external_data` says), with `config`'s opset, exporter and shapes; `scratch` holds the raw export.
    With `config.optimize` (and `optimize`) the graph saved is onnxruntime's optimized one (optimize_graph)."""
    import onnx

    work = Path(scratch) / spec.component
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fixed = config.fixed_shapes or config.batch == 1
    if config.batch == 1:
        example = one_row(spec, example)
    elif not (fixed or config.dynamo):  # torch.export would guard the odd size instead of tracing past it
        example = any_size_example(spec, example)
    args = tuple(example[name] for name in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape asserts: the graphs are validated
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(work / MODEL),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=None if fixed else spec.dynamic_axes(),
                opset_version=config.opset,
                dynamo=config.dynamo,
                do_constant_folding=True,
            )
        except Exception as exc:
            if not config.dynamo:
                raise
            summary = next((line for line in str(exc).splitlines() if "conflict" in line or "Error" in line), "")
            raise ConfigError(
                f"the dynamo exporter failed on {spec.component} ({summary.strip()[:160]}); add --fixed-shapes, "
                "or drop --dynamo (the TorchScript exporter handles dynamic axes)"
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    external = config.external_data
    if external is None:
        external = any(p.name != MODEL for p in work.iterdir()) or (work / MODEL).stat().st_size > PROTOBUF_LIMIT
    _save(onnx.load(str(work / MODEL), load_external_data=True), folder / MODEL, external)
    shutil.rmtree(work, ignore_errors=True)
    if config.optimize and optimize:
        optimize_graph(folder / MODEL)
    return folder / MODEL


def any_size_example(spec: GraphSpec, example: dict) -> dict:
    """The UNet's tracing example with one more latent row and column. diffusers' UNet checks in Python whether the
    latent's sides divide by 2 ** (its up-samplings); only when they do not does it hand each up-sampler the size of
    its skip connection. Traced on an odd latent, the graph keeps that path, whose sizes come from Shape nodes, so it
    runs any latent size the torch UNet runs (on sides that divide, the same nearest 2x up-sampling, bit for bit);
    traced on a dividing one, it would fix every up-sampling at 2x and fail inside onnxruntime on other sizes."""
    if spec.component != "unet":
        return example
    return {**example, "sample": torch.nn.functional.pad(example["sample"], (0, 1, 0, 1))}


def one_row(spec: GraphSpec, example: dict) -> dict:
    """`example` cut to its first row in every input with a batch axis (`--batch 1`: the guidance batch's rows become
    separate calls, runtime.run_rows)."""
    return {k: v[:1] if 0 in spec.inputs.get(k, {}) else v for k, v in example.items()}


def optimize_graph(path: Path) -> None:
    """Replace the graph at `path` (and its external weights) by the one an onnxruntime CPU session runs after its
    portable optimizations (OPTIMIZE_LEVEL: constant folding, Conv / MatMul / activation / LayerNorm / Gelu
    fusions, QDQ pairs into QLinearConv and friends), so sessions loading it find that work done. Its weights stay
    external when they were."""
    from mtu_export.export.runtime import save_optimized

    graph_files = [p for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name)]
    external = len(graph_files) > 1
    with tempfile.TemporaryDirectory(prefix="mtu-optimize-", dir=path.parent) as scratch:
        save_optimized(path, Path(scratch) / MODEL, OPTIMIZE_LEVEL, external=external)
        for old in graph_files:
            old.unlink()
        for new in Path(scratch).iterdir():
            new.rename(path.parent / new.name)


# ---------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate_graph(spec: GraphSpec, module, path: Path, feeds: list[dict], task: str | None, floor: float):
    """Run the graph in onnxruntime and the torch module on every feed; one GraphAgreement per output."""
    sess = session(path)
    outputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in spec.outputs}
    for feed in feeds:
        reference = module(*(feed[name] for name in spec.inputs))
        reference = reference if isinstance(reference, tuple) else (reference,)
        exported = run(sess, {name: feed[name] for name in spec.inputs})
        for name, ref, got in zip(spec.outputs, reference, exported, strict=True):
            outputs[name].append((ref.float().numpy(), got.astype(np.float32)))
    rows = []
    for name, pairs in outputs.items():
        ref = np.concatenate([r.ravel() for r, _ in pairs])
        got = np.concatenate([g.ravel() for _, g in pairs])
        diff = float(np.abs(ref - got).max())
        rows.append(GraphAgreement(spec.component, task, name, len(feeds), diff, psnr_db(ref, got), floor))
    return rows


# --------------------------------------------------------------------------------------------------------- files
def _save(model, path: Path, external: bool) -> None:
    import onnx

    # onnx appends external weights to a data file already there: a graph saved again into its folder would carry
    # the old weights as dead bytes (a 3.4 GB UNet file grown to 6.9 GB)
    (path.parent / EXTERNAL_DATA).unlink(missing_ok=True)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _row(feed: dict, index: int, spec: GraphSpec) -> dict:
    return {k: v[index : index + 1] if 0 in spec.inputs.get(k, {}) else v for k, v in feed.items()}


def _numpy(feed: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in feed.items()}
