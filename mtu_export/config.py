"""Frozen, validated configuration dataclasses."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from mtu_export.errors import ConfigError

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Conditioning channels of the single-task models each task mirrors: text-to-image 4 (latent),
# InstructPix2Pix 8 (+ source latent), SD x4 upscaler 7 (+ low-res RGB), SD inpainting 9 (+ masked latent + mask).
DEFAULT_TASK_CHANNELS: dict[str, int] = {"t2i": 4, "edit": 8, "sr": 7, "inpaint": 9}


def did_you_mean(word: str, choices: list[str]) -> str:
    """A ` — did you mean 'x'?` suffix when `word` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class TaskSpec:
    """One task of an MTU model: its id and how many input channels its `conv_in` takes."""

    name: str
    in_channels: int

    def __post_init__(self) -> None:
        if not _TASK_NAME.match(self.name):
            raise ConfigError(
                f"task name {self.name!r} is not a lowercase identifier; use letters, digits and '_' (e.g. 'inpaint')"
            )
        if self.in_channels < 1:
            raise ConfigError(f"task {self.name!r} needs at least 1 input channel, got {self.in_channels}")


@dataclass(frozen=True)
class MoEConfig:
    """How FFNs are upcycled: N experts per FFN and a task-embedding router per layer."""

    tasks: tuple[TaskSpec, ...] = field(
        default_factory=lambda: tuple(TaskSpec(n, c) for n, c in DEFAULT_TASK_CHANNELS.items())
    )
    num_experts: int = 4
    task_embed_dim: int = 64
    router_hidden_dim: int = 64
    top_k: int | None = None  # None: the paper's dense mixture; k: each task routes through its k heaviest experts

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("an MTU model needs at least one task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"task names must be unique; repeated: {', '.join(dupes)}")
        options = {
            "num_experts": "--experts",
            "task_embed_dim": "task_embed_dim",
            "router_hidden_dim": "router_hidden_dim",
        }
        for key, option in options.items():
            if getattr(self, key) < 1:
                raise ConfigError(f"{option} must be a positive integer, got {getattr(self, key)}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"--route top-{self.top_k} needs 1 <= k <= the number of experts ({self.num_experts}); "
                f"pick k in 1..{self.num_experts}, or --route dense"
            )

    @property
    def route(self) -> str:
        """The routing as `--route` spells it: `dense` or `top-k`."""
        return "dense" if self.top_k is None else f"top-{self.top_k}"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        names = list(self.task_names)
        raise ConfigError(f"unknown task {name!r}; this model has: {', '.join(names)}{did_you_mean(name, names)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        try:
            tasks = tuple(TaskSpec(t["name"], _integer(t["in_channels"], "in_channels")) for t in data["tasks"])
            return cls(
                tasks=tasks,
                num_experts=_integer(data["num_experts"], "num_experts"),
                task_embed_dim=_integer(data["task_embed_dim"], "task_embed_dim"),
                router_hidden_dim=_integer(data["router_hidden_dim"], "router_hidden_dim"),
                top_k=None if data.get("top_k") is None else _integer(data["top_k"], "top_k"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"MoE config is malformed ({type(exc).__name__}: {exc}); re-run upcycle") from None


def _integer(value: Any, key: str) -> int:
    """An int from JSON, refusing floats and strings rather than truncating them."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, found {value!r}")
    return value


# The Stable Diffusion v1.5 UNet architecture (diffusers UNet2DConditionModel config; 859,520,964 parameters).
# Weights are not needed to measure structure, FLOPs or latency, so tests and benchmarks build it randomly.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


# ------------------------------------------------------------------------------------------------- base-model recipe
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names for ε, v and x0


@dataclass(frozen=True)
class SparseFold:
    """Which experts a task's fold keeps (`--prune-below`, `--ffn-budget`, `--renormalize`), layer by layer.

    An expert of routing weight exactly 0 (every expert outside a top-k model's k) is always dropped: that fold is
    exact. `prune_below` drops experts whose routing probability is under it; `ffn_budget` keeps only the heaviest
    experts, at most that fraction of them (of the FFN's width); at least the heaviest expert always stays.
    `renormalize` rescales the kept weights to the full mixture's sum. Dropping a nonzero weight approximates the
    routed model: the fold records by how much, and the task's metric must be measured."""

    prune_below: float = 0.0
    ffn_budget: float = 1.0
    renormalize: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_below < 1.0:
            raise ConfigError(f"--prune-below is a routing probability in [0, 1), got {self.prune_below}")
        if not 0.0 < self.ffn_budget <= 1.0:
            raise ConfigError(f"--ffn-budget is a fraction of the FFN width in (0, 1], got {self.ffn_budget}")

    @property
    def drops_weight(self) -> bool:
        """Whether experts of nonzero weight may be dropped (the fold then approximates the routed model)."""
        return self.prune_below > 0.0 or self.ffn_budget < 1.0


@dataclass(frozen=True)
class StageRecipe:
    """One training stage of the base model: optimiser schedule and batch (AdamW, linear warm-up, cosine decay)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not self.lr > 0 or self.warmup < 0:
            raise ConfigError(f"lr must be > 0 and warmup >= 0, got lr={self.lr}, warmup={self.warmup}")


@dataclass(frozen=True)
class BaseRecipe:
    """How the shipped text-to-image base model is built and trained (`models/*.toml`; see `shapes/pretrain.py`)."""

    vae: dict[str, Any]  # AutoencoderKL config
    text_encoder: dict[str, Any]  # CLIPTextConfig fields (vocabulary and special ids are filled in from the tokenizer)
    unet: dict[str, Any]  # UNet2DConditionModel config (cross_attention_dim is the text encoder's hidden size)
    vae_training: StageRecipe
    unet_training: StageRecipe
    kl_weight: float = 1e-6
    dataset_size: int = 40_000  # train-split t2i scenes encoded once into latents for the UNet stage
    caption_dropout: float = 0.1  # for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    ema_decay: float = 0.999
    seed: int = 0
    prediction_type: str = "epsilon"  # what the UNet predicts: one of PREDICTION_TYPES
    zero_terminal_snr: bool = False  # rescale SD's betas so the last timestep is pure noise (Lin et al. 2024)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; fix the recipe"
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError('zero_terminal_snr needs prediction_type = "v_prediction" (ε is undefined at SNR 0)')
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.dataset_size < self.unet_training.batch_size:
            raise ConfigError(f"dataset_size ({self.dataset_size}) is smaller than one batch")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> BaseRecipe:
        _check_keys(data, cls, source)
        try:
            fields = dict(data)
            for stage in ("vae_training", "unet_training"):
                _check_keys(data[stage], StageRecipe, f"{source} [{stage}]")
                fields[stage] = StageRecipe(**data[stage])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source} is malformed ({type(exc).__name__}: {exc})") from None


def _check_keys(data: dict[str, Any], cls: type, source: str) -> None:
    known = sorted(cls.__dataclass_fields__)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class DataSpec:
    """One `--data TASK=PATH`: a local dataset for a task, with column overrides (role -> column name)."""

    task: str
    path: str
    columns: dict[str, str] = field(default_factory=dict)


MIXED_PRECISION = ("no", "fp16", "bf16")


# ----------------------------------------------------------------------------------------------------- MTU training
PARITY_HELDOUT = 200  # `make parity` reports held-out examples 0-199: a learning curve must not score them


@dataclass(frozen=True)
class TrainConfig:
    """`mtu-export train`: an MTU run over `tasks`, or a single-task baseline (`single_task`, full fine-tune).

    `trainable` defaults to the run's kind ("full" for a single-task baseline, else "mtu"); `task_weights` may be a
    mapping {task: weight} (tasks not named get 0), stored as the tuple in `tasks` order."""

    tasks: tuple[TaskSpec, ...] = field(
        default_factory=lambda: tuple(TaskSpec(n, c) for n, c in DEFAULT_TASK_CHANNELS.items())
    )
    num_experts: int = 4
    route: str = "dense"  # "dense" (the paper's soft mixture) or "top-k": each task uses its k heaviest experts
    single_task: str | None = None
    trainable: str | None = None  # "mtu": the paper's split; "full": every UNet parameter; None: by the run's kind
    task_weights: tuple[float, ...] | Mapping[str, float] | None = None  # per task, in `tasks` order; None = uniform
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    input_lr_scale: float = 1.0  # lr multiplier for the conv_ins, whose condition channels start at zero
    warmup: int = 100
    weight_decay: float = 0.0
    checkpoint_every: int = 250
    cfg_dropout: float = 0.05  # InstructPix2Pix's p: text dropped 2p of the time, image 2p, both p
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.0
    cache_size: int = 4000  # train examples per task, VAE-encoded once
    seed: int = 0
    stop_at: int | None = None  # end this call early (checkpointed); the run resumes with --resume
    data: tuple[DataSpec, ...] = ()  # user datasets per task; tasks without one train on the shapes world
    resolution: int | None = None  # pixels; None: the UNet's sample_size times the VAE factor
    mixed_precision: str = "no"  # accelerate's autocast: no, fp16 (GPU) or bf16
    gradient_checkpointing: bool = False
    eval_every: int = 0  # score a held-out slice every N steps (and at the last) into curve.jsonl; 0: off
    eval_count: int = 32  # held-out examples per task in each evaluation
    eval_steps: int = 10  # sampling steps of each evaluation
    eval_first: int = 2000  # first held-out index of the slice; `make parity` reports 0-199, the ablation 1000-1099
    eval_guidance: float = 3.0  # text guidance of each evaluation (`make parity`'s)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"--resolution {self.resolution} must be a positive multiple of 8")
        if self.single_task is not None:
            names = [t.name for t in self.tasks]
            if self.single_task not in names:
                raise ConfigError(
                    f"unknown task {self.single_task!r} for --single-task; known: {', '.join(names)}"
                    f"{did_you_mean(self.single_task, names)}"
                )
        if self.single_task is not None and self.route != "dense":
            raise ConfigError(
                f"--route {self.route} routes experts, and a --single-task baseline has none; drop --route"
            )
        if self.trainable is None:  # a baseline fine-tunes the whole UNet, as the paper's baselines do
            object.__setattr__(self, "trainable", "full" if self.single_task is not None else "mtu")
        if self.trainable not in ("mtu", "full"):
            raise ConfigError(f"--trainable must be 'mtu' or 'full', got {self.trainable!r}")
        if isinstance(self.task_weights, Mapping):
            names = [t.name for t in self.tasks]
            for name in self.task_weights:
                _check_weight_name(name, names)
            object.__setattr__(self, "task_weights", tuple(float(self.task_weights.get(n, 0.0)) for n in names))
        if self.task_weights is not None:
            if len(self.task_weights) != len(self.tasks) or any(w < 0 for w in self.task_weights):
                raise ConfigError("--task-weights needs one non-negative weight per task, e.g. t2i=1,edit=2,sr=1")
            if sum(self.task_weights) <= 0:
                raise ConfigError("--task-weights must not all be zero")
        if not self.input_lr_scale > 0:
            raise ConfigError(f"--input-lr-scale must be > 0, got {self.input_lr_scale}")
        if not 0 <= self.cfg_dropout < 1 / 3:
            raise ConfigError(f"--cfg-dropout must be in [0, 1/3), got {self.cfg_dropout}")
        if not self.min_snr_gamma >= 0:
            raise ConfigError(f"--min-snr-gamma must be >= 0 (0 turns Min-SNR off), got {self.min_snr_gamma}")
        if self.batch_size < len(self.weights()):
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the number of tasks trained")
        if self.cache_size < 1:
            raise ConfigError(f"cache_size must be positive, got {self.cache_size}")
        self.stage()  # validates steps, batch size, lr, warm-up
        self.moe()
        trained = set(self.weights())
        for spec in self.data:
            if spec.task not in trained:
                raise ConfigError(
                    f"--data names task {spec.task!r}, which this run does not train ({', '.join(sorted(trained))})"
                )
        self._check_eval()

    def _check_eval(self) -> None:
        if self.eval_every < 0 or self.eval_count < 1 or self.eval_steps < 1:
            raise ConfigError("--eval-every must be >= 0 (0: off), --eval-count and --eval-steps >= 1")
        if self.eval_first < PARITY_HELDOUT:
            raise ConfigError(
                f"--eval-first {self.eval_first} overlaps the held-out examples parity reports (0-"
                f"{PARITY_HELDOUT - 1}); start the curve's slice at {PARITY_HELDOUT} or later"
            )
        own = sorted(set(self.weights()) - set(DEFAULT_TASK_CHANNELS))
        if self.eval_every and own:
            raise ConfigError(
                f"--eval-every scores the shapes world's held-out examples, which task(s) {', '.join(own)} lack; "
                "drop --eval-every, or evaluate checkpoints on a held-out dataset with `mtu-export eval --data`"
            )
        if self.eval_every and self.data:
            raise ConfigError(
                f"--eval-every scores held-out examples, and a --data dataset ({self.data[0].task}) trains on all its "
                "rows; drop --eval-every, or evaluate checkpoints on a held-out dataset with `mtu-export eval --data`"
            )

    def weights(self) -> dict[str, float]:
        """Sampling weight per trained task (one task with weight 1 for a baseline)."""
        if self.single_task is not None:
            return {self.single_task: 1.0}
        weights = self.task_weights or (1.0,) * len(self.tasks)
        return {t.name: float(w) for t, w in zip(self.tasks, weights, strict=True) if w > 0}

    def moe(self) -> MoEConfig:
        if self.single_task is not None:
            spec = next(t for t in self.tasks if t.name == self.single_task)
            return MoEConfig(tasks=(spec,), num_experts=1)
        return MoEConfig(tasks=self.tasks, num_experts=self.num_experts, top_k=parse_route(self.route))

    def stage(self) -> StageRecipe:
        return StageRecipe(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            weight_decay=self.weight_decay,
            checkpoint_every=self.checkpoint_every,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_route(text: str) -> int | None:
    """`--route`: `dense` -> None, `top-k` (k a positive integer) -> k."""
    if text == "dense":
        return None
    head, _, k = text.partition("-")
    if head != "top" or not k.isdigit() or int(k) < 1:
        raise ConfigError(f"--route must be 'dense' or 'top-k' with k a positive integer (e.g. top-2), got {text!r}")
    return int(k)


def parse_task_weights(text: str, names: list[str]) -> tuple[float, ...]:
    """`--task-weights t2i=1,edit=2` -> one weight per task of `names`, in that order (tasks not named: 0)."""
    weights = dict.fromkeys(names, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        _check_weight_name(name, names)
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--task-weights: {item!r} is not task=number, as in 'edit=2'") from None
    return tuple(weights.values())


def _check_weight_name(name: str, names: list[str]) -> None:
    if name not in names:
        raise ConfigError(f"--task-weights names {name!r}, not a trained task{did_you_mean(name, names)}")


# ---------------------------------------------------------------------------------------------------------- export
ONNX_QUANTIZE = ("none", "dynamic-int8", "static-int8", "w8a16", "fp16")
COREML_QUANTIZE = ("none", "int8", "palettize-6", "palettize-4", "int4-block")
COREML_TARGETS = ("iOS17", "iOS18")
# What `mtu-export coreml` writes: our packages, or per task the Resources folder of apple/ml-stable-diffusion's Swift
# StableDiffusion package, with Apple's names and I/O (export/apple.py)
COREML_LAYOUTS = ("default", "apple")
MIN_OPSET, MAX_OPSET = 14, 21


# int8 modes whose weights can be 7-bit (onnxruntime's reduce_range): both run uint8·int8 kernels that saturate with
# 8-bit weights on x86 CPUs without VNNI
REDUCE_RANGE_MODES = ("dynamic-int8", "static-int8")
# What `mtu-export onnx` writes for each graph: model.onnx (desktop onnxruntime, optimum), model.ort (ONNX Runtime
# Mobile, with the folder's required_operators.config; the .onnx removed) or both
ONNX_FORMATS = ("onnx", "ort", "both")


@dataclass(frozen=True)
class ExportConfig:
    """What every exporter reads: which tasks, image size, UNet attention, quantization, the sparse fold and the
    validation against torch. An export is given one of its two kinds: OnnxConfig (`mtu-export onnx`) or CoreMLConfig
    (`mtu-export coreml`), each with its own options and its own choices of quantization and attention; its manifest
    records the fields of that kind only.

    `tasks` is one task, or empty for every task as one bundle; the CLI's spelling (`"edit"`, `"all"`) is read as
    `--task` reads it."""

    command: ClassVar[str] = ""  # the CLI command named in refusals
    quantize_modes: ClassVar[tuple[str, ...]] = ("none",)
    attention_modes: ClassVar[tuple[str, ...]] = ("default",)

    tasks: tuple[str, ...] | str = ()  # empty (or "all"): every task of the checkpoint, as one bundle
    height: int | None = None  # pixels; None: the UNet's sample_size times the VAE factor
    width: int | None = None
    attention: str = "default"  # UNet attention: exported ops, or the kind's own layout (attention_modes)
    quantize: str = "none"  # UNet weights: one of the kind's quantize_modes
    allow_drift: bool = False
    probe_steps: int = 8  # length of the sampling trajectory whose UNet inputs validate each graph
    image_steps: int = 25  # end-to-end image check: sampling steps, examples, guidance
    image_count: int = 2
    guidance: float = 3.0
    image_guidance: float = 1.5
    seed: int = 0
    sparse: SparseFold = field(default_factory=SparseFold)  # which experts each task's fold keeps

    def __post_init__(self) -> None:
        given = self.tasks if isinstance(self.tasks, str) else ",".join(self.tasks)
        if isinstance(self.tasks, str):
            tasks = () if self.tasks == "all" else tuple(t.strip() for t in self.tasks.split(",") if t.strip())
            object.__setattr__(self, "tasks", tasks)
        if len(self.tasks) > 1:
            raise ConfigError(f"--task takes one task or all, got {given!r}; run once per task or use --task all")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"--{name} {value} must be a positive multiple of 8")
        if self.probe_steps < 1 or self.image_steps < 1 or self.image_count < 0:
            raise ConfigError("validation steps must be >= 1 and the image count >= 0")
        if self.attention not in self.attention_modes:
            raise ConfigError(
                f"`mtu-export {self.command} --attention {self.attention}` is not offered; "
                f"choose {', '.join(self.attention_modes)}"
            )
        if self.quantize not in self.quantize_modes:
            raise ConfigError(
                f"`mtu-export {self.command} --quantize {self.quantize}` is not a mode; choose "
                f"{', '.join(self.quantize_modes)}{did_you_mean(self.quantize, list(self.quantize_modes))}"
            )
        if self.sparse.drops_weight and not self.tasks:
            raise ConfigError(
                "--prune-below / --ffn-budget narrow one task's folded FFNs, and --task all exports one UNet shared by "
                "every task; export each task alone (--task t2i, ...)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every field, as the manifest's `export` records them."""
        return asdict(self)


@dataclass(frozen=True)
class OnnxConfig(ExportConfig):
    """`mtu-export onnx`: ExportConfig plus the graph options of torch.onnx and onnxruntime."""

    command: ClassVar[str] = "onnx"
    quantize_modes: ClassVar[tuple[str, ...]] = ONNX_QUANTIZE
    attention_modes: ClassVar[tuple[str, ...]] = ("default", "fused")  # fused: onnxruntime's MultiHeadAttention

    opset: int = 18
    dynamo: bool = False  # torch.onnx's dynamo exporter (opset >= 18) instead of the TorchScript one
    fixed_shapes: bool = False  # fixed batch / height / width instead of dynamic axes
    external_data: bool | None = None  # None: only when a graph passes the 2 GB protobuf limit
    optimize: bool = False  # save each graph as onnxruntime's CPU session optimizes it (level "extended")
    format: str = "onnx"  # ONNX_FORMATS
    batch: int | None = None  # 1 = every graph at fixed shapes and one row per call (NPUs); None: dynamic
    # int8: 7-bit weights (onnxruntime's reduce_range) for x86 CPUs without VNNI; None: when this machine is one
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset {self.opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (default 18)")
        if self.dynamo and self.opset < 18:
            raise ConfigError(
                f"the dynamo exporter needs opset >= 18 (ONNX Runtime rejects its opset-{self.opset} graphs); "
                "drop --dynamo or use --opset 18"
            )
        if self.attention == "fused" and self.dynamo:
            raise ConfigError("--attention fused needs the TorchScript exporter; drop --dynamo")
        if self.batch not in (None, 1):
            raise ConfigError(f"--batch {self.batch} is not offered; --batch 1 fixes every graph at one row per call")
        if self.format not in ONNX_FORMATS:
            raise ConfigError(f"--format {self.format!r} is not a format; choose {', '.join(ONNX_FORMATS)}")
        if self.reduce_range and self.quantize not in REDUCE_RANGE_MODES:
            raise ConfigError(
                f"--reduce-range (7-bit int8 weights) applies to --quantize {' or '.join(REDUCE_RANGE_MODES)} only"
            )


@dataclass(frozen=True)
class CoreMLConfig(ExportConfig):
    """`mtu-export coreml`: ExportConfig plus Core ML's deployment target, compute precision and file layout.
    `target` defaults to what the export needs (iOS18 for the bundle's multifunction UNet, else iOS17)."""

    command: ClassVar[str] = "coreml"
    quantize_modes: ClassVar[tuple[str, ...]] = COREML_QUANTIZE
    attention_modes: ClassVar[tuple[str, ...]] = ("default", "split-einsum")  # split-einsum: the Neural Engine's

    target: str | None = None  # None: iOS18 for all tasks (a multifunction UNet needs it), else iOS17
    compute_precision: str = "fp16"
    layout: str = "default"  # COREML_LAYOUTS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is None:
            object.__setattr__(self, "target", "iOS17" if self.tasks else "iOS18")
        if self.target not in COREML_TARGETS:
            raise ConfigError(f"--target {self.target!r} is not supported; choose {', '.join(COREML_TARGETS)}")
        if self.compute_precision not in ("fp16", "fp32"):
            raise ConfigError(f"--compute-precision must be fp16 or fp32, got {self.compute_precision!r}")
        if self.layout not in COREML_LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(COREML_LAYOUTS)}, got {self.layout!r}")
        if self.quantize == "int4-block" and self.target != "iOS18":
            raise ConfigError("--quantize int4-block needs Core ML's iOS18 target; add --target iOS18")
