"""The one way a user's image becomes model input: its size policy, its resampling and its value range.

Every entry point goes through `prepare_image`: dataset rows (training, evaluation, export probes and static-int8
calibration), `mtu-export generate`, the shipped `MTUOnnxPipeline` / `MTUSuperResolutionPipeline` and the torch-free
on-device pipeline. Two policies:

- `crop`: resize the shorter side to the target and centre-crop the rest, as diffusers' training scripts and
  `VaeImageProcessor(resize_mode="crop")` do. Training and evaluation use it at the model's square resolution.
- `fit`: keep the image's own size, each side rounded to the nearest valid multiple (at least one multiple), then
  resized to it, as `VaeImageProcessor`'s default mode does once the size is chosen. `generate` and the pipelines use
  it: a 150x100 photo stays landscape.

"Valid" is what the UNet really accepts: a multiple of the VAE's factor times 2 ** (the UNet's down-samplings), so
that every down-sampled feature map halves exactly (`size_multiple`). Images are resampled bicubic (masks nearest)
and mapped to [-1, 1] as `VaeImageProcessor` maps them (x / 127.5 - 1).

This file imports numpy and Pillow only, never torch or the rest of mtu_export: it is copied into every exported
folder beside `pipeline_mtu.py`, and the on-device pipeline runs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

POLICIES = ("fit", "crop")


def size_multiple(vae_factor: int, down_samplings: int) -> int:
    """Pixels an image side must be a multiple of for a UNet with `down_samplings` halvings behind a VAE that
    downsamples by `vae_factor` (SD1.5: 8 x 2**3 = 64; the shipped shapes models: 4 x 2**2 = 16)."""
    return vae_factor * 2**down_samplings


def fit_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) rounded to the nearest multiple of `multiple` each (halves round up), never below one."""
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
        how = "nearest valid size, aspect kept" if self.policy == "fit" else "shorter side resized, centre-cropped"
        return f"note: {name} resized from {w0}x{h0} to {w1}x{h1} ({self.policy}: {how})"


def target_size(picture_size: tuple[int, int], policy: str, multiple: int, size: tuple[int, int] | None) -> tuple:
    """(width, height) an image of `picture_size` is prepared at: `size` for `crop`, else its own size fitted to
    `multiple` (or `size` when given)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if size is not None:
        return size
    if policy == "crop":
        raise ValueError("the crop policy needs the size to crop to")
    return fit_size(*picture_size, multiple)


def prepare_image(
    picture: Image.Image,
    policy: str = "fit",
    multiple: int = 1,
    size: tuple[int, int] | None = None,
    mask: bool = False,
) -> Prepared:
    """`picture` as model input under `policy` (module docstring): RGB uint8, or a binary mask (`mask`: white or any
    non-zero grey = hole). `size` (width, height) is the target of `crop`, or overrides `fit`'s own choice."""
    original = picture.size
    width, height = target_size(original, policy, multiple, size)
    picture = picture.convert("L" if mask else "RGB")
    resample = Image.NEAREST if mask else Image.BICUBIC
    if policy == "crop":
        picture = resize_and_crop(picture, width, height, resample)
    elif picture.size != (width, height):
        picture = picture.resize((width, height), resample=resample)
    array = np.asarray(picture)
    return Prepared(array > 127 if mask else array, original, policy)


def to_model_input(images: list[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) images -> float32 (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return (np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The inverse of `to_model_input`: float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded half to even
    as torch's `round` does."""
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
