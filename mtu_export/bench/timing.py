"""The two interleaved timing protocols every benchmark here uses: A and B always alternate (A B, B A, …) so that
machine noise hits both alike, and only their ratio is reported as the measurement.

- `interleaved_rounds`: single UNet calls, in rounds that each open both graphs afresh (the UNet latency rows);
- `interleaved`: whole samples (an end-to-end generation, a quantized graph, a training step), optionally repeated
  until a sample lasts `MIN_SAMPLE_SECONDS`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

MIN_SAMPLE_SECONDS = 0.25  # a timed sample repeats a short call until it lasts this long (timer and noise floor)


def interleaved(
    run_a: Callable[[], object], run_b: Callable[[], object], repeats: int, warmup: int, min_seconds: float = 0.0
) -> dict:
    """Time A and B alternately (A B, B A, …). The headline `ratio` is median(A) ÷ median(B); the median of
    per-pair ratios, their range and the ratio of minimums are kept beside it (on a shared machine the per-pair
    ratio of two identical graphs scattered by ±10 %, the ratio of medians by ±1 %).

    With `min_seconds`, each sample runs the call `inner` times (the same count for A and B, from the warm-up's
    timing) so that a sample lasts at least that long; times are then per call."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        run_a(), run_b()
    per_pair = (time.perf_counter() - start) / max(1, warmup)
    inner = max(1, math.ceil(2 * min_seconds / per_pair)) if min_seconds else 1
    times_a, times_b = [], []
    for i in range(repeats):
        order = ((run_a, times_a), (run_b, times_b)) if i % 2 == 0 else ((run_b, times_b), (run_a, times_a))
        for fn, sink in order:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sink.append((time.perf_counter() - start) / inner)
    ratios = [a / b for a, b in zip(times_a, times_b, strict=True)]
    return {
        "a_median_ms": 1e3 * statistics.median(times_a),
        "b_median_ms": 1e3 * statistics.median(times_b),
        "a_spread_ms": 1e3 * (max(times_a) - min(times_a)),
        "b_spread_ms": 1e3 * (max(times_b) - min(times_b)),
        "ratio": statistics.median(times_a) / statistics.median(times_b),
        "pair_ratio_median": statistics.median(ratios),
        "pair_ratio_range": [min(ratios), max(ratios)],
        "ratio_of_minimums": min(times_a) / min(times_b),
        "repeats": repeats,
        "calls_per_sample": inner,
    }


def interleaved_rounds(
    open_a: Callable[[], Callable[[], object]],
    open_b: Callable[[], Callable[[], object]],
    rounds: int,
    pairs: int,
    warmup: int,
) -> dict:
    """Time two graphs call by call, alternating (A B, B A, …), in `rounds` rounds that each open both afresh
    (`open_x()` returns a fresh session's call; the side opened first alternates too). Per round the ratio is
    median(A) ÷ median(B) over its `pairs` pairs; the headline `ratio` is the median of the round ratios.

    The sessions must not spin (`session(..., spinning=False)`): with onnxruntime's default, the threads of the
    session that just ran busy-wait while the other one runs, and the same graph timed against itself scattered by
    ±10 % per round on 2 cores (±1 % without). Fresh sessions per round keep one session's memory placement from
    biasing a whole comparison; timing each call alone keeps a burst of machine noise from spreading over a sample."""
    round_ratios, medians_a, medians_b = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            run_a, run_b = open_a(), open_b()
        else:
            run_b, run_a = open_b(), open_a()
        for _ in range(max(1, warmup)):
            run_a(), run_b()
        times_a, times_b = [], []
        for i in range(pairs):
            order = ((run_a, times_a), (run_b, times_b)) if (i + r) % 2 == 0 else ((run_b, times_b), (run_a, times_a))
            for fn, sink in order:
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
        medians_a.append(statistics.median(times_a))
        medians_b.append(statistics.median(times_b))
        round_ratios.append(medians_a[-1] / medians_b[-1])
        del run_a, run_b
    return {
        "ratio": statistics.median(round_ratios),
        "round_ratios": round_ratios,
        "a_median_ms": 1e3 * statistics.median(medians_a),
        "b_median_ms": 1e3 * statistics.median(medians_b),
        "rounds": rounds,
        "pairs_per_round": pairs,
    }
