"""Benchmarks: what a folded MTU task costs next to a single-task model, always measured side by side in one run.

- `run.py`        `mtu-export bench`: `BenchConfig` and `bench(...)`, the run that measures every task and the
                  all-task bundle and writes bench.json / bench.md / bench.png;
- `timing.py`     the interleaved timing protocols (A B, B A, …; ratios, never absolute times);
- `flops.py`      FLOPs per UNet call, by torch (CPU SDPA counted) and from the exported graph;
- `memory.py`     peak RSS of a fresh process running a graph; this process's own peak;
- `graphs.py`     the fixed-shape graphs measured: example inputs, export, structural signature, bytes;
- `gate.py`       the CI gate: baseline schema and validation, `make_baseline`, `check`, `enforce` (exit 7);
- `report.py`     bench.md and bench.png from the results;
- `train_step.py` `mtu-export bench-train`: an MTU training step ÷ a full fine-tune step;
- `sd15.py`       `make bench-sd15`: the fold's cost claims at Stable Diffusion v1.5 scale (random weights);
- `peers.py`      `make bench-sd15`'s second part: our exported graphs against optimum's at SD1.5 scale;
- `phone.py`      `make bench-sd15`'s third part: a 512x512 SD1.5-scale generation on a phone's memory budget;
- `device.py`     `make bench` where only the runtime is installed: latency rows on exported folders, no torch.

This file imports nothing: `python -m mtu_export.bench.memory` (the child whose peak memory is measured) must not
pull in torch or the rest of the package.
"""
