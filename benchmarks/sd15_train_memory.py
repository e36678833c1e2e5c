"""Peak memory one MTU training step adds at Stable Diffusion 1.5 scale (random weights), on this CPU.

Builds the SD1.5 UNet from its config, upcycles it (t2i + edit, N=4, the paper's trainable split), resets the
process's peak-RSS mark, then runs one forward and backward at 64×64 latents under bf16 autocast, with or without
gradient checkpointing. Prints one JSON line; docs/training.md's GPU recipe quotes the increments (upper bounds: they
also hold the gradients and autocast's bf16 weight copies).

    python benchmarks/sd15_train_memory.py 0 1   # checkpointing off, batch 1
    python benchmarks/sd15_train_memory.py 1 1   # checkpointing on
"""

import ctypes
import gc
import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from mtu_export.config import SD15_UNET_CONFIG, MoEConfig
from mtu_export.moe import routed_checkpointing
from mtu_export.tasks import parse_tasks
from mtu_export.upcycle import upcycle_unet


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    checkpointing, batch = sys.argv[1] == "1", int(sys.argv[2])
    torch.manual_seed(0)
    tasks = parse_tasks("t2i,edit", latent_channels=4, vae_factor=8)
    mtu = upcycle_unet(UNet2DConditionModel(**SD15_UNET_CONFIG), MoEConfig(tasks, 4)).freeze_()
    if checkpointing:
        mtu.unet.enable_gradient_checkpointing(routed_checkpointing(mtu))
    mtu.train()
    x, t, h = torch.randn(batch, 8, 64, 64), torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 768)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak of building the model is not the step's
    before = status("VmRSS:")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mtu(x, t, h, task="edit").sample
    out.float().pow(2).mean().backward()
    peak = status("VmHWM:")
    print(
        json.dumps(
            {
                "checkpointing": checkpointing,
                "batch": batch,
                "rss_before_step": before,
                "peak": peak,
                "step_increment_bytes": peak - before,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
