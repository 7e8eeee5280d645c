"""Should a student run in int8 or bf16? The fused exit head in each precision, against fp32.

    python benchmarks/bench_exit_head_precision.py [--threads 1 2] [--repeats 7]

The exit head's one O(S * H * R) step is the projection z = tanh(x W_in^T + b_in) of every real
token to the branch width R; the rest is O(R^2) per row. So the candidates are timed as:

* ``fp32``: the C++ op on float32 hidden states (what runs today);
* ``bf16``: the C++ op on bf16 hidden states, its projection a bf16 GEMM (float32 after it);
* ``int8 projection``: the projection alone as a dynamically quantised int8 Linear
  (``torch.ao.nn.quantized.dynamic.Linear``, weights per channel), against the fp32 projection
  alone (``fp32 projection``) -- the most an int8 student could save, before the rest of the head.

MiniLM's shapes (H 384, R 128, 2 classes), 32 tokens, batch 64 and 1; each method's calls are
interleaved with the others', the median of ``--repeats`` blocks kept. Results:
benchmarks/results/exit_head_precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from fastbert_kernels import ops
from fastbert_kernels.branch import BranchClassifier

# MiniLM's hidden size and the demo's classes; the branch width is BranchClassifier's default.
HIDDEN, LABELS = 384, 2


def methods(rows: int, seq: int, hidden_size: int, labels: int) -> dict:
    branch = BranchClassifier(hidden_size, labels).eval()
    hidden = torch.randn(rows, seq, hidden_size)
    mask = torch.ones(rows, seq, dtype=torch.int64)
    folded = {dtype: branch.folded_weights(dtype) for dtype in (torch.float32, torch.bfloat16)}
    bf16_hidden = hidden.to(torch.bfloat16)
    tokens = hidden.reshape(rows * seq, hidden_size)
    with warnings.catch_warnings():  # torch.ao announces its move to torchao
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        projection = torch.nn.Sequential(torch.nn.Linear(hidden_size, branch.input_proj.out_features))
        projection[0].load_state_dict(branch.input_proj.state_dict())
        int8_projection = torch.ao.quantization.quantize_dynamic(projection, {torch.nn.Linear: qconfig})
    return {
        "fp32": lambda: ops.exit_head_unchecked(hidden, mask, folded[torch.float32], 2, 0.5),
        "bf16": lambda: ops.exit_head_unchecked(bf16_hidden, mask, folded[torch.bfloat16], 2, 0.5),
        "fp32 projection": lambda: torch.tanh(projection(tokens)),
        "int8 projection": lambda: torch.tanh(int8_projection(tokens)),
    }


def time_interleaved(candidates: dict, calls: int, repeats: int) -> dict[str, float]:
    """Median microseconds a call, each repeat a block of ``calls`` calls of every method in turn."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(10):
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                begin = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - begin) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def bf16_instructions() -> list[str]:
    """This CPU's bf16 instruction sets (Linux): without them bf16 GEMMs are emulated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(set(flags.split()) & {"avx512_bf16", "amx_bf16", "amx_tile"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    result = {
        "shapes": {
            "hidden": HIDDEN,
            "branch": BranchClassifier(HIDDEN, LABELS).input_proj.out_features,
            "labels": LABELS,
            "tokens": args.seq,
        },
        "bf16_instructions": bf16_instructions(),
    }
    before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows, calls in ((64, 20), (1, 400)):
                key = f"threads_{threads}_batch_{rows}"
                result[key] = time_interleaved(methods(rows, args.seq, HIDDEN, LABELS), calls, args.repeats)
                print(key, json.dumps({k: round(v, 1) for k, v in result[key].items()}), flush=True)
    finally:
        torch.set_num_threads(before)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exit_head_precision.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
