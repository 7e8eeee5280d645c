"""The adaptive forward's efficiency on every supported model type (CPU, random weights).

    python benchmarks/bench_architectures.py [--batch 64] [--repeats 7]

For each model type: a small random classifier (6 layers, hidden 256, the type's own quirks:
ALBERT's shared groups, DeBERTa-v2's relative attention, ModernBERT's sliding windows, ...) with
random confident-ish students, a batch of 64 with mixed lengths up to 64 tokens, and the speed at
which half the rows leave after layer 1. Reports wall-clock against the unpatched model in the same
process (median of repeats), the ideal speed-up from the layers run (``L / mean exit layer``,
branches not counted) and their ratio, the efficiency. Writes
``benchmarks/results/architectures.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-config factory the tests use, at a larger size

from helpers import random_batch, spread_branches, tiny_model  # noqa: E402

import fastbert_kernels as fbk  # noqa: E402
from fastbert_kernels.calibration import exit_profile  # noqa: E402

KINDS = ["bert", "roberta", "camembert", "distilbert", "albert", "electra", "deberta-v2", "modernbert"]
LAYERS, HIDDEN = 6, 256


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


@torch.no_grad()
def row(kind: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    attn = "eager" if kind == "deberta-v2" else "sdpa"
    model = tiny_model(kind, attn, num_labels=3, layers=LAYERS, hidden=HIDDEN)
    batch = random_batch(batch_size, 64, model.config.pad_token_id or 0, min_length=8)
    unpatched = median_ms(lambda: model(**batch), repeats)
    fbk.patch(model)
    spread_branches(model)
    u = exit_profile(model, [batch]).uncertainty()[:, 0]
    speed = float(u.median()) + 1e-6
    patched = median_ms(lambda: model(**batch, speed=speed), repeats)
    exits = model(**batch, speed=speed).exit_layer.float()
    ideal = LAYERS / float(exits.mean())
    return {
        "model_type": kind,
        "attention": attn,
        "mean_exit_layer": float(exits.mean()),
        "unpatched_ms": unpatched,
        "patched_ms": patched,
        "speedup": unpatched / patched,
        "ideal": ideal,
        "efficiency": unpatched / patched / ideal,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    rows = []
    print("| model type | attention | mean exit layer | unpatched ms | patched ms | speed-up | ideal | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        r = row(kind, args.batch, args.repeats)
        rows.append(r)
        print(
            f"| {kind} | {r['attention']} | {r['mean_exit_layer']:.2f} | {r['unpatched_ms']:.1f} | "
            f"{r['patched_ms']:.1f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['efficiency']:.2f} |",
            flush=True,
        )
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    out = ROOT / "benchmarks" / "results" / "architectures.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
