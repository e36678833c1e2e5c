"""Signal-quality measures shared by export validation, evaluation and the benchmarks: one PSNR (None for identical
inputs, everywhere), its summary over a set of image pairs (never inf or NaN), and SSIM."""

from __future__ import annotations

import math

import numpy as np

UINT8_PEAK = 255.0  # the peak of uint8 images, for PSNRs of generated pictures


def psnr_db(reference: np.ndarray, output: np.ndarray, peak: float | None = None) -> float | None:
    """20·log10(peak / RMSE); peak defaults to max |reference| (pass UINT8_PEAK for images). None when identical."""
    reference, output = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    rmse = math.sqrt(float(np.mean((reference - output) ** 2))) if reference.size else 0.0
    if rmse == 0:
        return None
    peak = float(np.abs(reference).max()) if peak is None else peak
    return 20 * math.log10(max(peak, 1e-12) / rmse)


def set_psnr(pairs: list[tuple[np.ndarray, np.ndarray]], peak: float = UINT8_PEAK) -> dict:
    """A set of (reference, output) pairs in one summary that is never inf or NaN:

    - `mean_db`: the mean PSNR over the pairs that differ (an identical pair has no finite PSNR; it is counted in
      `identical` instead of turning the mean into inf);
    - `set_db`: the PSNR of the set's mean squared error over all its pixels, what torchmetrics' PSNR reports;
    - `identical`, `pairs`: how many pairs were identical, of how many (pairs without pixels are skipped).
    Either PSNR is None when no pixel of the set differs."""
    values, squared, pixels, identical, counted = [], 0.0, 0, 0, 0
    for reference, output in pairs:
        reference, output = np.asarray(reference, np.float64), np.asarray(output, np.float64)
        if not reference.size:
            continue
        counted += 1
        error = float(np.sum((reference - output) ** 2))
        squared, pixels = squared + error, pixels + reference.size
        if error == 0:
            identical += 1
        else:
            values.append(psnr_db(reference, output, peak))
    mse = squared / pixels if pixels else 0.0
    return {
        "mean_db": float(np.mean(values)) if values else None,
        "set_db": 10 * math.log10(peak**2 / mse) if mse > 0 else None,
        "identical": identical,
        "pairs": counted,
    }


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity of uint8 (H, W, 3) images."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, image, channel_axis=2, data_range=255))
