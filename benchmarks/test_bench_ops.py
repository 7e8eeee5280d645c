"""Op benchmarks (pytest-benchmark): each compiled backend against the plain-torch reference on
the same inputs, in one run; compaction against a plain ``index_select`` copy of the same bytes.

    make bench-ops    # runs these, writes benchmarks/results/ops.json, prints the ratios

On a CUDA machine the same file times the Triton and CUDA backends (synchronised), and records
``triton.testing.do_bench`` for each in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_branch_weights

from fastbert_kernels.ops import BACKENDS

EXIT_HEAD_SHAPES = [(64, 64, 384), (64, 128, 768)]  # rows, sequence, hidden (issue 3's targets)
COMPACT_SHAPES = [(64, 128, 768), (256, 64, 384)]


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _backends(device: str) -> list[str]:
    names = ["reference", "cpu"] if device == "cpu" else ["reference", "triton", "cuda"]
    return [n for n in names if BACKENDS[n].available()[0] and device in BACKENDS[n].devices()]


def _cases(device_backends):
    return [(d, b) for d in _devices() for b in device_backends(d)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gpu_do_bench(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn))


@pytest.mark.parametrize("device,backend", _cases(_backends))
@pytest.mark.parametrize("rows,seq,hidden", EXIT_HEAD_SHAPES, ids=lambda v: str(v))
def test_exit_head(benchmark, device, backend, rows, seq, hidden):
    torch.manual_seed(rows * seq + hidden)  # every backend of a shape sees the same inputs
    x = torch.randn(rows, seq, hidden, device=device)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    weights = random_branch_weights(hidden, 128, 2)
    weights = type(weights)(*(t.to(device) for t in weights))
    fn = BACKENDS[backend].exit_head

    def run():
        out = fn(x, mask, weights, 2, 0.5)
        _sync(device)
        return out

    benchmark.group = f"exit_head {device} rows={rows} seq={seq} hidden={hidden}"
    benchmark.extra_info.update(op="exit_head", device=device, backend=backend, rows=rows, seq=seq, hidden=hidden)
    gpu_ms = _gpu_do_bench(lambda: fn(x, mask, weights, 2, 0.5)) if device == "cuda" else None
    if gpu_ms is not None:
        benchmark.extra_info["do_bench_ms"] = gpu_ms
    with torch.no_grad():
        benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)


def _compact_inputs(rows, seq, hidden, device):
    torch.manual_seed(rows * seq + hidden)  # every backend of a shape sees the same inputs
    x = torch.randn(rows, seq, hidden, device=device)
    lengths = torch.randint(1, seq + 1, (rows,), device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    keep = torch.rand(rows, device=device) < 0.6
    return x, mask, torch.arange(rows, device=device), keep


def _copied_bytes(x, mask, keep) -> int:
    kept = keep.nonzero().flatten()
    length = int((mask[kept] != 0).long().sum(1).max()) if kept.numel() else 0
    return 2 * kept.numel() * length * x.shape[2] * x.element_size()  # read + write


@pytest.mark.parametrize("device,backend", _cases(lambda d: [*_backends(d), "index_select"]))
@pytest.mark.parametrize("rows,seq,hidden", COMPACT_SHAPES, ids=lambda v: str(v))
def test_compact(benchmark, device, backend, rows, seq, hidden):
    x, mask, row_ids, keep = _compact_inputs(rows, seq, hidden, device)
    kept = keep.nonzero().flatten()
    length = int((mask[kept] != 0).long().sum(1).max())
    if backend == "index_select":
        # The bar to clear: torch copying exactly the same bytes (indices and length known).
        def op():
            return torch.index_select(x[:, :length], 0, kept)
    else:
        fn = BACKENDS[backend].compact

        def op():
            return fn(x, mask, row_ids, keep, True)

    def run():
        out = op()
        _sync(device)
        return out

    benchmark.group = f"compact {device} rows={rows} seq={seq} hidden={hidden}"
    benchmark.extra_info.update(
        op="compact",
        device=device,
        backend=backend,
        rows=rows,
        seq=seq,
        hidden=hidden,
        bytes=_copied_bytes(x, mask, keep),
    )
    if device == "cuda":
        benchmark.extra_info["do_bench_ms"] = _gpu_do_bench(op)
    benchmark.pedantic(run, rounds=50, warmup_rounds=5, iterations=1)
