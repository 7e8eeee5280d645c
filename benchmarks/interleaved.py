"""Interleaved timing of several methods on the same batches: the one timer of the benchmarks
that compare whole forwards side by side (bench_students.py, bench_int8.py).

Methods run batch by batch in a rotating order, so that a drift in machine load hits all of them
alike; each repeat gives one ratio per method (the baseline's total time over the method's), and
the report keeps the median and the range over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from fastbert_kernels.apps.benchmarking import exit_rule
from fastbert_kernels.exit_rule import ExitRule


def under(model, rule: ExitRule | None) -> Callable[[dict], object]:
    """A method for :func:`interleaved_ratios`: the patched ``model`` deciding by ``rule`` (its
    config's own rule restored after each call), or with None the unpatched forward."""
    if rule is None:
        forward = type(model).forward
        return lambda batch: forward(model, **batch)

    def run(batch):
        with exit_rule(model, rule):
            return model(**batch)

    return run


def interleaved_ratios(
    methods: dict[str, Callable[[dict], object]], batches: Sequence[dict], repeats: int, baseline: str
) -> dict[str, dict[str, float]]:
    """``{name: {"median", "min", "max"}}`` of ``baseline`` time / method time over ``batches``."""
    names = list(methods)
    ratios: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for batch in batches[:3]:  # warm-up: allocator, kernels, caches
            for name in names:
                methods[name](batch)
        for _ in range(repeats):
            totals = dict.fromkeys(names, 0.0)
            for i, batch in enumerate(batches):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    begin = time.perf_counter()
                    methods[name](batch)
                    totals[name] += time.perf_counter() - begin
            for name in names:
                ratios[name].append(totals[baseline] / totals[name])
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in ratios.items()}
