"""Sparse folds: what dropping experts costs in quality against what it saves in FLOPs (`make sparse-eval`).

Each row is one `mtu-export eval --json` run of a checkpoint, scored as its sparse fold runs (the `sparse` setting
the JSON records: none for a top-k model, whose dropped experts weigh exactly 0). Per task the table shows the FFN
width the fold keeps, the fold's FLOPs per UNet call ÷ the single-task UNet's (the base's shape with the task's
conv_in; torch's FlopCounterMode on a batch-1 call with a full-length prompt, as `mtu-export bench` counts), and
the primary metric ÷ the dense MTU's in `parity.json` (same split, count, sampler and seed, or the script refuses).

    python benchmarks/sparse_tradeoff.py benchmarks/results/sparse/eval/*.json \
        --parity benchmarks/results/parity/parity.json --out benchmarks/results/sparse/tradeoff
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from mtu_export.bench.flops import torch_flops
from mtu_export.bench.graphs import unet_feed
from mtu_export.bench.run import prompt_tokens, sparse_quality
from mtu_export.checkpoint import load_checkpoint
from mtu_export.config import SparseFold
from mtu_export.fold import ffn_kept, fold_task


def describe(evaluation: dict, top_k: int | None) -> str:
    sparse = evaluation.get("sparse")
    parts = [f"top-{top_k} routing" if top_k else "dense routing"]
    if sparse:
        if sparse["ffn_budget"] < 1:
            parts.append(f"--ffn-budget {sparse['ffn_budget']:g}")
        if sparse["prune_below"] > 0:
            parts.append(f"--prune-below {sparse['prune_below']:g}")
        parts.append("renormalized" if sparse["renormalize"] else "not renormalized")
    return ", ".join(parts)


def row(path: Path, parity: dict) -> dict:
    evaluation = json.loads(path.read_text())
    ckpt = load_checkpoint(Path(evaluation["checkpoint"]), dtype=torch.float32)
    sparse = SparseFold(**evaluation["sparse"]) if evaluation.get("sparse") else None
    quality = sparse_quality(parity, evaluation)
    tasks = {}
    for task in ckpt.model.config.task_names:
        if task not in quality:
            continue
        config = dict(ckpt.model.unet.config, in_channels=ckpt.model.config.task(task).in_channels)
        feed = unet_feed(config, config["in_channels"], 1, prompt_tokens(ckpt), seed=0)
        folded = fold_task(ckpt.model, task, sparse)
        single = UNet2DConditionModel.from_config(config)  # the single-task UNet's shape (weights do not matter)
        flops, single_flops = torch_flops(folded, feed), torch_flops(single, feed)
        tasks[task] = quality[task] | {"ffn_kept": ffn_kept(ckpt.model, folded), "flops_ratio": flops / single_flops}
    return {
        "eval": str(path),
        "checkpoint": evaluation["checkpoint"],
        "setting": describe(evaluation, ckpt.model.config.top_k),
        "tasks": tasks,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Sparse folds: FLOPs saved against quality kept",
        "",
        "Per task: FFN width kept · FLOPs per UNet call ÷ the single-task UNet's · primary metric "
        "÷ the dense MTU's (`parity.json`, the same 200 held-out examples and sampler). Made by "
        "`benchmarks/sparse_tradeoff.py` from the `mtu-export eval --json` files named in the first column.",
        "",
    ]
    tasks = list(rows[0]["tasks"])
    lines += ["| model, setting | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for r in rows:
        cells = [
            f"{t['ffn_kept']:.0%} · {t['flops_ratio']:.3f} · **{t['ratio']:.3f}** ({t['metric']} {t['sparse']:.3f})"
            for t in r["tasks"].values()
        ]
        lines.append(f"| `{r['checkpoint']}`, {r['setting']} (`{Path(r['eval']).name}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", type=Path, help="`mtu-export eval --json` files")
    parser.add_argument("--parity", type=Path, required=True, help="the dense MTU's parity.json")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    parity = json.loads(args.parity.read_text())
    rows = [row(path, parity) for path in args.evals]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"parity": str(args.parity), "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
