"""Noise schedulers in numpy, as diffusers 0.39 runs them: DPM-Solver++ (multistep), Euler, DDIM and PNDM (PLMS),
each built from a pipeline folder's `scheduler/scheduler_config.json` dict.

Every class speaks the interface the sampling loop uses on diffusers' schedulers -- `set_timesteps(n)`, `timesteps`,
`init_noise_sigma`, `scale_model_input(sample, t)` and `step(model_output, t, sample).prev_sample` -- so the same loop
drives either. The arithmetic follows diffusers' operation by operation in float32 (the noise tables are float32, as
diffusers keeps them), so samples agree with diffusers' to float32 rounding. `step` returns a `SchedulerOutput` whose
`prev_sample` has `model_output`'s dtype, like diffusers' `step(...).prev_sample`.

A config option that changes the math and is not implemented here (Karras sigmas, thresholding, SDE solvers, ...) is
refused with a one-line ValueError naming it, and so is an option this module does not know: nothing is ignored.

Must not import torch, transformers or diffusers, even indirectly: this runs where only numpy is installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import numpy as np

# An option is (diffusers' default, the values implemented here); None for "any value": options that only the refused
# features read (e.g. `sample_max_value` without thresholding) or plain numbers every value of which is implemented.
Option = tuple[Any, "tuple[Any, ...] | None"]
_OFF: tuple[Any, ...] = (False, None)  # diffusers treats a null flag as off

_SCHEDULE_OPTIONS: dict[str, Option] = {
    "num_train_timesteps": (1000, None),
    "beta_start": (0.0001, None),
    "beta_end": (0.02, None),
    "beta_schedule": ("linear", ("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": (None, None),
    "steps_offset": (0, None),
}
_SPACINGS = ("linspace", "leading", "trailing")
_S = TypeVar("_S", bound="_Scheduler")


@dataclass(frozen=True)
class SchedulerOutput:
    """What `step` returns, named as diffusers names it, so that `step(...).prev_sample` reads the same."""

    prev_sample: np.ndarray  # the sample one step less noisy, shaped and typed like `model_output`


# --- the training noise schedule -------------------------------------------------------------------------------


def _alpha_bar_cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """GLIDE's cosine schedule ("squaredcos_cap_v2"), in Python floats as diffusers computes it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = [(i / num_train_timesteps, (i + 1) / num_train_timesteps) for i in range(num_train_timesteps)]
    return np.array([min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta) for t1, t2 in steps], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that the last timestep is pure noise (arXiv 2305.08891, Algorithm 1)."""
    sqrt_bar = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))  # (T,)
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    """(T,) float32 betas; diffusers makes them with torch.linspace in float32, which differs from this by <= 1 ulp."""
    count = config["num_train_timesteps"]
    if config["trained_betas"] is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    if config["beta_schedule"] == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], count).astype(np.float32)
    if config["beta_schedule"] == "scaled_linear":  # linear in sqrt(beta): latent diffusion's schedule
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, count).astype(np.float32) ** 2
    return _alpha_bar_cosine_betas(count)


def _alphas_cumprod(config: Mapping[str, Any], lift_zero_terminal: bool) -> np.ndarray:
    """(T,) float32 alpha_bar. torch's CPU cumprod accumulates float32 in float64; so does this.

    With zero terminal SNR the last alpha_bar is 0; the sigma-based schedulers (DPM-Solver, Euler) lift it to 2^-24
    so that their first sigma is finite (4096), while DDIM keeps the 0, as diffusers does."""
    betas = _betas(config)
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    if config.get("rescale_betas_zero_snr") and lift_zero_terminal:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


# --- options and the shared skeleton ---------------------------------------------------------------------------


def _resolve(name: str, config: Mapping[str, Any], options: Mapping[str, Option]) -> dict[str, Any]:
    """diffusers' defaults filled in; every unknown or unimplemented option collected and refused in one message."""
    problems = [f"unknown option {key!r}" for key in config if not key.startswith("_") and key not in options]
    resolved = {}
    for key, (default, supported) in options.items():
        value = config.get(key, default)
        if supported is not None and value not in supported:
            problems.append(f"{key}={value!r} (supported: {', '.join(map(repr, supported))})")
        resolved[key] = value
    if problems:
        raise ValueError(
            f"{name} config not supported by the on-device runtime: {'; '.join(problems)}. "
            "Save the pipeline with a supported scheduler config, or sample with the torch pipeline."
        )
    return resolved


class _Scheduler:
    """What every scheduler shares: resolved config, alpha_bar table, timesteps and the step counter."""

    diffusers_name: ClassVar[str]
    options: ClassVar[dict[str, Option]]
    lifts_zero_terminal: ClassVar[bool] = False  # see `_alphas_cumprod`
    init_noise_sigma: float = 1.0

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = MappingProxyType(_resolve(self.diffusers_name, config or {}, self.options))
        self.alphas_cumprod = _alphas_cumprod(self.config, self.lifts_zero_terminal)  # (T,) float32
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()  # int64, until set_timesteps
        self._step_index: int | None = None

    @classmethod
    def from_config(cls: type[_S], config: Mapping[str, Any]) -> _S:
        return cls(config)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        return sample

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps(num_inference_steps)")
        return self.num_inference_steps

    def _index_of(self, timestep: Any) -> int:
        """Where `timestep` is in `timesteps` (its second place if repeated, as diffusers does). diffusers' DPM-Solver
        falls back to the last step for a timestep not in the schedule; this refuses it instead."""
        matches = np.flatnonzero(self.timesteps == timestep)
        if len(matches) == 0:
            raise ValueError(f"timestep {timestep} is not one of {type(self).__name__}.timesteps {self.timesteps}")
        return int(matches[1] if len(matches) > 1 else matches[0])


def _spaced_timesteps(config: Mapping[str, Any], count: int, rounded: bool = True) -> np.ndarray:
    """(count,) descending float64 inference timesteps in diffusers' three spacings (arXiv 2305.08891, Table 2), as
    Euler, DDIM and PNDM make them (DPM-Solver has its own variant). Euler keeps "linspace" unrounded."""
    spacing, num_train, offset = config["timestep_spacing"], config["num_train_timesteps"], config["steps_offset"]
    if spacing == "linspace":
        steps = np.linspace(0, num_train - 1, count)[::-1]
        return steps.round() if rounded else steps
    if spacing == "leading":  # evenly from 0 up, shifted by `steps_offset`
        return (np.arange(0, count) * (num_train // count)).round()[::-1] + offset
    # "trailing": from the last train timestep down, so that the first step starts from pure noise
    return np.arange(num_train, 0, -num_train / count).round() - 1


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """Variance-preserving (alpha_t, sigma_t) of the Karras-style sigma = sigma_t / alpha_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _half_log_snr(sigma: np.float32) -> np.float32:
    """lambda = log(alpha_t / sigma_t); +inf at sigma = 0 (the final step to a clean sample)."""
    alpha, sigma_t = _alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma_t)


# --- DPM-Solver++ ----------------------------------------------------------------------------------------------


class DPMSolverMultistep(_Scheduler):
    """DPM-Solver++ (arXiv 2211.01095), orders 1-3, midpoint or Heun second order, as diffusers'
    `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`. Deterministic: no noise is drawn."""

    diffusers_name = "DPMSolverMultistepScheduler"
    lifts_zero_terminal = True
    options = _SCHEDULE_OPTIONS | {
        "solver_order": (2, (1, 2, 3)),
        "prediction_type": ("epsilon", ("epsilon", "sample", "v_prediction")),
        "algorithm_type": ("dpmsolver++", ("dpmsolver++",)),
        "solver_type": ("midpoint", ("midpoint", "heun")),
        "lower_order_final": (True, None),
        "euler_at_final": (False, None),
        "final_sigmas_type": ("zero", ("zero", "sigma_min")),
        "lambda_min_clipped": (-math.inf, None),
        "timestep_spacing": ("linspace", _SPACINGS),
        "rescale_betas_zero_snr": (False, None),
        "thresholding": (False, _OFF),
        "dynamic_thresholding_ratio": (0.995, None),
        "sample_max_value": (1.0, None),
        "variance_type": (None, (None,)),
        "use_karras_sigmas": (False, _OFF),
        "use_exponential_sigmas": (False, _OFF),
        "use_beta_sigmas": (False, _OFF),
        "use_lu_lambdas": (False, _OFF),
        "use_flow_sigmas": (False, _OFF),
        "flow_shift": (1.0, None),
        "use_dynamic_shifting": (False, _OFF),
        "time_shift_type": ("exponential", None),
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        acp = self.alphas_cumprod
        self.train_sigmas = ((1 - acp) / acp) ** 0.5  # (T,) float32
        self.timesteps = self.timesteps.astype(np.float32)  # diffusers' dtype until set_timesteps
        self.sigmas = self.train_sigmas
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]  # x0 predictions
        self.lower_order_nums = 0
        self._step_index = None

    def _last_timestep(self) -> int:
        """One past the last usable train timestep: those with lambda below `lambda_min_clipped` are cut (cosine)."""
        acp = self.alphas_cumprod
        lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))  # (T,) decreasing
        clipped = int(np.searchsorted(lambdas[::-1], self.config["lambda_min_clipped"]))
        return self.config["num_train_timesteps"] - clipped

    def _spaced(self, count: int) -> np.ndarray:
        """(count,) int64 descending. Unlike Euler's, "linspace" and "leading" make count + 1 points, drop the last."""
        spacing, last = self.config["timestep_spacing"], self._last_timestep()
        if spacing == "linspace":
            return np.linspace(0, last - 1, count + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            steps = (np.arange(0, count + 1) * (last // (count + 1))).round()[::-1][:-1].astype(np.int64)
            return steps + self.config["steps_offset"]
        ratio = self.config["num_train_timesteps"] / count  # all T train steps, even when `last` is clipped
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = self._spaced(num_inference_steps)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)  # (n,) float64
        acp0 = self.alphas_cumprod[0]
        last = ((1 - acp0) / acp0) ** 0.5 if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def _x0(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++ integrates the data prediction: turn whatever the UNet predicts into x0."""
        prediction = self.config["prediction_type"]
        if prediction == "sample":
            return model_output
        alpha, sigma = _alpha_sigma(self.sigmas[self._step_index])
        if prediction == "epsilon":
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output  # v_prediction

    def _first_order(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        (alpha_t, sigma_t), (_, sigma_s) = _alpha_sigma(self.sigmas[i + 1]), _alpha_sigma(self.sigmas[i])
        h = _half_log_snr(self.sigmas[i + 1]) - _half_log_snr(self.sigmas[i])
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0

    def _second_order(self, sample: np.ndarray) -> np.ndarray:
        i, (m0, m1) = self._step_index, self.model_outputs[-1:-3:-1]
        (alpha_t, sigma_t), (_, sigma_s0) = _alpha_sigma(self.sigmas[i + 1]), _alpha_sigma(self.sigmas[i])
        lambda_t, lambda_s0, lambda_s1 = (_half_log_snr(self.sigmas[j]) for j in (i + 1, i, i - 1))
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        d0, d1 = m0, (1.0 / (h_0 / h)) * (m0 - m1)
        if self.config["solver_type"] == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
            )
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (np.exp(-h) - 1.0)) * d0
            + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
        )

    def _third_order(self, sample: np.ndarray) -> np.ndarray:
        i, (m0, m1, m2) = self._step_index, self.model_outputs[-1:-4:-1]
        (alpha_t, sigma_t), (_, sigma_s0) = _alpha_sigma(self.sigmas[i + 1]), _alpha_sigma(self.sigmas[i])
        lambda_t, lambda_s0, lambda_s1, lambda_s2 = (_half_log_snr(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2))
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (np.exp(-h) - 1.0)) * m0
            + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
            - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
        )

    def _order_now(self) -> int:
        """The solver order of this step: warm-up from first order, and lower orders at the end for few steps."""
        count, i, few = len(self.timesteps), self._step_index, len(self.timesteps) < 15
        final = i == count - 1 and (
            self.config["euler_at_final"]
            or (self.config["lower_order_final"] and few)
            or self.config["final_sigmas_type"] == "zero"  # the last sigma is 0: lambda is infinite, h too
        )
        second_last = i == count - 2 and self.config["lower_order_final"] and few
        order = self.config["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if order == 2 or self.lower_order_nums < 2 or second_last:
            return 2
        return 3

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        self._require_timesteps()
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        order = self._order_now()
        x0 = self._x0(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.astype(np.float32)
        if order == 1:
            prev = self._first_order(x0, sample)
        else:
            prev = self._second_order(sample) if order == 2 else self._third_order(sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config["solver_order"])
        self._step_index += 1
        return SchedulerOutput(prev.astype(model_output.dtype))


# --- Euler -----------------------------------------------------------------------------------------------------


class EulerDiscrete(_Scheduler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al., Algorithm 2 without churn), as diffusers'
    `EulerDiscreteScheduler`. The sample lives at scale sqrt(sigma^2 + 1), so `scale_model_input` must be called."""

    diffusers_name = "EulerDiscreteScheduler"
    lifts_zero_terminal = True
    options = _SCHEDULE_OPTIONS | {
        "prediction_type": ("epsilon", ("epsilon", "v_prediction", "sample", "original_sample")),
        "interpolation_type": ("linear", ("linear",)),
        "timestep_spacing": ("linspace", _SPACINGS),
        "timestep_type": ("discrete", ("discrete",)),
        "final_sigmas_type": ("zero", ("zero", "sigma_min")),
        "rescale_betas_zero_snr": (False, None),
        "use_karras_sigmas": (False, _OFF),
        "use_exponential_sigmas": (False, _OFF),
        "use_beta_sigmas": (False, _OFF),
        "sigma_min": (None, None),  # read only by the refused sigma schedules above
        "sigma_max": (None, None),
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        acp = self.alphas_cumprod
        self.train_sigmas = ((1 - acp) / acp) ** 0.5  # (T,) float32, ascending in t
        self.timesteps = self.timesteps.astype(np.float32)
        self.sigmas = np.concatenate([self.train_sigmas[::-1], np.zeros(1, np.float32)])  # (T + 1,)

    @property
    def init_noise_sigma(self) -> float:
        """The std of the starting latents, sqrt(sigma_max^2 + 1); diffusers drops the +1 for "linspace" and
        "trailing" (whose sigma_max is the train schedule's top), and so does this."""
        top = self.sigmas.max()
        return float(top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        # Euler alone keeps its timesteps float32, and "linspace" ones fractional
        timesteps = _spaced_timesteps(c, num_inference_steps, rounded=False).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)  # (n,) float64
        acp0 = self.alphas_cumprod[0]
        last = ((1 - acp0) / acp0) ** 0.5 if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        self._require_timesteps()
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        sample = sample.astype(np.float32)
        sigma = self.sigmas[self._step_index]
        prediction = self.config["prediction_type"]
        if prediction in ("sample", "original_sample"):
            x0 = model_output
        elif prediction == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction: c_out * v + c_skip * x
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (self.sigmas[self._step_index + 1] - sigma)
        self._step_index += 1
        return SchedulerOutput(prev.astype(model_output.dtype))


# --- DDIM and PNDM: the alpha_bar schedulers -------------------------------------------------------------------


class DDIM(_Scheduler):
    """Deterministic DDIM (eta = 0) as diffusers' `DDIMScheduler`; the stochastic eta > 0 variant is not offered."""

    diffusers_name = "DDIMScheduler"
    options = _SCHEDULE_OPTIONS | {
        "prediction_type": ("epsilon", ("epsilon", "sample", "v_prediction")),
        "clip_sample": (True, None),
        "clip_sample_range": (1.0, None),
        "set_alpha_to_one": (True, None),
        "timestep_spacing": ("leading", _SPACINGS),
        "rescale_betas_zero_snr": (False, None),
        "thresholding": (False, _OFF),
        "dynamic_thresholding_ratio": (0.995, None),
        "sample_max_value": (1.0, None),
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        # alpha_bar "before" the first train step: 1 (clean) or, as SD's configs ask, alpha_bar[0]
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        if num_inference_steps > c["num_train_timesteps"]:
            raise ValueError(f"{num_inference_steps} DDIM steps asked, but the model has {c['num_train_timesteps']}")
        spaced = _spaced_timesteps(c, num_inference_steps)
        self.timesteps = spaced.astype(np.int64)
        self.num_inference_steps = num_inference_steps

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        count = self._require_timesteps()
        t = int(timestep)
        prev_t = t - self.config["num_train_timesteps"] // count
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1 - alpha_t
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            x0, eps = (sample - beta_t**0.5 * model_output) / alpha_t**0.5, model_output
        elif prediction == "sample":
            x0 = model_output
            eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
        else:  # v_prediction
            x0 = (alpha_t**0.5) * sample - (beta_t**0.5) * model_output
            eps = (alpha_t**0.5) * model_output + (beta_t**0.5) * sample
        if self.config["clip_sample"]:
            bound = self.config["clip_sample_range"]
            x0 = np.clip(x0, -bound, bound)
        prev = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        return SchedulerOutput(prev.astype(model_output.dtype))


class PNDM(_Scheduler):
    """PLMS: the linear multistep half of PNDM (arXiv 2202.09778), as diffusers' `PNDMScheduler` with
    `skip_prk_steps=True` (Stable Diffusion 1.x's shipped scheduler). The Runge-Kutta warm-up is not offered."""

    diffusers_name = "PNDMScheduler"
    options = _SCHEDULE_OPTIONS | {
        "skip_prk_steps": (False, (True,)),
        "set_alpha_to_one": (False, None),
        "prediction_type": ("epsilon", ("epsilon", "v_prediction")),
        "timestep_spacing": ("leading", _SPACINGS),
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.ets: list[np.ndarray] = []  # the last (up to 4) noise predictions, oldest first
        self.counter = 0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        spaced = _spaced_timesteps(c, num_inference_steps)
        ascending = spaced[::-1]
        # PLMS repeats the second timestep: its second step re-does the first from the averaged noise (a Heun start)
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        self.timesteps = plms.astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self.ets, self.counter = [], 0

    def _combined_eps(self, model_output: np.ndarray) -> np.ndarray:
        """Adams-Bashforth over the stored noise predictions, its order growing with the history."""
        e = self.ets
        if len(e) == 2:
            return (3 * e[-1] - e[-2]) / 2
        if len(e) == 3:
            return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        return (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        count = self._require_timesteps()
        stride = self.config["num_train_timesteps"] // count
        t, prev_t = int(timestep), int(timestep) - stride
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:  # the repeated timestep: step again from the first sample, over the first interval
            t, prev_t = t + stride, t
        if len(self.ets) == 1 and self.counter == 0:
            eps, self.cur_sample = model_output, sample
        elif len(self.ets) == 1 and self.counter == 1:
            eps, sample, self.cur_sample = (model_output + self.ets[-1]) / 2, self.cur_sample, None
        else:
            eps = self._combined_eps(model_output)
        prev = self._prev_sample(sample, t, prev_t, eps)
        self.counter += 1
        return SchedulerOutput(prev.astype(model_output.dtype))

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, eps: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper: x_{t-1} from x_t and a noise estimate."""
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        if self.config["prediction_type"] == "v_prediction":
            eps = (alpha_t**0.5) * eps + (beta_t**0.5) * sample
        sample_coeff = (alpha_prev / alpha_t) ** 0.5
        denom = alpha_t * beta_prev**0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
        return sample_coeff * sample - (alpha_prev - alpha_t) * eps / denom


# --- the factory -----------------------------------------------------------------------------------------------

Scheduler = DPMSolverMultistep | EulerDiscrete | DDIM | PNDM
SCHEDULERS: dict[str, type[_Scheduler]] = {
    cls.diffusers_name: cls for cls in (DPMSolverMultistep, EulerDiscrete, DDIM, PNDM)
}


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """The numpy scheduler for a diffusers `scheduler_config.json` dict, chosen by its `_class_name`."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler {name!r} is not supported by the on-device runtime; supported: {', '.join(SCHEDULERS)} "
            "(convert it with e.g. DPMSolverMultistepScheduler.from_config(...) and save the pipeline again)"
        )
    return SCHEDULERS[name](config)
