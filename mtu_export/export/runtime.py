"""Exported graphs on onnxruntime behind the interface the torch samplers use, so one sampling loop
(`sample.sample_examples`) runs torch and ONNX alike: `OrtTextEncoder(ids)[0]`, `OrtVae.encode(x).latent_dist`,
`OrtVae.decode(z).sample`, and a UNet denoiser `(sample, timestep, encoder_hidden_states) -> ε`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def session(path: Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session; `threads` caps intra-op threads (phone-class CPUs), None lets ORT decide.
    `spinning=False` stops its idle threads from busy-waiting after a run: needed whenever sessions take turns on
    the same cores (benchmarks), where one session's spinning threads would steal time from the next."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers in quantized graphs
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def save_optimized(src: Path, dst: Path, level: str = "all", threads: int | None = None, external: bool = True) -> Path:
    """Have an onnxruntime CPU session optimize `src` at `level` and save the graph it would run to `dst`, its
    weights of 1 KiB and more in `<dst name>_data` beside it when `external` (else inline, under 2 GB only).
    "extended" stops before the layout transforms of "all" (NCHWc blocks sized for this CPU's vector width), so
    its graph runs on any CPU onnxruntime supports; it does hold onnxruntime's own (com.microsoft) operators."""
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = levels[level]
    if threads:
        options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(dst)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{dst.name}_data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])
    return dst


def ops_run(path: Path, threads: int | None = None) -> dict[str, int]:
    """How many nodes of each operator an onnxruntime CPU session for `path` runs, counted in the optimized model it
    saves: there QuantizeLinear / DequantizeLinear pairs around a Conv or MatMul have become QLinearConv,
    QLinearMatMul or MatMulIntegerToFloat, and what is still Conv / MatMul runs in float."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mtu-ops-") as scratch:
        return op_census(save_optimized(path, Path(scratch) / "optimized.onnx", "all", threads))


def op_census(path: Path) -> dict[str, int]:
    """How many nodes of each operator the ONNX file at `path` holds (weights not loaded)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run(sess, feeds: dict[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run `sess` on torch or numpy feeds, cast to the graph's input types (as optimum does)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    arrays = {}
    for name, value in feeds.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        arrays[name] = array.astype(_NUMPY[types[name]], copy=False)
    return run_rows(sess, arrays)


def run_rows(sess, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`sess.run` on numpy feeds; a graph exported with `--batch 1` (its batched inputs fixed at one row, as NPUs
    want) is called once per row and its outputs are stacked, so callers pass whole guidance batches as to any
    graph (the conditional and unconditional rows become separate calls)."""
    fixed = {i.name for i in sess.get_inputs() if i.shape and i.shape[0] == 1}
    batched = [name for name in fixed if arrays[name].ndim and arrays[name].shape[0] > 1]
    if not batched:
        return sess.run(None, arrays)
    rows = arrays[batched[0]].shape[0]
    calls = [sess.run(None, {k: v[i : i + 1] if k in batched else v for k, v in arrays.items()}) for i in range(rows)]
    return [np.concatenate(parts) for parts in zip(*calls, strict=True)]


_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OrtTextEncoder:
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = session(path, threads)

    def __call__(self, input_ids: torch.Tensor):
        hidden, pooled = run(self.session, {"input_ids": input_ids})
        return torch.from_numpy(hidden).float(), torch.from_numpy(pooled).float()


class OrtVae:
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, encoder: Path | None, decoder: Path, config: dict, threads: int | None = None) -> None:
        self.encoder = None if encoder is None else session(encoder, threads)
        self.decoder = session(decoder, threads)
        self.config = SimpleNamespace(**config)

    def encode(self, sample: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise RuntimeError("this export has no VAE encoder")
        (moments,) = run(self.encoder, {"sample": sample})
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.from_numpy(moments).float()))

    def decode(self, latent_sample: torch.Tensor):
        (image,) = run(self.decoder, {"latent_sample": latent_sample})
        return SimpleNamespace(sample=torch.from_numpy(image).float())


class OrtUNet:
    """A UNet graph as a sampler denoiser. For an all-task bundle give `task_id` and `channels` (the bundle's input
    width): the task's sample is zero-padded to it."""

    def __init__(self, path: Path, threads: int | None = None, task_id: int | None = None, channels: int = 0):
        self.session = session(path, threads)
        self.task_id, self.channels = task_id, channels

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        feeds = {
            "sample": sample,
            "timestep": timestep.reshape(-1)[0].float(),
            "encoder_hidden_states": encoder_hidden_states,
        }
        if self.task_id is not None:
            pad = self.channels - sample.shape[1]
            feeds["sample"] = torch.nn.functional.pad(sample, (0, 0, 0, 0, 0, pad))
            feeds["task_id"] = torch.tensor(self.task_id, dtype=torch.int64)
        (out,) = run(self.session, feeds)
        return torch.from_numpy(out).float()
