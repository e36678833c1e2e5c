"""Signal-quality measures shared by export validation, evaluation and the benchmarks."""

from __future__ import annotations

import math

import numpy as np


def psnr_db(reference: np.ndarray, output: np.ndarray, peak: float | None = None) -> float | None:
    """20·log10(peak / RMSE); peak defaults to max |reference|. None when identical."""
    reference, output = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    rmse = math.sqrt(float(np.mean((reference - output) ** 2)))
    if rmse == 0:
        return None
    peak = float(np.abs(reference).max()) if peak is None else peak
    return 20 * math.log10(max(peak, 1e-12) / rmse)
