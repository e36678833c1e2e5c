"""The example record every stage passes around, whatever its source (the shapes world or a user's dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Example:
    """One training, evaluation or request example. Images are uint8 (H, W, 3); `mask` is bool (H, W), True = hole.

    `source` is the task's input image in the role its columns name: edit's source image, super-resolution's
    low-res image, inpainting's masked image (None for text-to-image)."""

    task: str
    prompt: str
    target: np.ndarray
    scene: Any = None  # the shapes world's scene, which its reader scores outputs against; None for datasets
    source: np.ndarray | None = None
    mask: np.ndarray | None = None
    source_scene: Any = None  # the shapes world's scene of an edit's source image
