"""Op benchmarks whose ratios reproduce: every method of a shape is timed in interleaved blocks,
in a shuffled order, over several repeats, and the ratio to the baseline is taken per repeat, so
the report gives its median and its spread (min-max over repeats).

    python benchmarks/bench_ops.py [--repeats 9] [--calls 15] [--out benchmarks/results]

Baselines: for the exit head, the paper's branch in plain torch (``ops.reference``, what a user
without this package computes); for compaction, ``index_select`` of exactly the same bytes (the
indices and length known in advance). Backends are forced through ``FASTBERT_KERNELS_BACKEND``
and called through the public ops, as a model calls them.

Why the controls: a compaction output at (64, 128, 768) is 25 MB, near glibc's adaptive mmap
threshold, so whichever method first frees such a block changes how every later one is allocated
(page faults on fresh mmaps: a 10x swing between runs of the old harness). Here the allocator is
pinned (a fixed mmap threshold above the outputs and no trimming: every method reuses warm heap
pages), every block starts with untimed warm-up calls, and the order changes every repeat.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import random_branch_weights

from fastbert_kernels import ops
from fastbert_kernels.ops import compiled, reference

EXIT_HEAD_SHAPES = [(64, 64, 384), (64, 128, 768), (1, 32, 384)]  # rows, sequence, hidden
COMPACT_SHAPES = [(64, 128, 768), (256, 64, 384)]
WIDTH, HEADS, CLASSES = 128, 2, 2


def pin_allocator() -> str:
    """glibc only: a fixed mmap threshold (32 MB, its maximum; no adaptive raise) and no trimming."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "not glibc: allocator left as it is"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    return "glibc: mmap threshold 32 MB, no trim" if ok else "glibc refused mallopt"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backends(device: torch.device) -> list[str]:
    names = ["torch", "extension"] if device.type == "cpu" else ["torch", "triton", "extension"]
    return [n for n in names if ops.backends._runs(ops.BACKENDS[n], device.type)]


class Forced:
    """Runs ``fn`` with a backend forced (None: the environment as it is)."""

    def __init__(self, backend: str | None, fn: Callable[[], object]) -> None:
        self.backend, self.fn = backend, fn

    def __call__(self) -> object:
        return self.fn()

    def __enter__(self) -> Forced:
        self.saved = os.environ.get(ops.ENV_VAR)
        if self.backend is not None:
            os.environ[ops.ENV_VAR] = self.backend
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop(ops.ENV_VAR, None)
        else:
            os.environ[ops.ENV_VAR] = self.saved


def exit_head_methods(rows: int, seq: int, hidden: int, device: torch.device) -> dict[str, Forced]:
    torch.manual_seed(rows * seq + hidden)
    x = torch.randn(rows, seq, hidden, device=device)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (rows,), device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    weights = type(w := random_branch_weights(hidden, WIDTH, CLASSES))(*(t.to(device) for t in w))
    folded = weights.fold(HEADS, x.dtype)
    methods = {"reference": Forced(None, lambda: reference.exit_head(x, mask, weights, HEADS, 0.5))}
    for name in _backends(device):
        methods[name] = Forced(name, lambda: ops.exit_head(x, mask, folded, HEADS, 0.5))
    return methods


def compact_methods(rows: int, seq: int, hidden: int, device: torch.device) -> tuple[dict[str, Forced], int]:
    torch.manual_seed(rows * seq + hidden)
    x = torch.randn(rows, seq, hidden, device=device)
    lengths = torch.randint(1, seq + 1, (rows,), device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    keep = torch.rand(rows, device=device) < 0.6
    row_ids = torch.arange(rows, device=device)
    kept = keep.nonzero().flatten()
    length = int((mask[kept] != 0).long().sum(1).max())
    methods = {"index_select": Forced(None, lambda: torch.index_select(x[:, :length], 0, kept))}
    for name in _backends(device):
        methods[name] = Forced(name, lambda: ops.compact(x, mask, row_ids, keep, True))
    copied = 2 * kept.numel() * length * hidden * x.element_size()  # read + write
    return methods, copied


def time_block(method: Forced, calls: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call over ``calls`` calls, after ``warmup`` untimed ones."""
    with method, torch.no_grad():
        for _ in range(warmup):
            method()
        _sync(device)
        times = []
        for _ in range(calls):
            begin = time.perf_counter()
            method()
            _sync(device)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(methods: dict[str, Forced], baseline: str, repeats: int, calls: int, device, seed: int) -> dict:
    order = list(methods)
    rng = random.Random(seed)
    blocks: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            blocks[name].append(time_block(methods[name], calls, warmup=3, device=device))
    result = {}
    for name, seconds in blocks.items():
        ratios = [b / s for b, s in zip(blocks[baseline], seconds, strict=True)]
        result[name] = {
            "median_ms": 1e3 * statistics.median(seconds),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    allocator = pin_allocator()
    devices = [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]
    rows = []
    for device in devices:
        for shape in EXIT_HEAD_SHAPES:
            for name, stats in measure(
                exit_head_methods(*shape, device), "reference", args.repeats, args.calls, device, seed=hash(shape) % 97
            ).items():
                rows.append({"op": "exit_head", "device": device.type, "shape": list(shape), "method": name, **stats})
        for shape in COMPACT_SHAPES:
            methods, copied = compact_methods(*shape, device)
            for name, stats in measure(methods, "index_select", args.repeats, args.calls, device, seed=7).items():
                gbps = copied / (stats["median_ms"] / 1e3) / 1e9
                rows.append({"op": "compact", "device": device.type, "shape": list(shape), "method": name, **stats,
                             "gb_per_s": gbps})  # fmt: skip
    facts = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "extension": compiled.BUILD_INFO or compiled.LOAD_ERROR,
        "allocator": allocator,
        "repeats": args.repeats,
        "calls_per_block": args.calls,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ops.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    lines = [
        f"op benchmarks: {facts['threads']} threads, torch {facts['torch']}, {allocator}; "
        f"{args.repeats} interleaved repeats of {args.calls} calls",
        "",
        "| op | device | shape (N, S, H) | method | median ms | speed-up vs baseline: median (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['op']} | {row['device']} | {tuple(row['shape'])} | {row['method']} | {row['median_ms']:.3f} | "
            f"{row['ratio_median']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "ops.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
