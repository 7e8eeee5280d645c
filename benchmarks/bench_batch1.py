"""Batch 1, side by side: the patched model at low speeds (where almost nobody exits, so every
branch is pure overhead) against the unpatched model, and where the overhead goes per layer.

    python benchmarks/bench_batch1.py [--checkpoint DIR] [--samples 200] [--repeats 5]

The checkpoint defaults to the demo's distilled MiniLM on Rotten Tomatoes (run ``make demo``
first). Methods are interleaved text by text in a rotating order, so a drift in machine load hits
every method alike; each repeat gives one ratio per method (total unpatched time / total method
time over the same texts), and the report gives the median and the spread over repeats.

The breakdown times, in a separate pass, each part of the adaptive forward's per-layer
bookkeeping with a clock around it (the exit head with its weight lookup, the compaction with its
host read, the answer bookkeeping, the mask rebuild), against the encoder layers themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from demo_checkpoint import load_checkpoint

import fastbert_kernels as fbk
from fastbert_kernels import modeling, ops
from fastbert_kernels.apps.data import load_rotten_tomatoes
from fastbert_kernels.branch import BranchClassifier

SPEEDS = (0.0, 0.1, 0.2)


def side_by_side(model, batches, speeds, repeats: int) -> dict:
    forward = type(model).forward
    methods = {"unpatched": lambda b: forward(model, **b)}
    methods.update({f"speed {s:g}": (lambda b, s=s: model(**b, speed=s)) for s in speeds})
    names = list(methods)
    ratios: dict[str, list[float]] = defaultdict(list)
    per_sample_ms: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for b in batches[:10]:  # warm-up
            for fn in methods.values():
                fn(b)
        for _ in range(repeats):
            totals = dict.fromkeys(names, 0.0)
            for i, b in enumerate(batches):
                order = names[i % len(names) :] + names[: i % len(names)]
                for name in order:
                    begin = time.perf_counter()
                    methods[name](b)
                    totals[name] += time.perf_counter() - begin
            for name in names:
                ratios[name].append(totals["unpatched"] / totals[name])
                per_sample_ms[name].append(1e3 * totals[name] / len(batches))
    return {
        name: {
            "ms_per_sample": statistics.median(per_sample_ms[name]),
            "ratio_median": statistics.median(ratios[name]),
            "ratio_min": min(ratios[name]),
            "ratio_max": max(ratios[name]),
        }
        for name in names
    }


@contextlib.contextmanager
def clocked(owner, attribute: str, totals: dict, key: str):
    """Adds the wall-clock of every call of ``owner.attribute`` to ``totals[key]``."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - begin

    # Architecture is a frozen dataclass: set through object.__setattr__ on instances.
    assign = setattr if isinstance(owner, type) else object.__setattr__
    assign(owner, attribute, wrapper)
    try:
        yield
    finally:
        assign(owner, attribute, original)


def breakdown(model, batches, speed: float) -> dict:
    """Per branch layer, microseconds in each part of the adaptive forward's bookkeeping."""
    arch = fbk.architectures.architecture_for(model)
    totals: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        for b in batches[:10]:
            model(**b, speed=speed)
        with contextlib.ExitStack() as stack:
            stack.enter_context(clocked(BranchClassifier, "exit_decision", totals, "exit head (op + weights)"))
            stack.enter_context(clocked(ops, "exit_head_unchecked", totals, "of which: the op"))
            stack.enter_context(clocked(ops, "_EXIT_HEAD", totals, "of which: the kernel"))
            stack.enter_context(clocked(ops, "compact_unchecked", totals, "compaction (plan + host read)"))
            stack.enter_context(clocked(modeling, "layer_context", totals, "mask rebuild"))
            stack.enter_context(clocked(arch, "run", totals, "encoder layers"))
            begin = time.perf_counter()
            branch_layers = 0
            for b in batches:
                out = model(**b, speed=speed)
                branch_layers += int(out.exit_layer.clamp(max=model.config.num_hidden_layers - 1).sum())
            total = time.perf_counter() - begin
    layers_run = totals["encoder layers"]
    parts = {k: 1e6 * v / branch_layers for k, v in totals.items() if k != "encoder layers"}
    other = total - sum(v for k, v in totals.items() if not k.startswith("of which"))
    return {
        "branch_layers": branch_layers,
        "layer_us": 1e6 * layers_run / max(1, branch_layers + len(batches)),
        "per_branch_layer_us": parts,
        "rest_of_forward_us_per_sample": 1e6 * other / len(batches),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    if loaded is None:
        print("no checkpoint: run `make demo` first or pass --checkpoint", file=sys.stderr)
        return 2
    model, tokenizer, checkpoint = loaded
    texts = load_rotten_tomatoes().test.texts[: args.samples]
    batches = [dict(tokenizer([t], return_tensors="pt", truncation=True, max_length=64)) for t in texts]
    result = {
        "checkpoint": str(checkpoint),
        "threads": torch.get_num_threads(),
        "samples": len(batches),
        "side_by_side": side_by_side(model, batches, SPEEDS, args.repeats),
        "breakdown_speed_0.1": breakdown(model, batches, 0.1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch1.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
