"""Seeded Gaussian noise in numpy that reproduces torch's CPU `torch.randn(shape, generator=g, dtype=torch.float32)`,
so that the on-device pipeline starts from the latents (and draws the posterior samples) that `mtu-export generate`
and optimum's pipelines draw for the same seed.

torch's CPU generator is a Mersenne Twister (mt19937) seeded with `init_genrand(seed)`, the seeding numpy's legacy
`RandomState(seed)` uses too, so numpy's C generator yields the same 32-bit words. For a float32 tensor of 16 or
more elements torch then (aten `normal_fill`):

1. fills the tensor with uniforms `(word & (2**24 - 1)) * 2**-24`, one word each;
2. applies Box-Muller to each block of 16: for j in 0..7, `u1 = 1 - x[j]`, `u2 = x[j + 8]`,
   `r = sqrt(-2 log u1)`, `x[j] = r cos(2 pi u2)`, `x[j + 8] = r sin(2 pi u2)`;
3. when the size is not a multiple of 16, redraws the last 16 values with fresh uniforms and transforms them again.

The transform runs in float32 as torch's does; torch's vectorised log / sin / cos may differ from numpy's by a few
ulps (measured here: at most 4e-7 on values of |x| < 6). Smaller tensors take another torch path (a cached
double-precision Box-Muller) and are refused here.

Must not import torch, transformers or diffusers: the on-device pipeline uses it where only numpy is installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BLOCK = 16  # torch's Box-Muller block: 8 pairs of uniforms
MANTISSA_BITS = 24  # float32's significand: torch keeps this many low bits of each 32-bit word
MAX_SEED = 2**32 - 1  # init_genrand takes a 32-bit seed (torch truncates larger ones; we refuse them)


def _box_muller(uniforms: np.ndarray) -> np.ndarray:
    """(k * 16,) float32 uniforms in [0, 1) -> as many standard normals, block by block as torch pairs them."""
    blocks = uniforms.reshape(-1, 2, BLOCK // 2)  # (k, 2, 8): [u1 source, u2] halves of each block
    u1 = np.float32(1.0) - blocks[:, 0]  # in (0, 1]: log is finite
    u2 = blocks[:, 1]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * math.pi) * u2
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)


class TorchCompatibleGenerator:
    """A numpy stand-in for `torch.Generator().manual_seed(seed)` that only draws `randn`: consecutive calls continue
    one stream, as consecutive `torch.randn(..., generator=g)` calls on one torch generator do."""

    def __init__(self, seed: int) -> None:
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside 0..{MAX_SEED}; pass a 32-bit unsigned seed")
        self.seed = int(seed)
        self._state = np.random.RandomState(self.seed)  # legacy seeding = mt19937 init_genrand, as torch's

    def _uniforms(self, count: int) -> np.ndarray:
        """`count` float32 uniforms in [0, 1), one 32-bit word each, as torch's uniform_real_distribution<float>."""
        words = self._state.randint(0, 2**32, size=count, dtype=np.uint32)  # exactly one mt19937 output per value
        low_bits = words & np.uint32(2**MANTISSA_BITS - 1)
        return low_bits.astype(np.float32) * np.float32(2.0**-MANTISSA_BITS)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """float32 standard normals of `shape` (at least 16 elements), equal to torch's up to a few ulps."""
        shape = tuple(int(side) for side in shape)
        count = math.prod(shape)
        if count < BLOCK:
            raise ValueError(
                f"randn of shape {shape} has {count} elements; torch draws tensors under {BLOCK} elements another way, "
                f"which this generator does not reproduce (latents and posterior samples always have more)"
            )
        out = np.empty(count, dtype=np.float32)
        whole = count - count % BLOCK
        out[:whole] = _box_muller(self._uniforms(count)[:whole])  # torch draws all `count` uniforms first
        if whole != count:  # the ragged tail: torch redraws the last 16 values from fresh uniforms
            out[count - BLOCK :] = _box_muller(self._uniforms(BLOCK))
        return out.reshape(shape)
