"""Op benchmarks under pytest-benchmark: each method of :mod:`bench_ops` timed on its own, with
its warm-up, for pytest-benchmark's statistics and history (``--benchmark-compare``).

    pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-only

The ratios in the README come from ``make bench-ops`` (``bench_ops.py``), which interleaves the
methods and reports the spread across repeats; sequential runs like these drift with machine load.
"""

from __future__ import annotations

import pytest
import torch
from bench_ops import COMPACT_SHAPES, EXIT_HEAD_SHAPES, compact_methods, exit_head_methods, pin_allocator

pin_allocator()
DEVICES = [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]


def _run(benchmark, method, device, group: str, **info) -> None:
    def call():
        out = method()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    benchmark.group = group
    benchmark.extra_info.update(info)
    with method, torch.no_grad():
        benchmark.pedantic(call, rounds=30, warmup_rounds=5, iterations=1)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("shape", EXIT_HEAD_SHAPES, ids=str)
def test_exit_head(benchmark, device, shape):
    methods = exit_head_methods(*shape, device)
    name = "extension" if "extension" in methods else "torch"
    _run(benchmark, methods[name], device, f"exit_head {device.type} {shape}", backend=name)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("shape", COMPACT_SHAPES, ids=str)
def test_compact(benchmark, device, shape):
    methods, copied = compact_methods(*shape, device)
    name = "extension" if "extension" in methods else "torch"
    _run(benchmark, methods[name], device, f"compact {device.type} {shape}", backend=name, bytes=copied)
