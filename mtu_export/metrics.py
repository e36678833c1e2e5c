"""Signal-quality measures shared by export validation, evaluation and the benchmarks: one PSNR (None for identical
inputs, everywhere), its mean over images, PSNR inside a mask, and SSIM."""

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


def as_db(value: float | None) -> float:
    """A PSNR as a number to average: an identical pair (None) counts as +inf, so a mean that includes one is inf."""
    return math.inf if value is None else value


def masked_psnr_db(reference: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR of uint8 images over the pixels inside `mask` only (inpainting: how well the hole was filled); None when
    those pixels are identical (or the mask is empty)."""
    return psnr_db(reference[mask], image[mask], peak=UINT8_PEAK)


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity of uint8 (H, W, 3) images."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, image, channel_axis=2, data_range=255))
