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
* **Fixed-sequence testing.** Within a rule family (criterion, temperature, patience, students), the speeds
  of a fixed grid are tested from the most conservative to the most aggressive; each is certified
  while its bound is at most ``epsilon``, and the walk stops at the first failure. Every certified
  speed then has risk at most ``epsilon`` with probability ``1 - alpha`` (the tests are nested, so
  no correction within a family is needed). The walk is vectorised: one pass over the students
  gives the exit layers at 128 speeds at once (:meth:`ExitProfile.exit_layers_at`).
* **Students.** Which students run is part of the family: every student, or the students from
  about 1/6, 1/3, 1/2, 2/3 or 5/6 of the depth on (:func:`student_sets`, fixed before any data is
  seen). The ideal speed-up counts each evaluated student's cost, so a set that leaves out
  students nobody exits at wins when it is faster.
* **Across families**, ``delta`` is divided among them (Bonferroni, ``family_selection="split"``
  instead chooses the family on one half of the data and certifies it on the other at the full
  ``delta``); with labels and an accuracy-drop target, half of ``delta`` goes to each of the two
  routes (disagreement, which bounds the drop, and the drop itself), and the faster certified rule
  is kept.

Unlabelled samples can join labelled ones (``labels`` -1): they count for the disagreement
route only, which bounds the accuracy drop too, and tighten it.

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

from .exit_rule import ExitRule
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


# Speeds are tested in chunks: one vectorised pass per chunk, and the walk stops at the first
# failure, so a family that fails early costs one chunk.
_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class _Counts:
    """Outcomes of one family at S speeds against the full model, over the samples tested:
    ``disagree [S]`` of ``samples``; with labels, ``worse [S]`` (the early answer wrong, the full
    one right) and ``better [S]`` of the ``labelled`` ones."""

    disagree: list[int]
    worse: list[int] | None
    better: list[int] | None
    samples: int
    labelled: int


def _counts(profile, rows: torch.Tensor, labels: torch.Tensor | None, layers: torch.Tensor) -> _Counts:
    """``layers [S, len(rows)]``; ``labels [N]`` holds -1 for unlabelled samples, which count for
    the disagreement only."""
    prediction = profile.prediction[rows]  # [R, L]
    early = prediction.gather(1, (layers - 1).T).T  # [S, R]
    full = profile.full_answers[rows]
    disagree = (early != full).sum(1).tolist()
    if labels is None:
        return _Counts(disagree, None, None, len(rows), 0)
    truth = labels[rows]
    labelled = truth >= 0
    early, full, truth = early[:, labelled], full[labelled], truth[labelled]
    worse = ((early != truth) & (full == truth)).sum(1).tolist()
    better = ((early == truth) & (full != truth)).sum(1).tolist()
    return _Counts(disagree, worse, better, len(rows), int(labelled.sum()))


def _estimate(counts: _Counts, i: int, risk: str) -> tuple[float, int]:
    """(measured risk, samples it used) at the i-th speed."""
    if risk == "disagreement":
        return counts.disagree[i] / max(counts.samples, 1), counts.samples
    return (counts.worse[i] - counts.better[i]) / max(counts.labelled, 1), counts.labelled


def _bound(counts: _Counts, i: int, risk: str, alpha: float) -> tuple[float, float, int]:
    """(estimate, upper bound at level alpha, samples it used) of ``risk`` at the i-th speed."""
    estimate, n = _estimate(counts, i, risk)
    if risk == "disagreement":
        return estimate, binomial_upper_bound(counts.disagree[i], n, alpha), n
    return estimate, accuracy_drop_upper_bound(counts.worse[i], counts.better[i], n, alpha), n


@dataclasses.dataclass(frozen=True)
class Certified:
    """One rule that passed: its measured risk, the bound that certified it (at level ``alpha``),
    its ideal speed-up, and the texts the bound used (half of them with a split)."""

    rule: ExitRule
    estimate: float
    upper_bound: float
    speedup: float
    risk: str
    alpha: float
    samples: int


def _chunks(speeds: Sequence[float]):
    for start in range(0, len(speeds), _CHUNK):
        yield speeds[start : start + _CHUNK]


def _walk(profile, rows, labels, family: ExitRule):
    """``(speed, exit layers [len(rows)], counts, i)`` for each speed of :data:`CERTIFY_SPEEDS` in
    order, computed a chunk at a time and only as far as the caller reads."""
    for speeds in _chunks(CERTIFY_SPEEDS):
        layers = profile.exit_layers_at(family, speeds, rows)
        counts = _counts(profile, rows, labels, layers)
        for i, speed in enumerate(speeds):
            yield speed, layers[i], counts, i


def fixed_sequence(
    profile, table, rows, labels, family: ExitRule, risk: str, epsilon: float, alpha: float
) -> Certified | None:
    """The most aggressive speed of ``family`` (a rule whose speed is replaced) that fixed-sequence
    testing certifies on ``rows``: tested in :data:`CERTIFY_SPEEDS` order, stopping at the first
    failure; None if the first fails. Exits only grow with the speed, so the most aggressive
    certified speed is also the fastest."""
    found = None  # (speed, estimate, bound, samples, exit layers)
    for speed, exit_layers, counts, i in _walk(profile, rows, labels, family):
        estimate, upper, n = _bound(counts, i, risk, alpha)
        if upper > epsilon:
            break
        found = (speed, estimate, upper, n, exit_layers)
    if found is None:
        return None
    speed, estimate, upper, n, exit_layers = found
    rule = family.replace(speed=speed)
    return Certified(rule, estimate, upper, table.speedup(exit_layers, rule, rows), risk, alpha, n)


def point_estimate_pick(profile, table, rows, labels, family: ExitRule, risk: str, epsilon: float) -> Certified | None:
    """The fastest speed of ``family`` whose measured risk on ``rows`` is within ``epsilon`` (the
    choosing half of a split: no guarantee by itself)."""
    best = None
    for speeds in _chunks(CERTIFY_SPEEDS):
        layers = profile.exit_layers_at(family, speeds, rows)
        counts = _counts(profile, rows, labels, layers)
        speedups = table.speedups(layers, family, speeds, rows).tolist()
        for i, speed in enumerate(speeds):
            estimate, n = _estimate(counts, i, risk)
            if estimate <= epsilon and (best is None or speedups[i] > best.speedup):
                best = Certified(family.replace(speed=speed), estimate, math.nan, speedups[i], risk, math.nan, n)
    return best


def certify(
    profile,
    table,
    labels: torch.Tensor | None,
    *,
    risks: Sequence[str],
    epsilon: float,
    delta: float,
    families: Sequence[ExitRule],
    family_selection: str = "bonferroni",
    seed: int = 0,
) -> tuple[Certified | None, dict[str, dict[ExitRule, Certified | None]]]:
    """The fastest certified rule over ``families`` for any of ``risks`` (``delta`` divided
    equally among the risks), and what each risk and family gave (for the report)."""
    if family_selection not in ("bonferroni", "split"):
        raise ValueError(f"family_selection must be 'bonferroni' or 'split', got {family_selection!r}")
    n = profile.num_samples
    everyone = torch.arange(n)
    per_risk = delta / len(risks)
    found: list[Certified] = []
    report: dict[str, dict[ExitRule, Certified | None]] = {}
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
                family = max(picks, key=lambda p: p.speedup).rule.replace(speed=0.0)
                results[family] = fixed_sequence(profile, table, test, labels, family, risk, epsilon, per_risk)
        report[risk] = results
        found += [r for r in results.values() if r is not None]
    best = max(found, key=lambda r: (r.speedup, -r.upper_bound), default=None)
    return best, report


def student_sets(num_layers: int) -> list[tuple[int, ...] | None]:
    """The student sets calibration tries by default, fixed before it sees data: every student
    (None), and the students from layer m on for m at about 1/6, 1/3, 1/2, 2/3 and 5/6 of the
    depth. Early students are the ones a cautious threshold rarely lets anyone leave at, so they
    are the ones that cost without paying."""
    last = num_layers - 1
    starts = sorted({max(2, round(num_layers * f)) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6)})
    return [None] + [tuple(range(m, last + 1)) for m in starts if m <= last]


def default_families(
    criteria=EXIT_CRITERIA,
    temperatures=(1.0, 0.5, 0.25),
    patiences=(1, 2, 3),
    students: Sequence[tuple[int, ...] | None] = (None,),
) -> list[ExitRule]:
    """Every (criterion, temperature, patience, students) combination, as rules at speed 0."""
    combinations = [(c, t, p, s) for c in criteria for t in temperatures for p in patiences for s in students]
    return [ExitRule(c, float(t), int(p), 0.0, s) for c, t, p, s in combinations]
