"""VAE encodings of a training source, built once on disk as memory-mapped shards.

A cache folder holds `shard-NNNNN/` folders of `SHARD_ROWS` rows, one `.npy` per key (fp16 VAE outputs, int64
prompt token ids), and `meta.json`, written last, which says what was encoded (the source's description). Each
distributed rank encodes its share of the shards (shard i on rank i mod world size); a shard appears by an atomic
rename, so an interrupted build resumes where it stopped. Training reads rows through `np.load(mmap_mode="r")`:
memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mtu_export.conditioning import encode_batch, tokenize
from mtu_export.data import Source
from mtu_export.errors import CheckpointError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mtu-export-cache/2"  # 2: condition inputs keyed by their part (tasks.PARTS)
SHARD_ROWS = 512
META = "meta.json"
PIXELS_PER_BATCH = 256 * 64 * 64  # VAE encode batch: 256 images of 64x64, 4 of 512x512


class LatentCache:
    """Random access to a built cache: `gather(indices)` -> {key: (len(indices), ...) tensor}."""

    def __init__(self, folder: Path, task=None) -> None:
        self.folder, self.task = Path(folder), task  # task: the TaskDef whose examples these are
        self.meta = json.loads((self.folder / META).read_text())
        self.rows, self.shard_rows = self.meta["rows"], self.meta["shard_rows"]
        self.keys = tuple(self.meta["keys"])
        self._open = lru_cache(maxsize=256)(self._load)

    def __len__(self) -> int:
        return self.rows

    def _load(self, shard: int, key: str) -> np.ndarray:
        return np.load(self.folder / _shard_name(shard) / f"{key}.npy", mmap_mode="r")

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = np.asarray(index, dtype=np.int64)
        shard, row = np.divmod(index, self.shard_rows)
        out = {}
        for key in self.keys:
            first = self._open(0, key)
            values = np.empty((len(index), *first.shape[1:]), first.dtype)
            for s in np.unique(shard):
                chosen = shard == s
                values[chosen] = self._open(int(s), key)[row[chosen]]
            out[key] = torch.from_numpy(values)
        return out


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def encode_rows(source: Source, vae, tokenizer, rows: range) -> dict[str, np.ndarray]:
    """VAE outputs (fp16) and prompt token ids of `rows` of `source`, in batches sized by the resolution."""
    size = source.example(rows.start).target.shape[0]
    batch = max(1, PIXELS_PER_BATCH // (size * size))
    parts: dict[str, list[np.ndarray]] = {}
    for first in range(rows.start, rows.stop, batch):
        examples = [source.example(i) for i in range(first, min(first + batch, rows.stop))]
        encoded = {k: v.half().cpu().numpy() for k, v in encode_batch(source.task, vae, examples).items()}
        encoded["input_ids"] = tokenize(tokenizer, [e.prompt for e in examples]).numpy()
        for key, value in encoded.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def build_cache(folder: Path, source: Source, vae, tokenizer, state=None, shard_rows: int = SHARD_ROWS) -> LatentCache:
    """Encode `source` into `folder` once (this rank's shards of `shard_rows` rows; all ranks wait for the whole),
    or reuse it when it was built from the same source and shard size. Raises CheckpointError if `folder` holds
    another source's cache. The main process logs a line per shard."""
    folder = Path(folder)
    wanted = {"format": CACHE_FORMAT, "source": source.describe(), "rows": len(source), "shard_rows": shard_rows}
    if (folder / META).is_file():
        found = json.loads((folder / META).read_text())
        if found.get("format") != CACHE_FORMAT:
            raise CheckpointError(
                f"{folder} holds a {found.get('format')} cache, this version writes {CACHE_FORMAT}; "
                "delete that folder or use another --work"
            )
        if {k: found.get(k) for k in wanted} != json.loads(json.dumps(wanted)):
            raise CheckpointError(
                f"{folder} caches another dataset or resolution ({found.get('source')}); "
                "delete that folder or use another --work"
            )
        return LatentCache(folder, source.task)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    shards = math.ceil(len(source) / shard_rows)
    for shard in range(rank, shards, world):
        rows = range(shard * shard_rows, min((shard + 1) * shard_rows, len(source)))
        if (folder / _shard_name(shard)).is_dir():  # an interrupted build already finished this shard
            continue
        _write_shard(folder, shard, encode_rows(source, vae, tokenizer, rows))
        if rank == 0:
            logger.info(
                f"cache {source.task.name}: {rows.stop}/{len(source)} rows encoded (shard {shard + 1}/{shards})"
            )
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        first = folder / _shard_name(0)
        wanted["keys"] = sorted(p.stem for p in first.glob("*.npy"))
        tmp = folder / f".{META}.tmp"
        tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / META)
    if state is not None:
        state.wait_for_everyone()
    return LatentCache(folder, source.task)


def _write_shard(folder: Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    partial = folder / f".{_shard_name(shard)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for key, value in arrays.items():
        np.save(partial / f"{key}.npy", value)
    os.replace(partial, folder / _shard_name(shard))
