"""PNG grids of shapes-world examples (the `mtu-export world` command) and `make demo`'s input files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtu_export.config import did_you_mean
from mtu_export.errors import ConfigError
from mtu_export.image_processor import save_image
from mtu_export.shapes.world import SPLITS, TASKS, example_grid
from mtu_export.storage import atomic_output


def write_grid(out: Path, task: str, split: str, count: int, start: int = 0, overwrite: bool = False) -> Path:
    if not 1 <= count <= 64:
        raise ConfigError(f"a grid shows 1 to 64 examples per task, got --count {count}")
    if start < 0:
        raise ConfigError(f"--start must be >= 0, got {start}")
    tasks = list(TASKS) if task == "all" else [task]
    for name, known in ((task, [*TASKS, "all"]), (split, list(SPLITS))):
        if name not in known:
            raise ConfigError(f"unknown value {name!r}; known: {', '.join(known)}{did_you_mean(name, known)}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {out.name!r}")
    with atomic_output(out, overwrite=overwrite, file=True) as tmp:
        blocks = [example_grid(t, split, count, start) for t in tasks]
        height = max(b.shape[0] for b in blocks)
        padded = [np.pad(b, ((0, height - b.shape[0]), (0, 12), (0, 0)), constant_values=255) for b in blocks]
        save_png(tmp, np.concatenate(padded, axis=1)[:, :-12])
    return out


def write_images(out: Path, images: list[np.ndarray], columns: int = 8, zoom: int = 2) -> Path:
    """Tile uint8 (H, W, 3) images into a grid PNG at `out` (a path of an output being written: storage.
    atomic_output), `columns` per row, 2 px white gutters, upscaled by `zoom`."""
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    return save_png(out, canvas.repeat(zoom, axis=0).repeat(zoom, axis=1))


def save_png(out: Path, picture: np.ndarray) -> Path:
    """Write a uint8 picture as PNG atomically (temp file, then rename)."""
    return save_image(out, picture, "PNG")


def write_demo_inputs(folder: Path, index: int = 0) -> Path:
    """One held-out example per task as files `generate` takes: `<task>.png` (the task's input image; t2i: its
    ground truth, for reference), `<task>.txt` (prompt or instruction) and `mask.png` (inpainting, white = hole)."""
    from mtu_export.shapes.world import make_example

    folder = Path(folder)
    for task in TASKS:
        example = make_example(task, "heldout", index)
        picture = example.target if example.input is None else example.input
        if example.mask is not None:
            picture = example.target  # generate masks it itself, as the diffusers inpainting pipeline does
            save_png(folder / "mask.png", example.mask.astype(np.uint8) * 255)
        save_png(folder / f"{task}.png", picture)
        (folder / f"{task}.txt").write_text(example.prompt + "\n")
    return folder


if __name__ == "__main__":
    import sys

    print(f"wrote {write_demo_inputs(Path(sys.argv[1]))}")
