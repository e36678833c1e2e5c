"""The scene reader: a deterministic metric for text-to-image in the shapes world (the role CLIP score plays for
Stable Diffusion). Given an image and a caption, it counts how many stated attributes hold: per object its colour,
shape, size and position, plus the background.

It classifies pixels to the nearest palette colour, takes the largest connected blob of each stated object colour
and measures it (fill ratio and widest row for the shape, extent for the size, centroid cell for the position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mtu_export.shapes.world import BACKGROUNDS, COLOURS, POSITIONS, SIZE, Obj, Scene

ATTRIBUTES = ("colour", "shape", "size", "position", "background")
_PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([COLOURS[c] for c in COLOURS] + [BACKGROUNDS[c] for c in BACKGROUNDS], np.float64)
MAX_COLOUR_DISTANCE = 70.0  # RGB distance beyond which a pixel belongs to no palette colour
MIN_BLOB_PIXELS = 12  # the smallest object (small triangle / diamond) covers about 50 pixels
SIZE_THRESHOLD = 14  # bounding-box extent in pixels: small objects span ~9-10, large ones ~16-18

_OBJECT = re.compile(
    r"a (small|large) (\w+) (circle|square|triangle|diamond) ("
    + "|".join(re.escape(p) for p in sorted(POSITIONS, key=len, reverse=True))  # longest first: "top right" > "top"
    + ")"
)
_BACKGROUND = re.compile(r"on a (\w+)(?: and (\w+))? background$")


def parse_caption(caption: str) -> Scene:
    """Invert `Scene.caption()` (positions become cells; jitter is not stated, so it is 0)."""
    objects = tuple(
        Obj(shape, colour, size, POSITIONS.index(position))
        for size, colour, shape, position in _OBJECT.findall(caption)
    )
    background = _BACKGROUND.search(caption)
    if not objects or background is None:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    colours = tuple(c for c in background.groups() if c)
    return Scene(objects, colours, "none" if len(colours) == 1 else "either")


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """(64, 64) int: palette index of each pixel's nearest colour, or -1 when none is close."""
    distance = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = distance.argmin(axis=-1)
    labels[distance.min(axis=-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


@dataclass(frozen=True)
class Blob:
    shape: str
    size: str
    cell: int


def measure_blob(mask: np.ndarray) -> Blob:
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    rows = mask[ys.min() : ys.max() + 1].sum(axis=1)
    widest = (np.flatnonzero(rows == rows.max()).mean() + 0.5) / height  # 0 top .. 1 bottom
    if fill > 0.9:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    else:
        shape = "triangle" if widest > 0.7 else "diamond"
    size = "large" if max(height, width) >= SIZE_THRESHOLD else "small"
    col = min(int(xs.mean() + 0.5) * 3 // SIZE, 2)
    row = min(int(ys.mean() + 0.5) * 3 // SIZE, 2)
    return Blob(shape, size, row * 3 + col)


def _background_holds(labels: np.ndarray, colours: tuple[str, ...]) -> bool:
    def share(region: np.ndarray, colour: str) -> float:
        free = region[(region >= len(COLOURS)) | (region < 0)]  # pixels not of an object colour
        return float((free == _PALETTE_NAMES.index(colour)).mean()) if free.size else 0.0

    if len(colours) == 1:
        return share(labels, colours[0]) >= 0.8
    half = SIZE // 2
    halves = [(labels[:, :half], labels[:, half:]), (labels[:half], labels[half:])]
    return any(share(a, colours[0]) >= 0.8 and share(b, colours[1]) >= 0.8 for a, b in halves)


def score(image: np.ndarray, caption: str) -> dict[str, tuple[int, int]]:
    """Attribute hits per kind, as (hits, stated), for one uint8 (64, 64, 3) image and its caption."""
    scene = parse_caption(caption)
    labels = classify_pixels(image)
    result = {a: [0, 0] for a in ATTRIBUTES}
    for obj in scene.objects:
        for attribute in ATTRIBUTES[:4]:
            result[attribute][1] += 1
        blobs, count = ndimage.label(labels == _PALETTE_NAMES.index(obj.colour))
        if count == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(blobs), blobs, index=range(1, count + 1))
        if sizes.max() < MIN_BLOB_PIXELS:
            continue
        blob = measure_blob(blobs == 1 + int(sizes.argmax()))
        result["colour"][0] += 1
        result["shape"][0] += blob.shape == obj.shape
        result["size"][0] += blob.size == obj.size
        result["position"][0] += blob.cell == obj.cell
    result["background"] = [int(_background_holds(labels, scene.background)), 1]
    return {k: (int(v[0]), int(v[1])) for k, v in result.items()}


def accuracy(scores: list[dict[str, tuple[int, int]]]) -> dict[str, float]:
    """Attribute accuracy per kind and overall (`all`) over many scored images."""
    totals = {a: [sum(s[a][0] for s in scores), sum(s[a][1] for s in scores)] for a in ATTRIBUTES}
    out = {a: hits / stated if stated else float("nan") for a, (hits, stated) in totals.items()}
    out["all"] = sum(h for h, _ in totals.values()) / max(1, sum(n for _, n in totals.values()))
    return out
