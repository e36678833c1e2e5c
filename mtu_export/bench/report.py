"""The bench report: `bench.md` (the tables a reader quotes) and `bench.png` (UNet latency per task; bundle size
against worst image quality per quantization mode), both rendered from the results `bench.json` holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtu_export.bench.timing import MIN_SAMPLE_SECONDS


def _rounds(config: dict) -> str:
    return (
        f"{config.get('rounds', 1)} rounds, each opening both graphs afresh and timing {config.get('pairs', 0)} "
        "interleaved single calls of each; ratio = median over rounds of median A ÷ median B"
    )


def _spread(latency: dict) -> str:
    return f"{min(latency['round_ratios']):.3f}–{max(latency['round_ratios']):.3f}"


def render_markdown(results: dict) -> str:
    """`bench.md`: the side-by-side table per task, optimized vs plain export, the bundle and quantization table,
    parity, Core ML."""
    m = results["machine"]
    lines = [
        "# mtu-export bench",
        "",
        f"`{results['checkpoint']}` on {m['processor']} ({m['cpus']} CPUs), onnxruntime {m['onnxruntime']} with "
        f"{m['threads']} threads. UNet latency: {_rounds(results['config'])}; the single-task UNet is also timed "
        "against itself (A/A), which shows how finely this machine resolves a ratio. Quantization modes: "
        f"{results['config']['repeats']} interleaved pairs after {results['config']['warmup']} warm-up runs, each "
        f"timed sample at least {MIN_SAMPLE_SECONDS} s, median A ÷ median B. End to end: "
        f"{results['config'].get('e2e_repeats', 0)} interleaved pairs of whole generations after 1 warm-up, median "
        "A ÷ median B (a coarse check; the UNet rows are the measurement). Everything is measured side by side in "
        "this run.",
        "",
        "## Folded MTU task vs single-task UNet",
        "",
        "| task | single-task reference | GFLOPs/call (torch = ONNX) | params MTU / single | ONNX graph structure | "
        "UNet ms MTU / single | ratio (rounds) | A/A: single ÷ single | end-to-end ratio | t2i: ratio vs base | "
        "peak RSS MB MTU / single |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, row in results["tasks"].items():
        flops = row["flops_per_call_batch1"]["mtu"]
        same = "=" if flops["torch"] == flops["onnx"] else "≠"
        lat = row["unet_latency"]["mtu_vs_single"]
        null = row["unet_latency"].get("single_vs_single")
        base = row["unet_latency"].get("mtu_vs_base")
        e2e = row.get("e2e_latency")
        cells = [
            task,
            row["single_kind"],
            f"{flops['torch'] / 1e9:.4f} {same} {flops['onnx'] / 1e9:.4f}",
            f"{row['parameters']['mtu']:,} / {row['parameters']['single']:,}",
            {True: "identical", False: "**differs**"}.get(row.get("same_structure"), "–"),
            f"{lat['a_median_ms']:.2f} / {lat['b_median_ms']:.2f}",
            f"**{lat['ratio']:.3f}**" + (f" ({_spread(lat)})" if "round_ratios" in lat else ""),
            f"{null['ratio']:.3f} ({_spread(null)})" if null else "–",
            f"{e2e['ratio']:.3f} ({e2e['steps']} steps)" if e2e else "–",
            f"{base['ratio']:.3f}" if base else "–",
            f"{row['peak_rss_mb']['mtu']:.0f} / {row['peak_rss_mb']['single']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _optimized_table(results)
    lines += _sparse_table(results)
    bundle = results["bundle"]
    sizes = bundle["modes"]["none"]["sizes"]
    lines += [
        "",
        "## All-task bundle and quantization",
        "",
        f"Bundle of {sizes['tasks']} tasks: {sizes['bundle_bytes'] / 1e6:.2f} MB = **{sizes['ratio']:.3f}** × one "
        f"single-task export ({sizes['single_task_bytes'] / 1e6:.2f} MB); UNet alone {sizes['unet_ratio']:.3f} ×.",
        "",
        "| mode | UNet MB | UNet latency ÷ fp32 | " + " | ".join(f"{t} image PSNR dB" for t in results["tasks"]) + " |",
        "|---|---|---|" + "---|" * len(results["tasks"]),
    ]
    for mode, row in bundle["modes"].items():
        latency = row.get("latency_vs_fp32")
        psnr = ["identical" if v is None else f"{v:.1f}" for v in row["image_psnr_db"].values()]
        name = "fp32" if mode == "none" else mode
        ratio = f"{latency['ratio']:.3f}" if latency else "1"
        lines.append(f"| {name} | {row['unet_bytes'] / 1e6:.2f} | {ratio} | " + " | ".join(psnr) + " |")
    if results.get("parity"):
        lines += [
            "",
            "## Quality parity (trainer, held-out split)",
            "",
            "| task | metric | MTU | single | ratio |",
            "|---|---|---|---|---|",
        ]
        for task, entry in results["parity"]["parity"].items():
            row = entry["metrics"][entry["primary"]]
            lines.append(
                f"| {task} | {entry['primary']} | {row['mtu']:.4f} | {row['single']:.4f} | {row['ratio']:.4f} |"
            )
    lines += ["", f"Core ML: {_coreml_status(results)}", ""]
    return "\n".join(lines)


def _optimized_table(results: dict) -> list[str]:
    """The folded UNet's optimized export (`--attention fused --optimize`) against its plain export, per task."""
    rows = {t: r for t, r in results["tasks"].items() if "optimized_vs_plain" in r["unet_latency"]}
    if not rows:
        return []
    lines = [
        "",
        "## Optimized vs plain export of the folded UNet",
        "",
        "Optimized: `mtu-export onnx --attention fused --optimize` (each attention layer one onnxruntime "
        "MultiHeadAttention node, the graph saved as onnxruntime's session optimizes it; the plain graph gets the "
        "same optimizations when its session loads). Same rounds as above.",
        "",
        "| task | UNet ms optimized / plain | ratio (rounds) | PSNR vs torch dB | peak RSS MB optimized / plain |",
        "|---|---|---|---|---|",
    ]
    for task, row in rows.items():
        lat, psnr, rss = row["unet_latency"]["optimized_vs_plain"], row["optimized"]["psnr_db"], row["peak_rss_mb"]
        cells = [
            task,
            f"{lat['a_median_ms']:.2f} / {lat['b_median_ms']:.2f}",
            f"**{lat['ratio']:.3f}** ({_spread(lat)})",
            "identical" if psnr is None else f"{psnr:.1f}",
            f"{rss['optimized']:.0f} / {rss['mtu']:.0f}" if "optimized" in rss else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sparse_table(results: dict) -> list[str]:
    """Each task's sparse fold (of a `--route top-k` checkpoint) against the single-task UNet, and its quality."""
    rows = {t: r["sparse"] for t, r in results["tasks"].items() if "sparse" in r}
    if not rows:
        return []
    quality = results.get("sparse_quality") or {}
    lines = [
        "",
        "## Sparse fold vs single-task UNet",
        "",
        f"`{results.get('sparse_checkpoint')}`, each task folded with its zero-weight experts dropped (exact: the "
        "fold check holds at 1e-5), so its FFNs are narrower than the base's. Same rounds as above; the metric "
        "column is the sparse model's primary metric ÷ the dense MTU's on the same held-out examples and settings "
        "(`--sparse-eval` against `--parity`).",
        "",
        "| task | FFN width kept | GFLOPs/call sparse ÷ single | UNet ms sparse / single | ratio (rounds) | "
        "A/A: single ÷ single | peak RSS MB sparse / single | primary metric ÷ dense MTU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, sparse in rows.items():
        row = results["tasks"][task]
        lat, null, rss = sparse["latency_vs_single"], row["unet_latency"]["single_vs_single"], row["peak_rss_mb"]
        q = quality.get(task)
        cells = [
            task,
            f"{sparse['ffn_kept']:.0%}",
            f"**{sparse['gflops_ratio']:.3f}**",
            f"{lat['a_median_ms']:.2f} / {lat['b_median_ms']:.2f}",
            f"**{lat['ratio']:.3f}** ({_spread(lat)})",
            f"{null['ratio']:.3f} ({_spread(null)})",
            f"{rss['sparse']:.0f} / {rss['single']:.0f}",
            f"{q['metric']} {q['sparse']:.4f} ÷ {q['dense']:.4f} = **{q['ratio']:.3f}**" if q else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _coreml_status(results: dict) -> str:
    """The folded / single-task Core ML latency ratio per task, or why none was measured (not macOS)."""
    rows = [row.get("coreml_latency", {}) for row in results["tasks"].values()]
    ratios = [f"{task} {row['ratio']:.3f}" for task, row in zip(results["tasks"], rows, strict=True) if "ratio" in row]
    if ratios:
        return "folded / single-task latency " + ", ".join(ratios)
    return next((row["skipped"] for row in rows if "skipped" in row), "")


def write_plots(results: dict, out: Path) -> None:
    """`out/bench.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    mtu = [results["tasks"][t]["unet_latency"]["mtu_vs_single"]["a_median_ms"] for t in tasks]
    single = [results["tasks"][t]["unet_latency"]["mtu_vs_single"]["b_median_ms"] for t in tasks]
    x = np.arange(len(tasks))
    axes[0].bar(x - 0.2, mtu, 0.4, label="folded MTU")
    axes[0].bar(x + 0.2, single, 0.4, label="single-task")
    axes[0].set_xticks(x, tasks)
    axes[0].set_ylabel("UNet call, ms (median)")
    axes[0].legend()
    modes = results["bundle"]["modes"]
    for mode, row in modes.items():
        values = [v for v in row["image_psnr_db"].values() if v is not None]
        quality = min(values) if values else 100.0
        axes[1].scatter(row["unet_bytes"] / 1e6, quality, label=mode if mode != "none" else "fp32")
    axes[1].set_xlabel("bundle UNet, MB")
    axes[1].set_ylabel("worst task image PSNR vs torch, dB")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
