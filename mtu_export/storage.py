"""Files on disk: finding a diffusers UNet in a folder, checking safetensors files before loading them (and
refusing pickles, which run code when loaded), and writing outputs atomically (temp folder, then rename; SIGTERM,
killed writers and a full disk leave nothing half-written).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mtu_export.errors import CheckpointError, ConfigError, DiskFullError, InputError, OutputExistsError

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"
CHECKPOINT_CONFIG = "mtu_config.json"  # an MTU checkpoint's config; its 'pipeline' may name a shared folder
VARIANTS = ("fp16", "bf16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle files: never loaded


@dataclass(frozen=True)
class UNetSource:
    """Where a UNet lives: its own folder, and the pipeline folder around it when there is one."""

    unet_dir: Path
    pipeline_dir: Path | None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); restore or regenerate the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def image_format(out: Path) -> str:
    """The PIL format an output image's suffix asks for (image_processor.IMAGE_FORMATS); other suffixes refused."""
    from mtu_export.image_processor import IMAGE_FORMATS

    found = IMAGE_FORMATS.get(Path(out).suffix.lower())
    if found is None:
        known = ", ".join(IMAGE_FORMATS)
        raise ConfigError(f"--out must name an image file ending in {known}, got {Path(out).name!r}; add one")
    return found


def write_json(path: Path, data: dict) -> None:
    """Write by replacing the file, never through it: `path` may be a hard link into a user's model folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def locate_unet(path: Path) -> UNetSource:
    """Accept a UNet folder (config.json + safetensors) or a pipeline folder (model_index.json + unet/)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a diffusers UNet folder or a pipeline folder with unet/")
    if not path.is_dir():
        raise InputError(f"{path} is a file; pass the diffusers folder that contains it")
    if (path / PIPELINE_INDEX).is_file() and (path / "unet" / "config.json").is_file():
        source = UNetSource(path / "unet", path)
    elif (path / "config.json").is_file() and _is_unet_config(read_json(path / "config.json")):
        source = UNetSource(path, None)
    else:
        raise InputError(
            f"{path} holds no diffusers UNet: expected config.json of a UNet2DConditionModel, "
            "or model_index.json with a unet/ subfolder"
        )
    unet_weights(source.unet_dir)  # fail early on missing or non-safetensors weights
    return source


def _is_unet_config(config: dict) -> bool:
    name = config.get("_class_name")
    return isinstance(name, str) and name.startswith("UNet2DConditionModel")


def unet_variant(unet_dir: Path) -> str | None:
    """`fp16` / `bf16` when a folder holds only variant weights (as Hub snapshots often do), else None."""
    if (unet_dir / UNET_WEIGHTS).is_file() or (unet_dir / UNET_WEIGHTS_INDEX).is_file():
        return None
    for variant in VARIANTS:
        if (unet_dir / _variant(UNET_WEIGHTS, variant)).is_file():
            return variant
        if (unet_dir / _variant(UNET_WEIGHTS_INDEX, variant)).is_file():
            return variant
    return None


def _variant(name: str, variant: str | None) -> str:
    """diffusers' variant names: `x.safetensors` -> `x.fp16.safetensors`, `x.index.json` -> `x.index.fp16.json`."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def weights_dtype(files: list[Path]) -> str:
    """The safetensors dtype most floating tensors have (`F32`, `F16`, `BF16`)."""
    counts: dict[str, int] = {}
    for file in files:
        for _, dtype in check_safetensors(file).values():
            if dtype in ("F32", "F16", "BF16", "F64"):
                counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else "F32"


def unet_weights(unet_dir: Path) -> list[Path]:
    """The safetensors files of a UNet folder (one file or the shards of an index; plain or one variant), checked."""
    variant = unet_variant(unet_dir)
    weights, index = _variant(UNET_WEIGHTS, variant), _variant(UNET_WEIGHTS_INDEX, variant)
    if (unet_dir / weights).is_file():
        files = [unet_dir / weights]
    elif (unet_dir / index).is_file():
        files = index_shards(unet_dir / index)
    else:
        refuse_pickles(unet_dir)
        raise InputError(f"{unet_dir} has no {UNET_WEIGHTS}; re-save the UNet with save_pretrained()")
    for file in files:
        check_safetensors(file)
    return files


def index_shards(index: Path) -> list[Path]:
    """The shard files a sharded-weights index names, checked: a JSON object whose `weight_map` maps every tensor
    name to the name of a file beside the index, and every such file present."""
    fix = "restore the index or re-save the UNet with save_pretrained()"
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is not readable JSON ({exc}); {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    found = _weight_map_defect(data, weight_map)
    if found:
        raise CheckpointError(
            f"{index} should map tensor names to shard file names in 'weight_map', found {found}; {fix}"
        )
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise InputError(
            f"{index} names shard(s) {', '.join(missing)}, missing from {index.parent}; copy the missing shards "
            "beside the index, or re-save the UNet with save_pretrained()"
        )
    return [index.parent / shard for shard in shards]


def _weight_map_defect(data: object, weight_map: object) -> str | None:
    """What is wrong with an index's `weight_map` (in words), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__} instead of an object"
    if not isinstance(weight_map, dict) or not weight_map:
        return "no 'weight_map'" if weight_map is None else f"{type(weight_map).__name__} {weight_map!r:.60}"
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:  # a plain file name, no ../
            return f"{name!r}: {shard!r:.60}"
    return None


def check_safetensors(path: Path) -> dict[str, tuple[list[int], str]]:
    """Read a safetensors header and check the file holds every byte it announces; return name -> (shape, dtype)."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"{path} is missing; restore it or re-save the model")
    try:
        header_len = int.from_bytes(path.open("rb").read(8), "little")
        header = json.loads(path.open("rb").read(8 + header_len)[8:])
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if path.stat().st_size < 8 + header_len + end:
            raise ValueError(f"file has {path.stat().st_size} bytes, header announces {8 + header_len + end}")
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as exc:  # any parse failure means the same thing to the user
        raise CheckpointError(
            f"{path} is not a valid safetensors file (truncated or corrupt: {exc}); re-save or re-copy it"
        ) from None
    return {name: (info["shape"], info["dtype"]) for name, info in header.items()}


def pickle_weights(folder: Path) -> list[Path]:
    """Pickle files in `folder` or below with no safetensors file beside them: weights only a pickle holds. Pickles
    beside safetensors (as in many Hub snapshots) are harmless: never loaded (use_safetensors=True), never copied."""
    folder = Path(folder)
    folders = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())] if folder.is_dir() else []
    found = []
    for path in folders:
        files = sorted(f for f in path.iterdir() if f.is_file())
        if not any(f.name.endswith(".safetensors") for f in files):
            found += [f for f in files if f.name.endswith(PICKLE_SUFFIXES)]
    return found


def refuse_pickles(*folders: Path) -> None:
    """Refuse weights only a pickle holds (unpickling can run any code), naming every such file, before loading."""
    found = [file for folder in folders for file in pickle_weights(folder)]
    if found:
        raise InputError(
            f"expected safetensors weights, found pickle file(s) {', '.join(map(str, found))}, which can run code "
            "when loaded; mtu-export loads safetensors only — convert each once where you trust it (load with "
            "diffusers/transformers from_pretrained, save_pretrained(folder, safe_serialization=True)) and delete "
            "the pickle"
        )


def refuse_pipeline_pickles(pipeline_dir: Path) -> None:
    """`refuse_pickles` over the component folders a pipeline names (a stray root .ckpt is never read)."""
    refuse_pickles(*(pipeline_dir / name for name in pipeline_components(pipeline_dir)))


def link_or_copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a pipeline folder's `model_index.json` and the component folders it names (not `skip`, not stray files
    such as a root .ckpt, never a pickle), hard-linking weight files where the file system allows. Later writes in
    the copy replace files (write_json) rather than writing through a link."""
    names = [name for name in pipeline_components(src) if name not in skip]
    refuse_pickles(*(src / name for name in names))  # pickles left beside safetensors are not copied
    no_pickles = shutil.ignore_patterns(*(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*.bin.index.json")

    def link_or_copy(a: str, b: str) -> None:
        if a.endswith((".safetensors", ".onnx_data")):
            try:
                os.link(a, b)
                return
            except OSError:
                pass
        shutil.copy2(a, b)

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / PIPELINE_INDEX, dst / PIPELINE_INDEX)
    for name in names:
        shutil.copytree(src / name, dst / name, copy_function=link_or_copy, ignore=no_pickles, dirs_exist_ok=True)


def pipeline_components(pipeline_dir: Path) -> list[str]:
    """The component folders a pipeline's model_index.json names and that exist (`unet`, `vae`, `tokenizer`, …)."""
    index = read_json(pipeline_dir / PIPELINE_INDEX)
    return [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and (pipeline_dir / name).is_dir()
    ]


def tree_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (an .mlpackage, an export folder)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless `overwrite` (called before heavy work, and again on commit)."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --overwrite")


def check_separate(out: Path, *inputs: Path | str | None, option: str = "--out") -> None:
    """Refuse an output that is, contains or sits inside anything the command reads from `inputs` (`read_paths`):
    replacing it would destroy that input. Inputs that are None (options not given) are skipped. Called before
    anything is written."""
    target = Path(out).resolve()
    for given in (Path(i) for i in inputs if i is not None):
        for read in read_paths(given):
            if target == read or read in target.parents or target in read.parents:
                via = "" if read == given.resolve() else f" (read through {given})"
                raise ConfigError(
                    f"{option} {out} overlaps the input {read}{via}, which this command reads; point {option} "
                    "elsewhere: not at it, inside it or around it"
                )


def read_paths(path: Path) -> list[Path]:
    """What a command reads at `path`, resolved: an MTU checkpoint folder and the pipeline folder its
    `mtu_config.json` names (perhaps shared, `../shapes-base`); of a pipeline folder its model_index.json and the
    component folders it names (not a model card or an eval/ folder kept beside them); else the path itself."""
    path = Path(path).resolve()
    if not (path / CHECKPOINT_CONFIG).is_file():
        return _pipeline_paths(path)
    try:
        ref = json.loads((path / CHECKPOINT_CONFIG).read_text()).get("pipeline")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ref = None  # loading refuses such a checkpoint later; the folder itself is still protected
    return [path, *(_pipeline_paths((path / ref).resolve()) if isinstance(ref, str) and ref else [])]


def _pipeline_paths(path: Path) -> list[Path]:
    if (path / PIPELINE_INDEX).is_file():
        try:
            names = pipeline_components(path)
        except Exception:  # a broken index: protect the whole folder
            return [path]
        return [path / PIPELINE_INDEX, *((path / name).resolve() for name in names)]
    return [path]


def refuse_output(out: Path, reads: Iterable[Path | str | None] = (), overwrite: bool = False, option: str = "--out"):
    """What atomic_output checks on entry: `out` apart from everything in `reads` and free (unless `overwrite`). For
    outputs written by another step than the work they refuse to start: the multi-process trainers (every process
    refuses before hours of work, the main one writes) and `bench --save-baseline` (written from the report); each
    then writes with atomic_output, which checks again."""
    check_separate(Path(out), *(r for r in reads if r is not None), option=option)
    check_output(Path(out), overwrite)


@contextmanager
def atomic_output(
    out: Path,
    reads: Iterable[Path | str | None] = (),
    overwrite: bool = False,
    *,
    option: str = "--out",
    file: bool = False,
    members: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Every output's safety, in one place, from the first check to the rename.

    On entry, before the work the block does: refuse an `out` that is, contains or sits inside anything in `reads`
    (what the command reads; `option` names `out` in the refusal) and an existing `out` unless `overwrite`. Then
    yield a temporary path beside `out` for the block to write:
    - a folder, which becomes the folder `out` (the default);
    - with `file`, a file path (the block creates it; it keeps `out`'s suffix), which becomes the file `out`;
    - with `members`, a folder whose files of those names become those files of the folder `out`, which keeps
      whatever else it holds (a results folder): all of them, or none.
    On success `out` is checked again (something may have appeared there while the block ran) and renamed into
    place. On any error the temporary path is removed and `out` is left as it was.

    The temporary path, `.NAME.<pid>.<random>.partial`, names its writer: while it is written SIGTERM (`timeout`, CI
    cancellation) raises SystemExit as Ctrl-C raises KeyboardInterrupt, so it is removed, and a folder left by a
    writer that died (SIGKILL, out of memory, power loss) is removed by the next write to `out`. A full disk raises
    DiskFullError. Replacing an existing folder takes two renames (old aside, new in place) with SIGINT and SIGTERM
    held until both are done; a crash between them leaves the old output in a hidden `.NAME.*.old` folder beside
    it, never a half-written `out`."""
    out, reads = Path(out), list(reads)
    targets = [out / name for name in members] or [out]
    for target in targets:
        refuse_output(target, reads, overwrite, option)
    with _terminate_raises():
        tmp = _make_temp_dir(out)
        written = tmp / f"out{out.suffix}" if file else tmp
        try:
            yield written
            for target in targets:
                check_output(target, overwrite)
            with _signals_held():
                if file:
                    _replace(written, out)
                elif members:
                    _move_members(tmp, out, members)
                else:
                    _replace(tmp, out)
        except BaseException as exc:
            if _is_disk_full(exc):
                shutil.rmtree(tmp, ignore_errors=True)
                raise _disk_full(out, exc, tmp) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became `out`


def _move_members(staging: Path, out: Path, members: tuple[str, ...]) -> None:
    missing = [name for name in members if not (staging / name).is_file()]
    if missing:
        raise RuntimeError(f"the block wrote no {', '.join(missing)}")  # a bug in the caller, not bad input
    out.mkdir(parents=True, exist_ok=True)
    for name in members:
        _replace(staging / name, out / name)


def _make_temp_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(out)
        prefix = f".{out.name}.{os.getpid()}."
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=out.parent))
    except OSError as exc:
        if _is_disk_full(exc):
            raise _disk_full(out, exc, out.parent) from None
        raise InputError(f"cannot write {out}: {exc.strerror or exc}; choose a writable --out") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700 folders; outputs get the permissions of a plain mkdir
    return tmp


def _remove_dead_partials(out: Path) -> None:
    """Remove `.NAME.<pid>.<random>.partial` folders whose writing process is gone; a live writer's stays."""
    prefix = f".{out.name}."
    for path in out.parent.glob(f"{glob.escape(prefix)}*.partial"):
        pid, _, rest = path.name[len(prefix) : -len(".partial")].partition(".")
        if pid.isdigit() and rest and "." not in rest and path.is_dir() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows; keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only the main thread may set signal handlers


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """While an output is written, SIGTERM raises SystemExit(143) in the main thread so `finally` and `except`
    clean-ups run. Only the default action is replaced (a handler the caller installed is kept), and restored."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:  # unless the caller installed its own meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while an output is renamed into place, then deliver them to the previous handlers:
    raising between the two renames would leave neither the old nor the new output at `out`."""
    if not _main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: not Python's
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in held:
            signal.raise_signal(signum)


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, also when a library re-raises it as text or as the cause of its own error (safetensors)."""
    messages = {os.strerror(code) for code in DISK_FULL_ERRNOS}
    for _ in range(8):  # the exception and its causes
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, Exception) and any(message in str(exc) for message in messages):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(out: Path, exc: BaseException, where: Path) -> DiskFullError:
    path = getattr(exc, "filename", None) or where
    return DiskFullError(
        f"no space left on the device while writing {out} (at {path}); nothing was written — free space on that "
        "disk (or choose an --out on another one) and run again"
    )


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, removing what `out` was (a folder, a file, or a link — never what a link points to)."""
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    tmp.rename(out)
