"""`mtu-export bench-train`: what an MTU training step (the paper's trainable split: experts, routers, task
LayerNorms, task conv_ins) costs next to a full fine-tune step of the same model on the same batch, timed in
interleaved pairs."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from mtu_export.bench.timing import interleaved

logger = logging.getLogger(__name__)


def train_step_ratio(base: Path, batch_size: int = 64, repeats: int = 8, warmup: int = 2) -> dict:
    """MTU training step (the paper's trainable split) ÷ full fine-tune step of the same model on the same batch,
    timed in interleaved pairs (forward, backward, AdamW step)."""
    from mtu_export.config import TrainConfig
    from mtu_export.errors import ConfigError

    if batch_size < 4 or repeats < 1 or warmup < 0:  # 4: one row of each built-in task
        raise ConfigError(f"bench-train needs --batch-size >= 4 and --repeats >= 1, got {batch_size} and {repeats}")
    from mtu_export.conditioning import tokenize
    from mtu_export.loop import process_state
    from mtu_export.train import TaskLoss, build_caches, load_base, make_batches, prepare_model, training_sources

    vae, text_encoder, tokenizer, unet, scheduler = load_base(Path(base))
    cache_size = min(200, 4 * batch_size)
    configs = {
        kind: TrainConfig(batch_size=batch_size, cache_size=cache_size, trainable=kind) for kind in ("mtu", "full")
    }
    with tempfile.TemporaryDirectory(prefix="mtu-train-bench-") as work:
        sources = training_sources(configs["mtu"], Path(base))
        caches = build_caches(Path(work), sources, vae, tokenizer, process_state())
        batch = make_batches(
            configs["mtu"],
            caches,
            text_encoder,
            tokenize(tokenizer, [""]),
            scheduler,
            vae.config.scaling_factor,
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
        )
    steps = {}
    counts = {}
    for kind, config in configs.items():
        model = TaskLoss(prepare_model(config, unet), config.min_snr_gamma, scheduler).train()
        params = [p for p in model.parameters() if p.requires_grad]
        counts[kind] = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-6)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()

        steps[kind] = step
    logger.info(f"timing MTU vs full fine-tune training steps (batch {batch_size}, {repeats} interleaved pairs)")
    timing = interleaved(steps["mtu"], steps["full"], repeats, warmup)
    return {
        "batch_size": batch_size,
        "trainable_parameters": counts,
        "mtu_vs_full": timing,
        "threads": torch.get_num_threads(),
    }
