"""Shared timing and FLOP counting of fsseg-bench (not a benchmark itself: the leading underscore hides it).

Times come from ``torch.utils.benchmark.Timer`` (it synchronises CUDA around each measurement and runs with this
process's torch thread count); several step functions are measured in interleaved rounds, so a load change on a
shared machine hits all of them alike, and the median per function is reported. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` over one call (matmuls and convolutions, forward and backward: the
work a GPU's tensor-core peak refers to; element-wise work is not counted).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peaks (FLOP/s) by device-name substring, from the vendors' data sheets
BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def parser(name: str, doc: str | None, skip_473_help: str | None = None) -> argparse.ArgumentParser:
    """``fsseg-bench <name>``'s argument parser with the options every size-comparing benchmark shares:
    ``--repeats`` (interleaved rounds), ``--threads`` (torch threads), ``--skip-473`` (embedded size only)."""
    ap = argparse.ArgumentParser(prog=f"fsseg-bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-473", action="store_true", help=skip_473_help or "embedded size only")
    return ap


def interleaved(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of every function (one warm-up call each, then ``repeats`` interleaved rounds of one
    ``Timer.timeit(1)`` each)."""
    threads = torch.get_num_threads()
    timers = {k: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for k, fn in steps.items()}
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(max(1, repeats)):
        for k, timer in timers.items():
            times[k].append(timer.timeit(1).median)
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (forward and backward where the call runs backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, device name) of a CUDA device; (None, name) when unknown or not CUDA."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak, name
    return None, name


def describe(seconds: float, flops: int) -> str:
    return f"{1e3 * seconds:9.1f} ms, {flops / 1e9:8.2f} GFLOP ({flops / seconds / 1e12:6.3f} TFLOP/s)"


def peak_fraction(seconds: float, flops: int, device: torch.device) -> str:
    peak, name = bf16_peak(device)
    if device.type != "cuda":
        return "fraction of the bf16 peak: unmeasured (no GPU)"
    if peak is None:
        return f"fraction of the bf16 peak: unknown peak for {name!r}"
    return f"{flops / seconds / peak:.1%} of {name}'s dense bf16 peak ({peak / 1e12:.0f} TFLOP/s)"


__all__ = ["BF16_PEAK", "bf16_peak", "count_flops", "describe", "interleaved", "parser", "peak_fraction"]
