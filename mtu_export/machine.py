"""Facts about the machine this process runs on, which more than one stage acts on: the CPU's instruction-set flags
(training's bf16 check, int8 quantization's 7-bit weights on CPUs without VNNI, the benchmarks' machine line)."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty where there is none: macOS, Windows)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
