"""`SparseUNet2DConditionModel`: a diffusers `UNet2DConditionModel` whose transformer FFNs have their own hidden widths.

A sparse fold (`mtu-export fold --prune-below / --ffn-budget`, or the fold of a `--route top-k` model) drops whole
experts, so each task's FFNs end up narrower than the base's, layer by layer. diffusers' UNet config has one FFN
width for every block (4x its channels) and no way to state another, so this subclass adds one config entry,
`ffn_inner_dims` ({FFN module name: hidden width}, the narrowed FFNs only), and narrows those FFNs' two linear layers
after the stock constructor. Every other module, the forward pass and the weight names are diffusers' own; with
`ffn_inner_dims` empty it is the stock model.

This file is copied verbatim into the `unet/` folder of every folder whose UNet it is, as `sparse_unet.py`, and the
pipeline's `model_index.json` names it (`"unet": ["sparse_unet", "SparseUNet2DConditionModel"]`): diffusers'
custom-component mechanism, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it without
mtu-export installed. It imports only torch and diffusers.
"""

from __future__ import annotations

import inspect

from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from torch import nn


def narrow_feed_forward(ff: FeedForward, width: int) -> None:
    """Replace `ff`'s input and output projections with ones of hidden width `width` (weights to be loaded)."""
    proj, out = ff.net[0].proj, ff.net[2]
    gated = proj.out_features == 2 * out.in_features  # GEGLU / SwiGLU: value and gate rows in one projection
    ff.net[0].proj = nn.Linear(proj.in_features, width * (2 if gated else 1), bias=proj.bias is not None)
    ff.net[2] = nn.Linear(width, out.out_features, bias=out.bias is not None)


class SparseUNet2DConditionModel(UNet2DConditionModel):
    """diffusers' UNet2DConditionModel plus `ffn_inner_dims`: the hidden width of each narrowed transformer FFN."""

    def __init__(self, *args, ffn_inner_dims: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        widths = {str(name): int(width) for name, width in (ffn_inner_dims or {}).items()}
        self.register_to_config(ffn_inner_dims=widths)
        modules = dict(self.named_modules())
        for name, width in widths.items():
            ff = modules.get(name)
            if not isinstance(ff, FeedForward) or width < 1:
                raise ValueError(f"ffn_inner_dims names {name!r} (width {width}), which is not a FeedForward here")
            narrow_feed_forward(ff, width)


# diffusers builds a model from its config by the constructor's signature: the stock one plus `ffn_inner_dims`.
_STOCK = inspect.signature(UNet2DConditionModel.__init__)
SparseUNet2DConditionModel.__init__.__signature__ = _STOCK.replace(
    parameters=[
        *_STOCK.parameters.values(),
        inspect.Parameter("ffn_inner_dims", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
)
