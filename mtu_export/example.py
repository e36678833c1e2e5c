"""The example record every stage passes around, whatever its source (the shapes world or a user's dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Example:
    """One training, evaluation or request example, its images in the roles the dataset columns name (tasks.py:
    `TaskDef.columns`). Images are uint8 (H, W, 3); `mask` is bool (H, W), True = hole."""

    task: str
    prompt: str  # caption or edit instruction
    target: np.ndarray  # the image to produce (inpainting: the whole image, whose hole is repainted)
    source: np.ndarray | None = None  # an edit's image to change
    low_res: np.ndarray | None = None  # super-resolution's small image
    mask: np.ndarray | None = None  # inpainting's hole
    scene: Any = None  # the shapes world's scene, which its reader scores outputs against; None for datasets
    source_scene: Any = None  # the shapes world's scene of an edit's source image

    @property
    def input(self) -> np.ndarray | None:
        """The task's input image, whatever its role: the source, the low-res image, or the target with its hole
        zeroed (what an inpainting model is shown); None for text-to-image."""
        if self.mask is not None:
            return np.where(self.mask[..., None], np.uint8(0), self.target)
        return self.source if self.source is not None else self.low_res
