"""`python -m mtu_export.ondevice EXPORT --task T --prompt P --out O.png`: the torch-free pipeline (pipeline.py) as a
command, with `mtu-export generate`'s options and its output rules: bad input is one `error: ...` line on stderr and
exit code 2, never a traceback; an existing --out is refused unless --overwrite, as is one that overlaps an input; the
image is written to a temporary file and renamed into place.

Uses argparse, not typer, to keep the runtime's dependencies to onnxruntime, numpy, Pillow and tokenizers.
Must not import torch, transformers or diffusers, even indirectly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from PIL import Image, UnidentifiedImageError

from mtu_export import logs
from mtu_export.image_processor import IMAGE_FORMATS, POLICIES, save_image

BAD_INPUT = 2  # exit code of every refusal (argparse's own)


class BadInput(Exception):
    """A request this command refuses: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(BAD_INPUT)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mtu_export.ondevice",
        description="Run one task of an `mtu-export onnx` folder without torch and write the image.",
    )
    parser.add_argument("export", type=Path, help="a folder written by `mtu-export onnx`")
    parser.add_argument("--task", required=True, help="the task to run")
    parser.add_argument("--prompt", required=True, help="caption or edit instruction")
    parser.add_argument("--out", "-o", type=Path, required=True, help="image to write: .png, .jpg / .jpeg or .webp")
    parser.add_argument("--image", type=Path, help="input image (edit: source, sr: low-res, inpaint)")
    parser.add_argument("--mask", type=Path, help="inpainting mask (white = repaint)")
    parser.add_argument("--steps", type=_positive, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="text guidance scale")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale (edit, sr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--resize", choices=POLICIES, default="fit", help="fit (keep the aspect) or crop")
    parser.add_argument("--threads", type=_positive, help="onnxruntime intra-op threads")
    parser.add_argument("--no-optimum", dest="optimum", action="store_false",
                        help="our sampler for single-task t2i / inpaint too (as `generate --no-optimum`)")  # fmt: skip
    parser.add_argument("--low-memory", action="store_true",
                        help="one graph in memory at a time, no onnxruntime arena (for a phone's budget)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _open(path: Path | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    if not path.is_file():
        raise BadInput(f"{flag} {path} is not a file; pass an existing PNG or JPEG")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except (OSError, UnidentifiedImageError) as exc:
        raise BadInput(f"cannot read {flag} {path}: {exc}; pass a PNG or JPEG file") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, export: Path, inputs: Sequence[Path | None], overwrite: bool) -> str:
    """The PIL format for `out`, after refusing a folder, an unknown suffix, an input's path or an existing file."""
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder; pass an image file to write, such as {out / 'image.png'}")
    image_format = IMAGE_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise BadInput(f"--out must end in {', '.join(IMAGE_FORMATS)}, got {out.name!r}")
    resolved = out.resolve()
    if _inside(resolved, export.resolve()) or any(p is not None and resolved == p.resolve() for p in inputs):
        raise BadInput(f"--out {out} would overwrite an input (the export folder, --image or --mask); write elsewhere")
    if out.exists() and not overwrite:
        raise BadInput(f"--out {out} exists; pass --overwrite to replace it")
    return image_format


def run(args: argparse.Namespace) -> Path:
    from mtu_export.ondevice.pipeline import OnDevicePipeline

    if not (args.export / "manifest.json").is_file():
        raise BadInput(f"{args.export} is not an `mtu-export onnx` folder (no manifest.json); export it first")
    image_format = check_out(args.out, args.export, (args.image, args.mask), args.overwrite)
    image, mask = _open(args.image, "--image"), _open(args.mask, "--mask")
    # graphs open on first use
    pipeline = OnDevicePipeline.from_folder(args.export, threads=args.threads, low_memory=args.low_memory)
    plan = pipeline.tasks.get(args.task)
    given = {"image": image, "mask": mask}
    missing = [f"--{name}" for name in (plan.needs if plan else ()) if given[name] is None]
    if missing:
        raise BadInput(f"task {args.task!r} needs {' and '.join(missing)} PNG")
    picture = pipeline(
        args.prompt,
        task=args.task,
        image=image,
        mask=mask,
        steps=args.steps,
        guidance=args.guidance,
        image_guidance=args.image_guidance,
        seed=args.seed,
        resize=args.resize,
        optimum=args.optimum,
    )
    try:
        save_image(args.out, picture, image_format, overwrite=args.overwrite)
    except FileExistsError:
        raise BadInput(f"--out {args.out} appeared while sampling; pass --overwrite to replace it") from None
    return args.out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.install(logs.plain_handler())  # notes on resized inputs, on stderr
    try:
        out = run(args)
    except (BadInput, ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return BAD_INPUT
    print(f"wrote {out} ({args.task}, {args.steps} steps, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
