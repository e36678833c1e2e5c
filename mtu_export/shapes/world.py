"""The shapes world: a procedural, seeded multi-task data source (no files, no downloads).

64×64 RGB scenes of 1–3 objects (4 shapes, 6 colours, 2 sizes, a 3×3 grid of positions) on a plain or two-tone
background, each with a caption generated from its scene graph. From one scene graph it yields exact ground
truth for every MTU task:

- `t2i`     caption -> image
- `edit`    source image + instruction (recolour, remove, add, move, resize, change background) -> edited image
- `sr`      16×16 image (4×4 area downsampling) + caption -> 64×64 image
- `inpaint` image with a masked region (box or free-form strokes) + mask + caption -> full image

Splits: `train`, `heldout` (same distribution, disjoint seeds) and `unseen` (every scene holds at least one
shape–colour pair that `train` and `heldout` never contain).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mtu_export.example import Example

SIZE = 64
LOW_RES = 16
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (215, 195, 150),
}
RADIUS = {"small": 5, "large": 9}
JITTER = {"small": 3, "large": 1}
POSITIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
# Shape-colour pairs kept out of `train` and `heldout`; every `unseen` scene holds at least one.
UNSEEN_PAIRS = frozenset({("circle", "purple"), ("square", "orange"), ("triangle", "blue"), ("diamond", "green")})
TASKS = ("t2i", "edit", "sr", "inpaint")
SPLITS = {"train": 0, "heldout": 1, "unseen": 2}
EDIT_KINDS = ("recolour", "remove", "add", "move", "resize", "background")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major on a 3×3 grid
    dx: int = 0  # pixel jitter around the cell centre
    dy: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[str, ...]  # one colour, or two for a two-part background
    layout: str = "none"  # of the background: "none", "vertical" (first colour left), "horizontal" (first on top)

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        things = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{things} on a {' and '.join(self.background)} background"


# ------------------------------------------------------------------------------------------------------- rendering
def cell_centre(obj: Obj) -> tuple[float, float]:
    row, col = divmod(obj.cell, 3)
    return SIZE * (col + 0.5) / 3 + obj.dx, SIZE * (row + 0.5) / 3 + obj.dy


def shape_mask(obj: Obj) -> np.ndarray:
    """Boolean (64, 64) footprint of one object, evaluated at pixel centres."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy = cell_centre(obj)
    r = RADIUS[obj.size]
    dx, dy = x - cx, y - cy
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if obj.shape == "triangle":  # apex up, base at the bottom
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> np.ndarray:
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background[0]]
    if scene.layout == "vertical":
        image[:, SIZE // 2 :] = BACKGROUNDS[scene.background[1]]
    elif scene.layout == "horizontal":
        image[SIZE // 2 :] = BACKGROUNDS[scene.background[1]]
    for obj in scene.objects:
        image[shape_mask(obj)] = COLOURS[obj.colour]
    return image


def downsample(image: np.ndarray, size: int = LOW_RES) -> np.ndarray:
    """Area (box) downsampling, rounded to uint8: (64, 64, 3) -> (16, 16, 3)."""
    f = image.shape[0] // size
    blocks = image.reshape(size, f, size, f, 3).astype(np.float64).mean(axis=(1, 3))
    return np.round(blocks).astype(np.uint8)


# -------------------------------------------------------------------------------------------------------- sampling
def example_seed(split: str, task: str, index: int) -> tuple[int, int, int]:
    """The seed of one example; its first element is the split's, so splits never share a seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return SPLITS[split], TASKS.index(task), index


def _rng(split: str, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng(example_seed(split, task, index))


def _allowed(objects: tuple[Obj, ...], split: str) -> bool:
    pairs = {(o.shape, o.colour) for o in objects}
    return bool(pairs & UNSEEN_PAIRS) if split == "unseen" else not pairs & UNSEEN_PAIRS


def _new_object(rng: np.random.Generator, taken_cells: set[int], taken_colours: set[str]) -> Obj:
    size = str(rng.choice(list(RADIUS)))
    j = JITTER[size]
    return Obj(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice([c for c in COLOURS if c not in taken_colours])),
        size=size,
        cell=int(rng.choice([c for c in range(9) if c not in taken_cells])),
        dx=int(rng.integers(-j, j + 1)),
        dy=int(rng.integers(-j, j + 1)),
    )


def sample_scene(rng: np.random.Generator, split: str, max_objects: int = 3) -> Scene:
    """A random scene whose shape-colour pairs respect the split; colours are distinct within a scene."""
    while True:
        objects: list[Obj] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            objects.append(_new_object(rng, {o.cell for o in objects}, {o.colour for o in objects}))
        if _allowed(tuple(objects), split):
            break
    if rng.random() < 0.6:
        return Scene(tuple(objects), (str(rng.choice(list(BACKGROUNDS))),))
    first, second = rng.choice(list(BACKGROUNDS), size=2, replace=False)
    return Scene(tuple(objects), (str(first), str(second)), str(rng.choice(["vertical", "horizontal"])))


def _edit(rng: np.random.Generator, scene: Scene, split: str) -> tuple[str, Scene] | None:
    """One random edit of `scene`: (instruction, edited scene), or None when this kind does not apply."""
    kind = str(rng.choice(EDIT_KINDS))
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    obj = objs[i]
    if kind == "recolour":
        colour = str(rng.choice([c for c in COLOURS if c not in {o.colour for o in objs}]))
        objs[i] = replace(obj, colour=colour)
        text = f"make the {obj.name} {colour}"
    elif kind == "remove" and len(objs) > 1:
        del objs[i]
        text = f"remove the {obj.name}"
    elif kind == "add" and len(objs) < 3:
        new = _new_object(rng, {o.cell for o in objs}, {o.colour for o in objs})
        objs.append(new)
        text = f"add {new.phrase()}"
    elif kind == "move":
        cell = int(rng.choice([c for c in range(9) if c not in {o.cell for o in objs}]))
        objs[i] = replace(obj, cell=cell)
        text = f"move the {obj.name} {POSITIONS[cell].replace('at the', 'to the').replace('in the', 'to the')}"
        text = text.replace("on the", "to the")
    elif kind == "resize":
        size = "small" if obj.size == "large" else "large"
        objs[i] = replace(obj, size=size, dx=0, dy=0)
        text = f"make the {obj.name} {size}"
    elif kind == "background":
        colour = str(rng.choice([c for c in BACKGROUNDS if c not in scene.background]))
        return f"change the background to {colour}", Scene(scene.objects, (colour,))
    else:
        return None
    edited = Scene(tuple(objs), scene.background, scene.layout)
    return (text, edited) if _allowed(edited.objects, split) or split == "unseen" else None


def _inpaint_mask(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """A box (half the time around an object) or free-form thick strokes; never empty, never the whole image."""
    mask = np.zeros((SIZE, SIZE), bool)
    if rng.random() < 0.5:
        h, w = (int(v) for v in rng.integers(12, 33, size=2))
        if rng.random() < 0.5:
            cx, cy = cell_centre(scene.objects[int(rng.integers(len(scene.objects)))])
        else:
            cx, cy = rng.uniform(16, 48, size=2)
        y0, x0 = int(np.clip(cy - h / 2, 0, SIZE - h)), int(np.clip(cx - w / 2, 0, SIZE - w))
        mask[y0 : y0 + h, x0 : x0 + w] = True
        return mask
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for _ in range(int(rng.integers(1, 4))):
        px, py = rng.uniform(8, 56, size=2)
        width = rng.uniform(3, 7)
        for _ in range(int(rng.integers(4, 9))):
            angle = rng.uniform(0, 2 * np.pi)
            qx, qy = np.clip(px + 8 * np.cos(angle), 0, SIZE), np.clip(py + 8 * np.sin(angle), 0, SIZE)
            for t in np.linspace(0, 1, 6):
                mask |= (x - (px + t * (qx - px))) ** 2 + (y - (py + t * (qy - py))) ** 2 <= width**2
            px, py = qx, qy
    return mask


def _edit_example(task: str, rng: np.random.Generator, split: str) -> Example:
    while True:
        source_scene = sample_scene(rng, split)
        edit = _edit(rng, source_scene, split)
        if edit is not None:
            break
    text, scene = edit
    return Example(task, text, render(scene), source=render(source_scene), scene=scene, source_scene=source_scene)


def _t2i_example(task: str, rng: np.random.Generator, split: str) -> Example:
    scene = sample_scene(rng, split)
    return Example(task, scene.caption(), render(scene), scene=scene)


def _sr_example(task: str, rng: np.random.Generator, split: str) -> Example:
    scene = sample_scene(rng, split)
    image = render(scene)
    return Example(task, scene.caption(), image, low_res=downsample(image), scene=scene)


def _inpaint_example(task: str, rng: np.random.Generator, split: str) -> Example:
    scene = sample_scene(rng, split)
    image = render(scene)
    return Example(task, scene.caption(), image, mask=_inpaint_mask(rng, scene), scene=scene)


# the world's example families, one per built-in task (tasks.TaskDef.world names the one a task uses)
FAMILIES = {"t2i": _t2i_example, "edit": _edit_example, "sr": _sr_example, "inpaint": _inpaint_example}


def make_example(task: str, split: str, index: int) -> Example:
    """The deterministic example `index` of the family `task` in `split` (same arguments, same bytes)."""
    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[task](task, _rng(split, task, index), split)


# ------------------------------------------------------------------------------------------------------------ grid
def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def example_grid(task: str, split: str = "train", count: int = 8, start: int = 0, zoom: int = 2) -> np.ndarray:
    """A uint8 picture of `count` examples of `task`, one row each: [input(s) |] target."""
    rows = []
    gap = np.full((SIZE * zoom, 4, 3), 255, np.uint8)
    for index in range(start, start + count):
        ex = make_example(task, split, index)
        shown = ex.input  # the task's input image: the source, the low-res image, the image with its hole
        cells = [] if shown is None else [_upscale(shown, SIZE // shown.shape[0])]  # a low-res one too
        if ex.mask is not None:
            cells.append(np.repeat(ex.mask[..., None].astype(np.uint8) * 255, 3, axis=2))
        cells.append(ex.target)
        row = [x for cell in cells for x in (_upscale(cell, zoom), gap)][:-1]
        rows.append(np.concatenate(row, axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)
