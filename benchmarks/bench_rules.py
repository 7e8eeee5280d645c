"""Wall-clock of given exit rules against the unpatched model, with more repeats than the demo.

    python benchmarks/bench_rules.py CHECKPOINT --data banking77 \\
        --rules entropy:0.5:2:0.2044 max_prob:1:2:0.5885 margin:1:2:0.75 --texts 1536 --repeats 5

Each rule is ``criterion:temperature:patience:speed``. The harness is the demo's (methods
interleaved with the unpatched model, the minimum of the repeats kept), at batch 64, on the first
``--texts`` test texts; speed 0 is timed too. Prints, and writes ``--out`` as JSON: accuracy,
wall-clock speed-up, ideal speed-up and efficiency per rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import fastbert_kernels as fbk
from fastbert_kernels.apps.benchmarking import benchmark
from fastbert_kernels.apps.data import load_dataset


def _rule(text: str) -> fbk.ExitRule:
    """``criterion:temperature:patience:speed[:first-last]`` (the students from layer first to last)."""
    parts = text.split(":")
    criterion, temperature, patience, speed = parts[:4]
    students = None
    if len(parts) == 5:
        first, last = map(int, parts[4].split("-"))
        students = tuple(range(first, last + 1))
    return fbk.ExitRule(criterion, float(temperature), int(patience), float(speed), students)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="banking77")
    parser.add_argument("--rules", nargs="+", type=_rule, required=True)
    parser.add_argument("--texts", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = fbk.from_pretrained(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    test = load_dataset(args.data).test.head(args.texts)
    rows = benchmark(
        model,
        tokenizer,
        test.texts,
        test.labels,
        [0.0],
        batch_size=args.batch_size,
        max_length=args.max_length,
        repeats=args.repeats,
        rules=args.rules,
    )
    records = [r.as_dict() for r in rows]
    for r in rows:
        print(
            f"{r.method:<12}{r.setting:>8.4g}  {r.rule:<28}{100 * r.accuracy:>8.2f}%  wall {r.wallclock_speedup:.2f}x"
            f"  ideal {r.ideal_speedup:.2f}x  efficiency {r.efficiency:.2f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"command": vars(args) | {"rules": [str(x) for x in args.rules]}, "rows": records},
                indent=1,
                default=str,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
