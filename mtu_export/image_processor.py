"""The one way a user's image becomes model input: its size policy, its resampling and its value range.

Every entry point goes through `prepare_image`: dataset rows (training, evaluation, export probes and static-int8
calibration), `mtu-export generate`, the shipped `MTUOnnxPipeline` / `MTUSuperResolutionPipeline` and the torch-free
on-device pipeline. Two policies:

- `crop`: resize the shorter side to the target and centre-crop the rest, as diffusers' training scripts and
  `VaeImageProcessor(resize_mode="crop")` do. Training and evaluation use it at the model's square resolution.
- `fit`: keep the image's own size, each side rounded to the nearest valid multiple (at least one multiple), then
  resized to it, as `VaeImageProcessor`'s default mode does once the size is chosen. `generate` and the pipelines use
  it: a 150x100 photo stays landscape. An image of more than MAX_AREA times the model's own image area is first
  scaled down to that area, aspect kept (a 4032x3024 phone photo for a 512x512 model: 1152x896), so that no input
  size asks the VAE's attention for more memory than a device has.

"Valid" is what the UNet really accepts: a multiple of the VAE's factor times 2 ** (the UNet's down-samplings), so
that every down-sampled feature map halves exactly (`size_multiple`). Images are resampled bicubic (masks nearest)
and mapped to [-1, 1] as `VaeImageProcessor` maps them (x / 127.5 - 1).

This file imports numpy and Pillow only, never torch or the rest of mtu_export: it is copied into every exported
folder beside `pipeline_mtu.py`, and the on-device pipeline runs without torch.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

POLICIES = ("fit", "crop")
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # output suffix -> PIL format
MAX_AREA = 4  # `fit`: at most this many times the model's own image area (SD1.5: 1024x1024 for 512x512)


def vae_factor(block_out_channels) -> int:
    """How much a VAE with these `block_out_channels` (its config's) downsamples: 2 ** (levels - 1)."""
    return 2 ** (len(block_out_channels) - 1)


def size_multiple(vae_factor: int, down_samplings: int) -> int:
    """Pixels an image side must be a multiple of for a UNet with `down_samplings` halvings behind a VAE that
    downsamples by `vae_factor` (SD1.5: 8 x 2**3 = 64; the shipped shapes models: 4 x 2**2 = 16)."""
    return vae_factor * 2**down_samplings


def fit_size(width: int, height: int, multiple: int, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_pixels` (aspect kept) when larger, then each side rounded to the
    nearest multiple of `multiple` (halves round up), never below one multiple."""
    if max_pixels is not None and width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        width, height = width * scale, height * scale
    return tuple(max(multiple, int(np.floor(side / multiple + 0.5)) * multiple) for side in (width, height))


def resize_and_crop(picture: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    """Scale `picture` to cover (width, height) keeping its aspect, then cut the centre: the arithmetic of diffusers'
    `VaeImageProcessor._resize_and_crop` (integer scaling, the same offsets), for any image mode."""
    if picture.size == (width, height):
        return picture
    if width / height > picture.width / picture.height:  # the target is wider: match widths, crop height
        scaled = (width, max(height, picture.height * width // picture.width))
    else:
        scaled = (max(width, picture.width * height // picture.height), height)
    resized = picture.resize(scaled, resample=resample)
    left, top = scaled[0] // 2 - width // 2, scaled[1] // 2 - height // 2
    return resized.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Prepared:
    """An image made ready for the model: uint8 (H, W, 3) for pictures, bool (H, W) for masks (True = hole)."""

    array: np.ndarray
    original: tuple[int, int]  # (width, height) as given
    policy: str
    how: str  # what the policy did, in words, for notes

    @property
    def size(self) -> tuple[int, int]:  # (width, height) as prepared
        return self.array.shape[1], self.array.shape[0]

    @property
    def changed(self) -> bool:
        return self.size != self.original

    def describe(self) -> dict:
        """What was done, for a manifest or a JSON report."""
        return {"policy": self.policy, "from": list(self.original), "to": list(self.size)}

    def note(self, name: str) -> str | None:
        """A line for stderr when the image was resized; None when it was taken as it is."""
        if not self.changed:
            return None
        (w0, h0), (w1, h1) = self.original, self.size
        return f"note: {name} resized from {w0}x{h0} to {w1}x{h1} ({self.policy}: {self.how})"


def prepare_image(
    picture: Image.Image,
    policy: str = "fit",
    multiple: int = 1,
    size: tuple[int, int] | None = None,
    mask: bool = False,
    max_pixels: int | None = None,
) -> Prepared:
    """`picture` as model input under `policy` (module docstring): RGB uint8, or a binary mask (`mask`: white or any
    non-zero grey = hole). `size` (width, height) is the target of `crop`, or overrides `fit`'s own choice;
    `max_pixels` caps `fit`'s area (MAX_AREA times the model's own)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "crop" and size is None:
        raise ValueError("the crop policy needs the size to crop to")
    original = picture.size
    width, height = size or fit_size(*original, multiple, max_pixels)
    picture = picture.convert("L" if mask else "RGB")
    resample = Image.NEAREST if mask else Image.BICUBIC
    if policy == "crop":
        picture, how = resize_and_crop(picture, width, height, resample), "shorter side resized, centre-cropped"
    else:
        picture = picture if picture.size == (width, height) else picture.resize((width, height), resample=resample)
        capped = size is None and max_pixels is not None and original[0] * original[1] > max_pixels
        how = "nearest valid size, aspect kept" + (f", scaled down to about {max_pixels} pixels" if capped else "")
    array = np.asarray(picture)
    return Prepared(array > 127 if mask else array, original, policy, how)


def max_pixels(model_size: tuple[int, int], scale: int = 1) -> int:
    """`fit`'s area cap for an input image of a model whose own images are `model_size` (width, height) and whose
    output has `scale` times the input's sides (super-resolution)."""
    return MAX_AREA * model_size[0] * model_size[1] // scale**2


def to_model_input(images: list[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) images -> float32 (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return (np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The inverse of `to_model_input`: float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded half to even
    as torch's `round` does."""
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def save_image(out: Path, picture: np.ndarray, image_format: str, overwrite: bool = True) -> Path:
    """Write a uint8 picture atomically in `image_format` (a value of IMAGE_FORMATS): a temporary file beside `out`,
    then a rename, so `out` is never half-written. With `overwrite=False`, a file that appeared at `out` meanwhile
    is kept and FileExistsError raised."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        options = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
        Image.fromarray(picture).save(temporary, format=image_format, **options)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} appeared while the image was made")
        os.replace(temporary, out)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return out
