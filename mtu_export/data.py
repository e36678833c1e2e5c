"""Where examples come from: the built-in shapes world, or a user's dataset on disk read with Hugging Face `datasets`.

A source is a sized, indexable sequence of `world.Example`s of one task at one resolution (`Source`). Datasets are
read in the formats users already have: an image folder with `metadata.jsonl` / `metadata.csv`, a parquet, JSON
lines or CSV file whose image columns are paths relative to it, or a `save_to_disk` folder. Column names default to
diffusers' training scripts (t2i `image` + `text`; edit `input_image` + `edit_prompt` + `edited_image`), overridable
per task. Images are resized (shorter side) and centre-cropped to the resolution as those scripts do; `sr` derives
its low-res input by an antialiased bicubic downsample unless a `low_res_image` column gives it; `inpaint` reads a
`mask` column (white = hole) or draws a random box or free-form strokes per row (seeded by the row index).

Every problem with a dataset is one `InputError` line naming the file, row and column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mtu_export.config import DataSpec, TaskSpec
from mtu_export.errors import ConfigError, InputError
from mtu_export.example import Example
from mtu_export.image_processor import prepare_image, vae_factor
from mtu_export.shapes.world import SIZE, downsample, make_example
from mtu_export.tasks import BUILTIN, SR_SCALE, TaskDef

TABLE_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class Source(Protocol):
    """Examples of one task at one resolution, by index."""

    task: TaskDef

    def __len__(self) -> int: ...

    def example(self, index: int) -> Example: ...

    def describe(self) -> dict: ...


def parse_data(items: list[str] | None, column_items: list[str] | None = None) -> dict[str, DataSpec]:
    """`--data TASK=PATH` (repeatable) and `--column TASK.ROLE=NAME` (repeatable) -> one DataSpec per task."""
    specs: dict[str, DataSpec] = {}
    for item in items or []:
        task, _, path = item.partition("=")
        if not task or not path:
            raise ConfigError(f"--data {item!r} is not TASK=PATH, as in 'edit=data/edits'")
        if task in specs:
            raise ConfigError(f"--data gives task {task!r} twice; pass one dataset per task")
        specs[task] = DataSpec(task, path)
    for item in column_items or []:
        key, _, name = item.partition("=")
        task, _, role = key.partition(".")
        if not name or not role:
            raise ConfigError(f"--column {item!r} is not TASK.ROLE=COLUMN, as in 'edit.source=before'")
        if task not in specs:
            raise ConfigError(f"--column {item!r} names task {task!r}, which has no --data")
        specs[task] = replace(specs[task], columns={**specs[task].columns, role: name})
    return specs


def low_res_size(task: TaskDef, size: int, vae_factor: int) -> int:
    """Pixels of a super-resolution task's low-res input: latent resolution (RGB convention) or size / 4."""
    return size // task.input_scale(vae_factor)


def check_data_tasks(specs: dict[str, DataSpec], tasks: tuple[str, ...], where: str) -> None:
    """Refuse a `--data` for a task the model does not have."""
    extra = sorted(set(specs) - set(tasks))
    if extra:
        raise ConfigError(
            f"--data names task(s) {', '.join(extra)} that {where} lacks (it has {', '.join(tasks)}); "
            "drop them or use another checkpoint"
        )


def open_source(
    task: TaskDef, spec: DataSpec | None, split: str, size: int, vae_factor: int, count: int | None = None
) -> Source:
    """The user's dataset for `task` when `spec` is given, else the shapes world's `split` (built-in tasks only)."""
    if spec is not None:
        return DatasetSource(task, spec, size, low_res_size(task, size, vae_factor))
    if task.world is None:
        raise ConfigError(f"task {task.name!r} has no built-in examples; pass --data {task.name}=DATASET")
    return WorldSource(task, split, size, low_res_size(task, size, vae_factor), count)


def examples(source: Source, indices) -> list[Example]:
    return [source.example(i) for i in indices]


def task_geometry(source: Path) -> tuple[int, int]:
    """(latent channels, VAE factor) that set built-in tasks' default channels: from a pipeline folder's configs;
    a bare UNet folder has no VAE to read, so Stable Diffusion's 4 latent channels and the x4 convention."""
    if (Path(source) / "vae" / "config.json").is_file() and (Path(source) / "unet" / "config.json").is_file():
        latent, factor, _ = pipeline_geometry(source)
        return latent, factor
    return 4, SR_SCALE


def model_tasks_for(text: str, source: Path) -> tuple[TaskSpec, ...]:
    """Task specs from `t2i,edit,sr,inpaint,name:8` with the built-ins' channels for the model at `source` (its
    latent channels and VAE factor: sr is 8 channels on a factor-8 VAE such as SD1.5's, 7 on a factor-4 one), as
    `mtu-export upcycle` and `train` choose them; pass them to `MoEConfig` / `TrainConfig`."""
    from mtu_export.tasks import parse_tasks

    return parse_tasks(text, *task_geometry(source))


def pipeline_geometry(pipeline_dir: Path, unet: dict | None = None) -> tuple[int, int, int]:
    """(latent channels, VAE downsampling factor, default resolution in pixels) of a diffusers pipeline folder;
    `unet` is the UNet's config when the folder has none (a checkpoint's pipeline keeps its own UNet apart)."""
    from mtu_export.storage import read_json

    vae = read_json(Path(pipeline_dir) / "vae" / "config.json")
    unet = unet if unet is not None else read_json(Path(pipeline_dir) / "unet" / "config.json")
    factor = vae_factor(vae["block_out_channels"])
    sample = unet.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, list) else sample
    return int(vae.get("latent_channels", 4)), factor, int(sample) * factor


# -------------------------------------------------------------------------------------------------- shapes world
class WorldSource:
    """The shapes world's `split` of a built-in task, resized when the model works at another resolution."""

    def __init__(self, task: TaskDef, split: str, size: int, low_res: int, count: int | None = None) -> None:
        self.task, self.split, self.size, self.low_res = task, split, size, low_res
        self.count = count if count is not None else 10**9  # the world is endless; callers bound their ranges

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        return {"source": "shapes-world", "task": self.task.name, "split": self.split, "size": self.size}

    def example(self, index: int) -> Example:
        example = replace(make_example(self.task.world, self.split, index), task=self.task.name)
        if self.task.super_resolution and example.low_res.shape[0] != self.low_res:
            # another scale (sr2) or size: the target's box downsample when the sides divide, as the world makes its own
            whole = example.target.shape[0] % self.low_res == 0
            low_res = downsample(example.target, self.low_res) if whole else _resize(example.low_res, self.low_res)
            example = replace(example, low_res=low_res)
        if self.size == SIZE:
            return example
        source = None if example.source is None else _resize(example.source, self.size)
        mask = None if example.mask is None else _resize_mask(example.mask, self.size)
        return replace(example, target=_resize(example.target, self.size), source=source, mask=mask)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


# ------------------------------------------------------------------------------------------------- user datasets
def load_table(path: Path):
    """A `datasets.Dataset` from a local folder or file (no hub), or a one-line InputError."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if not path.exists():
        raise InputError(f"dataset {path} does not exist; pass a folder or a .parquet/.jsonl/.csv file")
    empty = _empty_file(path)
    if empty is not None:
        detail = "" if empty == path else f" ({empty.name} has no rows)"
        raise InputError(f"dataset {path} is empty{detail}; it needs at least one row")
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = table["train"] if "train" in table else next(iter(table.values()))
        elif path.is_dir():
            table = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        elif path.suffix in TABLE_FILES:
            table = datasets.load_dataset(TABLE_FILES[path.suffix], data_files=str(path), split="train")
        else:
            raise InputError(
                f"dataset {path} is not a folder or a {', '.join(TABLE_FILES)} file; "
                "pass an image folder with metadata.jsonl, a save_to_disk folder or a table file"
            )
    except InputError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input; one line each
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read dataset {path} ({type(exc).__name__}: {first})") from None
    if len(table) == 0:
        raise InputError(f"dataset {path} is empty; it needs at least one row")
    return table


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _empty_file(path: Path) -> Path | None:
    """The file that makes a dataset empty (a blank table file, a blank metadata file, a folder without files), or
    None; datasets reports these as IndexError or StopIteration."""
    candidates = [path] if path.is_file() else [path / name for name in METADATA_FILES if (path / name).is_file()]
    if path.is_dir() and not candidates and not any(p.is_file() for p in path.rglob("*")):
        return path
    for file in candidates:
        if file.suffix in (".jsonl", ".json", ".csv") and not file.read_text(errors="replace").strip():
            return file
        if file.stat().st_size == 0:
            return file
    return None


class DatasetSource:
    """A user's dataset for one task: rows -> Examples at `size` pixels (see the module docstring)."""

    def __init__(self, task: TaskDef, spec: DataSpec, size: int, low_res: int) -> None:
        unknown = sorted(set(spec.columns) - set(task.columns))
        if unknown:
            raise ConfigError(
                f"--column for {task.name}: unknown role(s) {', '.join(unknown)}; roles: {', '.join(task.columns)}"
            )
        self.task, self.spec, self.size, self.low_res = task, spec, size, low_res
        self.path = Path(spec.path)
        self.table = load_table(self.path)
        self.columns = {**task.columns, **spec.columns}
        found = list(self.table.column_names)
        optional = {"low_res", "mask"}  # derived when absent
        missing = [c for role, c in self.columns.items() if c not in found and role not in optional]
        if missing:
            raise InputError(
                f"dataset {self.path} for {task.name} has no column(s) {', '.join(missing)}; found: {', '.join(found)} "
                f"(rename them, or map them with --column {task.name}.ROLE=NAME)"
            )
        self.present = {role: c for role, c in self.columns.items() if c in found}
        self.table = _undecoded(self.table, self.present.values())
        self.base = self.path if self.path.is_dir() else self.path.parent

    def __len__(self) -> int:
        return len(self.table)

    def describe(self) -> dict:
        return {
            "source": "dataset",
            "task": self.task.name,
            "path": str(self.path.resolve()),
            "rows": len(self),
            "fingerprint": getattr(self.table, "_fingerprint", ""),
            "columns": self.present,
            "size": self.size,
            "resize": {"policy": "crop", "to": [self.size, self.size]},  # image_processor's training crop
        }

    def example(self, index: int) -> Example:
        row = self.table[index]
        prompt = row[self.present["prompt"]]
        if not isinstance(prompt, str):
            raise InputError(f"{self.path} row {index}: column {self.present['prompt']!r} is not text")
        target = self._image(row, "image", index)
        source = low_res = mask = None
        if "source" in self.present:
            source = self._image(row, "source", index)
            if source.size != target.size:
                raise InputError(
                    f"{self.path} row {index}: the {self.present['source']!r} image is {source.size[0]}x"
                    f"{source.size[1]}, the {self.present['image']!r} image {target.size[0]}x{target.size[1]}; "
                    "edit pairs must have the same size"
                )
            source = _crop(source, self.size)
        if "mask" in self.task.columns:
            mask = self._mask(row, target.size, index)
        picture = _crop(target, self.size)
        if self.task.super_resolution:
            low = self._image(row, "low_res", index) if "low_res" in self.present else Image.fromarray(picture)
            low_res = _crop(low, self.low_res)
        return Example(self.task.name, prompt, picture, source=source, low_res=low_res, mask=mask)

    def _image(self, row: dict, role: str, index: int) -> Image.Image:
        column = self.present[role]
        value = row[column]
        where = f"{self.path} row {index} column {column!r}"
        try:
            if isinstance(value, Image.Image):
                picture = value
            elif isinstance(value, str):
                where += f" ({self.base / value})"
                picture = Image.open(self._inside(value, where))
            elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
                import io

                where += f" ({value['path']})" if value.get("path") else ""
                picture = Image.open(
                    io.BytesIO(value["bytes"]) if value.get("bytes") else self._inside(value["path"], where)
                )
            else:
                raise InputError(f"{where}: expected an image or an image path, found {type(value).__name__}")
            picture.load()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{where}: unreadable image ({type(exc).__name__}: {exc}); fix or remove the row"
            ) from None
        return picture.convert("RGB") if role != "mask" else picture

    def _inside(self, name: str, where: str) -> Path:
        """A relative image path resolved inside the dataset's folder; one that leads outside it is refused (an
        absolute path is the user's explicit choice and is read as given)."""
        if Path(name).is_absolute():
            return Path(name)
        path = (self.base / name).resolve()
        if not path.is_relative_to(self.base.resolve()):
            raise InputError(
                f"{where}: {name!r} leads outside the dataset folder {self.base}; move the image into it, "
                "or give its absolute path"
            )
        return path

    def _mask(self, row: dict, size: tuple[int, int], index: int) -> np.ndarray:
        if "mask" not in self.present:
            return _crop_mask(random_mask(np.random.default_rng(index), size), self.size)
        picture = self._image(row, "mask", index)
        column = self.present["mask"]
        if picture.size != size:
            raise InputError(
                f"{self.path} row {index}: mask {column!r} is {picture.size[0]}x{picture.size[1]}, the image "
                f"{size[0]}x{size[1]}; masks must match their image's size"
            )
        values = np.asarray(picture.convert("L"))
        if not np.isin(values, (0, 255)).all() and not np.isin(values, (0, 1)).all():
            raise InputError(
                f"{self.path} row {index}: mask {column!r} is not binary (values other than 0 and 255); "
                "save masks as black (keep) and white (hole) only"
            )
        return _crop_mask(values > 0, self.size)


def _undecoded(table, columns):
    """The table with its image columns left undecoded, so a corrupt file is reported here with its path and row
    (datasets would raise while fetching the row)."""
    import datasets

    for column in columns:
        if isinstance(table.features.get(column), datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
    return table


def _crop(picture: Image.Image, size: int, mask: bool = False) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop to (size, size), as diffusers' training scripts do (the
    image processor's `crop` policy)."""
    return prepare_image(picture, "crop", size=(size, size), mask=mask).array


def _crop_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return _crop(Image.fromarray(mask.astype(np.uint8) * 255), size, mask=True)


def random_mask(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random inpainting hole (True = hole), as SD inpainting was trained: a box half the time, else 1-3
    free-form thick strokes; never empty."""
    width, height = size
    mask = np.zeros((height, width), bool)
    if rng.random() < 0.5:
        h, w = int(rng.uniform(0.2, 0.5) * height), int(rng.uniform(0.2, 0.5) * width)
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[y0 : y0 + max(h, 1), x0 : x0 + max(w, 1)] = True
        return mask
    y, x = np.mgrid[0:height, 0:width] + 0.5
    unit = min(width, height) / 8
    for _ in range(int(rng.integers(1, 4))):
        px, py = rng.uniform(unit, width - unit), rng.uniform(unit, height - unit)
        radius = rng.uniform(0.4, 0.9) * unit
        for _ in range(int(rng.integers(4, 9))):
            angle = rng.uniform(0, 2 * np.pi)
            qx, qy = np.clip(px + unit * np.cos(angle), 0, width), np.clip(py + unit * np.sin(angle), 0, height)
            for t in np.linspace(0, 1, 6):
                mask |= (x - (px + t * (qx - px))) ** 2 + (y - (py + t * (qy - py))) ** 2 <= radius**2
            px, py = qx, qy
    return mask


# ------------------------------------------------------------------------------------ the world as a user dataset
def _world_rows(
    task: str, split: str, count: int, start: int = 0
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Per example: metadata (text columns) and images by column name, in the task's default columns."""
    columns, world = BUILTIN[task].columns, BUILTIN[task].world
    for index in range(start, start + count):
        ex = make_example(world, split, index)
        images = {columns["image"]: ex.target}
        for role in ("source", "low_res"):  # the task's input image, under the role its columns name
            if role in columns:
                images[columns[role]] = getattr(ex, role)
        if "mask" in columns:
            images[columns["mask"]] = ex.mask.astype(np.uint8) * 255
        yield {columns["prompt"]: ex.prompt}, images


def export_world_dataset(out: Path, task: str, split: str, count: int, overwrite: bool = False, start: int = 0) -> Path:
    """Write `count` shapes-world examples of `task` (from index `start`) as an image folder (`images/` +
    `metadata.jsonl`, one `<column>_file_name` per image column) that `--data` reads back into the same examples."""
    from mtu_export.storage import atomic_output

    if task not in BUILTIN or BUILTIN[task].world is None:
        known = ", ".join(name for name, defined in BUILTIN.items() if defined.world is not None)
        raise ConfigError(f"the shapes world has no task {task!r}; choose one of {known}")
    if count < 1 or start < 0:
        raise ConfigError(f"--count must be positive and --start >= 0, got {count} and {start}")
    with atomic_output(Path(out), overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with (tmp / "metadata.jsonl").open("w") as meta:
            for index, (text, images) in enumerate(_world_rows(task, split, count, start)):
                row = dict(text)
                for column, picture in images.items():
                    name = f"images/{index:06d}-{column}.png"
                    Image.fromarray(picture).save(tmp / name)
                    row["file_name" if column == "image" else f"{column}_file_name"] = name
                meta.write(json.dumps(row) + "\n")
    return out
