"""Which upper bound on the labelled net accuracy drop is tightest? The candidates, side by side.

    python benchmarks/compare_bounds.py

The per-sample drop d = 1[early wrong] - 1[full wrong] lies in {-1, 0, 1}: ``worse`` samples at
+1, ``better`` at -1. For observed rates (a, b) of those at n samples, at the level each family
gets by default (delta 0.1, half to this route, divided among 135 families), this prints the
median over 25 simulated samples (each bound computed on the same samples) of:

* betting: the Waudby-Smith-Ramdas betting bound on d (what :mod:`fastbert_kernels.certification`
  uses by default; it depends on the order of the samples, which it shuffles);
* CP difference: the Clopper-Pearson upper bound of a minus the lower bound of b, each at
  alpha / 2 (``drop_bound="clopper-pearson"``);
* sign test: an upper bound of P(discordant) times (2 theta - 1), theta = P(worse | discordant)
  bounded by Clopper-Pearson on the discordant samples (each at alpha / 2);
* empirical Bernstein (Maurer and Pontil) on d in [-1, 1];
* Hoeffding on d in [-1, 1];
* the disagreement's own Clopper-Pearson bound (a + b), which also bounds the drop.
Written to benchmarks/results/bounds.md.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from fastbert_kernels.certification import (
    accuracy_drop_upper_bound,
    betting_drop_upper_bound,
    binomial_lower_bound,
    binomial_upper_bound,
)

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.1 / 2 / 135
DRAWS = 25
RATES = ((0.005, 0.0), (0.01, 0.005), (0.02, 0.01), (0.03, 0.02), (0.05, 0.04))


def sign_test_bound(worse: int, better: int, n: int, alpha: float) -> float:
    discordant = worse + better
    if discordant == 0:
        return binomial_upper_bound(0, n, alpha)
    theta = binomial_upper_bound(worse, discordant, alpha / 2)
    if theta > 0.5:
        return binomial_upper_bound(discordant, n, alpha / 2) * (2 * theta - 1)
    return binomial_lower_bound(discordant, n, alpha / 2) * (2 * theta - 1)


def empirical_bernstein(a: float, b: float, n: int, alpha: float) -> float:
    mean, variance = a - b, (a + b) - (a - b) ** 2
    variance *= n / (n - 1)
    log_term = math.log(2 / alpha)
    return mean + math.sqrt(2 * variance * log_term / n) + 7 * 2 * log_term / (3 * (n - 1))


def hoeffding(a: float, b: float, n: int, alpha: float) -> float:
    return (a - b) + 2 * math.sqrt(math.log(1 / alpha) / (2 * n))


def main() -> None:
    lines = [
        f"Upper bounds on the net accuracy drop at alpha = {ALPHA:.2e} (lower is tighter; a = worse, b = better;",
        f"median over {DRAWS} simulated samples). `python benchmarks/compare_bounds.py`",
        "",
        "| n | a | b | betting | CP difference | sign test | empirical Bernstein | Hoeffding | disagreement (a + b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for n in (1000, 2000, 5000, 20000):
        for a, b in RATES:
            u = torch.rand(DRAWS, n, generator=generator, dtype=torch.float64)
            drops = (u < a).to(torch.int8) - ((u >= a) & (u < a + b)).to(torch.int8)
            betting = betting_drop_upper_bound(drops, ALPHA).tolist()
            columns = [[] for _ in range(5)]
            for row in drops:
                worse, better = int((row > 0).sum()), int((row < 0).sum())
                cells = (
                    accuracy_drop_upper_bound(worse, better, n, ALPHA),
                    sign_test_bound(worse, better, n, ALPHA),
                    empirical_bernstein(worse / n, better / n, n, ALPHA),
                    hoeffding(worse / n, better / n, n, ALPHA),
                    binomial_upper_bound(worse + better, n, ALPHA),
                )
                for column, cell in zip(columns, cells, strict=True):
                    column.append(cell)
            medians = [statistics.median(betting)] + [statistics.median(c) for c in columns]
            lines.append(f"| {n} | {a:g} | {b:g} | " + " | ".join(f"{c:.4f}" for c in medians) + " |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "bounds.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
