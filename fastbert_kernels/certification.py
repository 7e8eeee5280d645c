"""Certified calibration: an exit rule whose risk is bounded with probability ``1 - delta``.

A rule chosen by its point estimate on one validation sample selects for luck: among thousands of
settings, the fastest that *looks* within budget is often just over it on new data. Here, as in
CALM (Schuster et al., 2022) with Learn-then-Test (Angelopoulos et al., 2021):

* **Risks.** ``disagreement``: the share of samples whose early answer differs from the full
  model's. It needs no labels, and it bounds the accuracy drop from above (a sample can only lose
  accuracy by disagreeing). ``accuracy_drop`` (labels): the mean of
  ``d_i = 1[early wrong] - 1[full wrong]`` in ``{-1, 0, 1}``.
* **Bounds**, each an upper confidence bound valid at level ``alpha`` for any sample size:
  the disagreement's exact binomial (Clopper-Pearson) bound on ``k`` of ``n``; the accuracy drop's
  ``U(a) - L(b)``, the Clopper-Pearson upper bound of the share ``a`` that the early answer loses
  minus the lower bound of the share ``b`` it wins, each at ``alpha / 2``. Both are exact for
  0/1 counts and adapt to small rates, where Hoeffding-type bounds on ``[-1, 1]`` are several
  times looser (:func:`empirical_bernstein_upper_bound` is kept for that comparison).
* **Fixed-sequence testing.** Within a rule family (criterion, temperature, patience), the speeds
  of a fixed grid are tested from the most conservative to the most aggressive; each is certified
  while its bound is at most ``epsilon``, and the walk stops at the first failure. Every certified
  speed then has risk at most ``epsilon`` with probability ``1 - alpha`` (the tests are nested, so
  no correction within a family is needed).
* **Across families**, ``delta`` is divided among them (Bonferroni, ``family_selection="split"``
  instead chooses the family on one half of the data and certifies it on the other at the full
  ``delta``); with labels and an accuracy-drop target, half of ``delta`` goes to each of the two
  routes (disagreement, which bounds the drop, and the drop itself), and the faster certified rule
  is kept.

The guarantee holds for calibration and future data that are exchangeable (drawn from the same
distribution, in no particular order); texts the students were distilled on agree with the teacher
more than new ones do, so they must not be used (``calibrate`` warns when it can tell).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from .ops.types import EXIT_CRITERIA

# The fixed grid of speeds every family is tested on, conservative first. Fixed in advance (not
# from the data), as fixed-sequence testing needs; fine near 0, where many-class criteria crowd.
CERTIFY_SPEEDS: tuple[float, ...] = tuple(
    sorted({round(10 ** (-4 + 2 * i / 100), 8) for i in range(100)} | {i / 1000 for i in range(1, 1001)})
)


def _log_binomial_cdf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) <= k), summed in log space (exact for the sizes calibration sees)."""
    if k >= n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return -math.inf
    i = torch.arange(0, k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    return float(torch.logsumexp(log_pmf, 0))


@functools.lru_cache(maxsize=65536)  # a sweep meets the same (k, n, alpha) at many speeds
def binomial_upper_bound(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson: the largest ``p`` with ``P(Binomial(n, p) <= k) >= alpha``, so that
    ``P(true p <= bound) >= 1 - alpha``. ``n = 0`` gives 1."""
    if n == 0 or k >= n:
        return 1.0
    low, high, target = k / n, 1.0, math.log(alpha)
    for _ in range(60):  # bisection to ~1e-18
        mid = (low + high) / 2
        if _log_binomial_cdf(k, n, mid) > target:
            low = mid
        else:
            high = mid
    return high


def binomial_lower_bound(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson lower bound: ``1 - upper bound`` of the complement count."""
    return 0.0 if k == 0 else 1.0 - binomial_upper_bound(n - k, n, alpha)


def accuracy_drop_upper_bound(worse: int, better: int, n: int, alpha: float) -> float:
    """Upper confidence bound at level ``alpha`` of ``P(early wrong, full right) - P(early right,
    full wrong)`` from ``worse`` and ``better`` counts of ``n``: Bonferroni over two exact bounds."""
    return binomial_upper_bound(worse, n, alpha / 2) - binomial_lower_bound(better, n, alpha / 2)


def empirical_bernstein_upper_bound(values: torch.Tensor, alpha: float, value_range: float = 2.0) -> float:
    """Maurer and Pontil's empirical Bernstein bound on the mean of ``values`` in an interval of
    width ``value_range``: mean + sqrt(2 V log(2/alpha) / n) + 7 range log(2/alpha) / (3 (n - 1))."""
    n = values.numel()
    if n < 2:
        return math.inf
    log_term = math.log(2 / alpha)
    variance = float(values.double().var(unbiased=True))
    return (
        float(values.double().mean())
        + math.sqrt(2 * variance * log_term / n)
        + 7 * value_range * log_term / (3 * (n - 1))
    )


def required_samples(rate: float, epsilon: float, alpha: float, limit: int = 10_000_000) -> int | None:
    """The fewest samples at which an observed ``rate`` (< epsilon) certifies ``risk <= epsilon``
    by the binomial bound; None if no number does (rate >= epsilon) or it exceeds ``limit``."""
    if rate >= epsilon:
        return None
    n = 16
    while n <= limit:
        if binomial_upper_bound(math.ceil(rate * n), n, alpha) <= epsilon:
            break
        n *= 2
    else:
        return None
    low, high = n // 2, n
    while low + 1 < high:
        mid = (low + high) // 2
        if binomial_upper_bound(math.ceil(rate * mid), mid, alpha) <= epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclasses.dataclass(frozen=True)
class Certificate:
    """What a certified calibration guarantees: with probability at least ``1 - delta`` over the
    calibration sample, the rule's ``risk`` on exchangeable data is at most ``epsilon``.
    ``estimate`` is the risk measured on the ``samples`` calibration texts, ``upper_bound`` the
    bound that certified it (at level ``alpha`` after dividing ``delta``); ``families`` is how
    many (criterion, temperature, patience) families shared ``delta``."""

    risk: str
    epsilon: float
    delta: float
    samples: int
    estimate: float
    upper_bound: float
    bound: str
    alpha: float
    families: int
    family_selection: str
    ideal_speedup: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.risk} <= {self.epsilon:g} with probability >= {1 - self.delta:g} "
            f"(measured {self.estimate:.4f} on {self.samples} texts, bound {self.upper_bound:.4f} by {self.bound}, "
            f"{self.families} families, {self.family_selection}); ideal speed-up {self.ideal_speedup:.2f}x"
        )


@dataclasses.dataclass(frozen=True)
class _Losses:
    """Per-sample outcomes of one setting against the full model: disagreement, and with labels
    the samples the early answer makes wrong (``worse``) or right (``better``)."""

    disagree: torch.Tensor
    worse: torch.Tensor | None
    better: torch.Tensor | None


def _losses(profile, rows: torch.Tensor, labels: torch.Tensor | None, speed, criterion, temperature, patience):
    layers = profile.exit_layers(speed, criterion, temperature, patience)[rows]
    early = profile.prediction[rows].gather(1, (layers - 1)[:, None]).squeeze(1)
    full = profile.prediction[rows, -1]
    if labels is None:
        return layers, _Losses(early != full, None, None)
    truth = labels[rows]
    return layers, _Losses(early != full, (early != truth) & (full == truth), (early == truth) & (full != truth))


def _bound(losses: _Losses, risk: str, alpha: float) -> tuple[float, float]:
    """(estimate, upper bound at level alpha) of ``risk``."""
    n = losses.disagree.numel()
    if risk == "disagreement":
        k = int(losses.disagree.sum())
        return k / n, binomial_upper_bound(k, n, alpha)
    worse, better = int(losses.worse.sum()), int(losses.better.sum())
    return (worse - better) / n, accuracy_drop_upper_bound(worse, better, n, alpha)


@dataclasses.dataclass(frozen=True)
class _Certified:
    family: tuple[str, float, int]
    speed: float
    estimate: float
    upper_bound: float
    speedup: float
    risk: str
    alpha: float
    samples: int  # the texts the bound was computed on (half of them with a split)


def fixed_sequence(profile, table, rows, labels, family, risk: str, epsilon: float, alpha: float) -> _Certified | None:
    """The most aggressive speed of ``family`` that fixed-sequence testing certifies on ``rows``
    (tested in :data:`CERTIFY_SPEEDS` order, stopping at the first failure), or None."""
    criterion, temperature, patience = family
    found = None
    for speed in CERTIFY_SPEEDS:
        layers, losses = _losses(profile, rows, labels, speed, criterion, temperature, patience)
        estimate, upper = _bound(losses, risk, alpha)
        if upper > epsilon:
            break
        found = _Certified(family, speed, estimate, upper, table.speedup_of(layers, rows), risk, alpha, len(rows))
    return found


def point_estimate_pick(profile, table, rows, labels, family, risk: str, epsilon: float) -> _Certified | None:
    """The fastest speed of ``family`` whose measured risk on ``rows`` is within ``epsilon`` (the
    choosing half of a split: no guarantee by itself)."""
    criterion, temperature, patience = family
    best = None
    for speed in CERTIFY_SPEEDS:
        layers, losses = _losses(profile, rows, labels, speed, criterion, temperature, patience)
        estimate, _ = _bound(losses, risk, 0.5)
        if estimate <= epsilon:
            speedup = table.speedup_of(layers, rows)
            if best is None or speedup > best.speedup:
                best = _Certified(family, speed, estimate, math.nan, speedup, risk, math.nan, len(rows))
    return best


def certify(
    profile,
    table,
    labels: torch.Tensor | None,
    *,
    risks: Sequence[str],
    epsilon: float,
    delta: float,
    families: Sequence[tuple[str, float, int]],
    family_selection: str = "bonferroni",
    seed: int = 0,
) -> tuple[_Certified | None, dict]:
    """The fastest certified setting over ``families`` for any of ``risks`` (``delta`` divided
    equally among the risks), and what each risk and family gave (for the report)."""
    if family_selection not in ("bonferroni", "split"):
        raise ValueError(f"family_selection must be 'bonferroni' or 'split', got {family_selection!r}")
    n = profile.prediction.shape[0]
    everyone = torch.arange(n)
    per_risk = delta / len(risks)
    found: list[_Certified] = []
    report: dict = {}
    for risk in risks:
        if family_selection == "bonferroni":
            alpha = per_risk / len(families)
            results = {f: fixed_sequence(profile, table, everyone, labels, f, risk, epsilon, alpha) for f in families}
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            choose, test = order[: n // 2], order[n // 2 :]
            picks = [point_estimate_pick(profile, table, choose, labels, f, risk, epsilon) for f in families]
            picks = [p for p in picks if p is not None]
            results = {}
            if picks:
                family = max(picks, key=lambda p: p.speedup).family
                results[family] = fixed_sequence(profile, table, test, labels, family, risk, epsilon, per_risk)
        report[risk] = results
        found += [r for r in results.values() if r is not None]
    best = max(found, key=lambda r: (r.speedup, -r.upper_bound), default=None)
    return best, report


def default_families(criteria=EXIT_CRITERIA, temperatures=(1.0, 0.5, 0.25), patiences=(1, 2, 3)):
    return [(c, float(t), int(p)) for c in criteria for t in temperatures for p in patiences]
