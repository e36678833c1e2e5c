"""mtu-export: Multi-Task Upcycling of diffusion UNets and on-device export.

The public API, importable from here: `load_unet`, `upcycle_unet`, `parse_tasks`, `MoEConfig`, `save_checkpoint`,
`load_checkpoint`, `fold_task` (torch) and `OnDevicePipeline` (onnxruntime, numpy, Pillow and tokenizers only).
Each name is imported from its module on first use, so `import mtu_export` stays free of torch: the on-device
pipeline runs where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "MoEConfig": "mtu_export.config",
    "parse_tasks": "mtu_export.tasks",
    "load_unet": "mtu_export.upcycle",
    "upcycle_unet": "mtu_export.upcycle",
    "save_checkpoint": "mtu_export.checkpoint",
    "load_checkpoint": "mtu_export.checkpoint",
    "fold_task": "mtu_export.fold",
    "OnDevicePipeline": "mtu_export.ondevice.pipeline",
}
__all__ = [
    "MoEConfig",
    "OnDevicePipeline",
    "__version__",
    "fold_task",
    "load_checkpoint",
    "load_unet",
    "parse_tasks",
    "save_checkpoint",
    "upcycle_unet",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from mtu_export.checkpoint import load_checkpoint, save_checkpoint
    from mtu_export.config import MoEConfig
    from mtu_export.fold import fold_task
    from mtu_export.ondevice.pipeline import OnDevicePipeline
    from mtu_export.tasks import parse_tasks
    from mtu_export.upcycle import load_unet, upcycle_unet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtu_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
