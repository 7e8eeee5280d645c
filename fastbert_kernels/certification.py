"""Certified calibration: an exit rule whose risk is bounded with probability ``1 - delta``.

A rule chosen by its point estimate on one validation sample selects for luck: among thousands of
settings, the fastest that *looks* within budget is often just over it on new data. Here, as in
CALM (Schuster et al., 2022) with Learn-then-Test (Angelopoulos et al., 2021):

* **Risks.** ``disagreement``: the share of samples whose early answer differs from the full
  model's. It needs no labels, and it bounds the accuracy drop from above (a sample can only lose
  accuracy by disagreeing). ``accuracy_drop`` (labels): the mean of
  ``d_i = 1[early wrong] - 1[full wrong]`` in ``{-1, 0, 1}``.
* **Bounds**, each an upper confidence bound valid at level ``alpha`` for any sample size:
  the disagreement's exact binomial (Clopper-Pearson) bound on ``k`` of ``n``. The accuracy drop's
  by default is a betting bound (Waudby-Smith and Ramdas, 2024): a gambler bets against
  ``mean(d) >= epsilon`` on each sample in turn (in a fixed shuffled order), with a stake sized by
  the running variance, and the hypothesis is rejected when the wealth reaches ``1 / alpha``
  (Ville's inequality makes that a level-``alpha`` test at any stopping time). It adapts to the
  variance of ``d``, ``P(discordant) - drop^2``, where the alternative
  (``drop_bound="clopper-pearson"``: the upper bound of the share ``a`` that the early answer loses
  minus the lower bound of the share ``b`` it wins, each at ``alpha / 2``) pays for two rates
  separately. Measured on simulated outcomes (``benchmarks/compare_bounds.py``) the betting bound is
  10-25% tighter wherever the early answers both lose and win, which is where the labelled route
  can beat the disagreement; the difference of two exact bounds is tighter only when nothing is
  won (there the disagreement's own bound, which the labelled target also tries, is tighter still).
  Hoeffding-type bounds on ``[-1, 1]`` are several times looser
  (:func:`empirical_bernstein_upper_bound` is kept for that comparison).
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


@functools.lru_cache(maxsize=4096)
def most_certified_count(n: int, alpha: float, epsilon: float) -> int:
    """The most disagreements of ``n`` whose Clopper-Pearson bound at ``alpha`` is still at most
    ``epsilon`` (-1: even none certifies). The bound grows with the count, so bisection finds it."""
    if binomial_upper_bound(0, n, alpha) > epsilon:
        return -1
    low, high = 0, n  # the bound passes at low; high may fail
    while low < high:
        mid = (low + high + 1) // 2
        if binomial_upper_bound(mid, n, alpha) <= epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def binomial_lower_bound(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson lower bound: ``1 - upper bound`` of the complement count."""
    return 0.0 if k == 0 else 1.0 - binomial_upper_bound(n - k, n, alpha)


def accuracy_drop_upper_bound(worse: int, better: int, n: int, alpha: float) -> float:
    """Upper confidence bound at level ``alpha`` of ``P(early wrong, full right) - P(early right,
    full wrong)`` from ``worse`` and ``better`` counts of ``n``: Bonferroni over two exact bounds."""
    return binomial_upper_bound(worse, n, alpha / 2) - binomial_lower_bound(better, n, alpha / 2)


# Largest stake of the betting bound: wealth factors 1 + stake * (m - y) stay positive for every
# y in [0, 1] and every m >= 1/2 (a drop >= 0) while the stake is below 2; 0.75 of that, as in
# Waudby-Smith and Ramdas, keeps a single worse sample from costing most of the wealth.
_MAX_STAKE = 1.5
DROP_BOUNDS: tuple[str, ...] = ("betting", "clopper-pearson")


def _betting_stakes(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Predictable plug-in stakes ``[S, n]`` for outcomes ``y [S, n]`` in [0, 1] (Waudby-Smith and
    Ramdas, fixed-n form): ``stake_t = min(1.5, sqrt(2 log(1/alpha) / (n var_{t-1})))``, with the
    running variance ``var_t = (1/4 + sum_{i<=t} (y_i - mean_i)^2) / (t + 1)`` and
    ``mean_t = (1/2 + sum_{i<=t} y_i) / (t + 1)``. Each stake uses only earlier samples, which is
    what makes the wealth a supermartingale under the null."""
    rows, n = y.shape
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mean = (0.5 + y.cumsum(1)) / (t + 1)
    variance = (0.25 + ((y - mean) ** 2).cumsum(1)) / (t + 1)
    previous = torch.cat([torch.full((rows, 1), 0.25, dtype=torch.float64), variance[:, :-1]], 1)
    return torch.sqrt(2 * math.log(1 / alpha) / (n * previous)).clamp(max=_MAX_STAKE)


def _betting_rejects(y: torch.Tensor, stakes: torch.Tensor, m: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[S]``: whether the wealth ``prod_t (1 + stake_t (m - y_t))`` of betting against
    ``mean(y) >= m`` reaches ``1 / alpha`` at some t. ``m [S, 1]``, at least 1/2."""
    wealth = torch.log1p(stakes * (m - y)).cumsum(1)
    return wealth.max(1).values >= math.log(1 / alpha)


def _as_outcomes(drops: torch.Tensor) -> torch.Tensor:
    """Drops ``[S, n]`` in [-1, 1] mapped to [0, 1], in a fixed shuffled order: the bet must not
    see samples in an order that depends on them (a file sorted by class, say)."""
    n = drops.shape[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return (drops.double()[:, order] + 1) / 2


def betting_drop_rejects(drops: torch.Tensor, epsilon: float, alpha: float) -> torch.Tensor:
    """``[S]``: the level-``alpha`` test that the mean of each row of ``drops [S, n]`` (values in
    [-1, 1]) is below ``epsilon`` (> 0), by betting. What fixed-sequence testing asks at each speed."""
    y = _as_outcomes(drops)
    m = torch.full((y.shape[0], 1), (epsilon + 1) / 2, dtype=torch.float64)
    return _betting_rejects(y, _betting_stakes(y, alpha), m, alpha)


def betting_drop_upper_bound(drops: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[S]``: upper confidence bounds at level ``alpha`` on the mean of each row of
    ``drops [S, n]``, by inverting the betting test (the wealth grows with ``m``, because the stakes
    do not depend on it, so bisection finds the smallest rejected ``m``). Floored at 0: a drop
    bounded below 0 is reported as 0."""
    y = _as_outcomes(drops)
    stakes = _betting_stakes(y, alpha)
    low = torch.full((y.shape[0],), 0.5, dtype=torch.float64)
    high = torch.ones_like(low)
    for _ in range(40):
        mid = (low + high) / 2
        rejected = _betting_rejects(y, stakes, mid[:, None], alpha)
        high, low = torch.where(rejected, mid, high), torch.where(rejected, low, mid)
    return 2 * high - 1


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
    one right) and ``better [S]`` of the ``labelled`` ones, and the per-sample drops
    ``[S, labelled]`` (+1 worse, -1 better, 0 otherwise) that the betting bound reads."""

    disagree: list[int]
    worse: list[int] | None
    better: list[int] | None
    drops: torch.Tensor | None
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
        return _Counts(disagree, None, None, None, len(rows), 0)
    truth = labels[rows]
    labelled = truth >= 0
    early, full, truth = early[:, labelled], full[labelled], truth[labelled]
    drops = (early != truth).to(torch.int8) - (full != truth).to(torch.int8)  # [S, labelled]
    worse = (drops > 0).sum(1).tolist()
    better = (drops < 0).sum(1).tolist()
    return _Counts(disagree, worse, better, drops, len(rows), int(labelled.sum()))


def _estimate(counts: _Counts, i: int, risk: str) -> tuple[float, int]:
    """(measured risk, samples it used) at the i-th speed."""
    if risk == "disagreement":
        return counts.disagree[i] / max(counts.samples, 1), counts.samples
    return (counts.worse[i] - counts.better[i]) / max(counts.labelled, 1), counts.labelled


def _passes(counts: _Counts, risk: str, epsilon: float, alpha: float, drop_bound: str) -> list[bool]:
    """Whether each of the S speeds passes its level-``alpha`` test of ``risk <= epsilon``."""
    if risk == "disagreement":
        most = most_certified_count(counts.samples, alpha, epsilon)
        return [k <= most for k in counts.disagree]
    if counts.labelled == 0:
        return [False] * len(counts.worse)
    if drop_bound == "betting":
        return betting_drop_rejects(counts.drops, epsilon, alpha).tolist()
    return [
        accuracy_drop_upper_bound(w, b, counts.labelled, alpha) <= epsilon
        for w, b in zip(counts.worse, counts.better, strict=True)
    ]


def _upper_bound(counts: _Counts, i: int, risk: str, alpha: float, drop_bound: str) -> float:
    """The upper confidence bound at level ``alpha`` of ``risk`` at the i-th speed (for the
    certificate: the test at ``epsilon`` decided, this says by how much it passed)."""
    if risk == "disagreement":
        return binomial_upper_bound(counts.disagree[i], counts.samples, alpha)
    if drop_bound == "betting":
        return float(betting_drop_upper_bound(counts.drops[i : i + 1], alpha)[0])
    return accuracy_drop_upper_bound(counts.worse[i], counts.better[i], counts.labelled, alpha)


def bound_name(risk: str, drop_bound: str = "betting") -> str:
    """How a certificate names the bound that certified ``risk``."""
    if risk == "disagreement":
        return "Clopper-Pearson"
    return "betting (Waudby-Smith-Ramdas)" if drop_bound == "betting" else "Clopper-Pearson difference"


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


def fixed_sequence(
    profile,
    table,
    rows,
    labels,
    family: ExitRule,
    risk: str,
    epsilon: float,
    alpha: float,
    drop_bound: str = "betting",
) -> Certified | None:
    """The most aggressive speed of ``family`` (a rule whose speed is replaced) that fixed-sequence
    testing certifies on ``rows``: tested in :data:`CERTIFY_SPEEDS` order, a chunk of speeds at a
    time, stopping at the first failure; None if the first fails. Exits only grow with the speed,
    so the most aggressive certified speed is also the fastest."""
    last = None  # (speed, counts, index in its chunk, exit layers) of the last speed that passed
    for speeds in _chunks(CERTIFY_SPEEDS):
        layers = profile.exit_layers_at(family, speeds, rows)
        counts = _counts(profile, rows, labels, layers)
        passed = _passes(counts, risk, epsilon, alpha, drop_bound)
        through = passed.index(False) if False in passed else len(passed)  # speeds before the first failure
        if through:
            last = (speeds[through - 1], counts, through - 1, layers[through - 1])
        if through < len(passed):
            break
    if last is None:
        return None
    speed, counts, i, exit_layers = last
    estimate, n = _estimate(counts, i, risk)
    upper = _upper_bound(counts, i, risk, alpha, drop_bound)
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
    drop_bound: str = "betting",
    seed: int = 0,
) -> tuple[Certified | None, dict[str, dict[ExitRule, Certified | None]]]:
    """The fastest certified rule over ``families`` for any of ``risks`` (``delta`` divided
    equally among the risks), and what each risk and family gave (for the report).
    ``drop_bound``: the accuracy drop's bound, ``"betting"`` or ``"clopper-pearson"``."""
    if family_selection not in ("bonferroni", "split"):
        raise ValueError(f"family_selection must be 'bonferroni' or 'split', got {family_selection!r}")
    if drop_bound not in DROP_BOUNDS:
        raise ValueError(f"drop_bound must be one of {DROP_BOUNDS}, got {drop_bound!r}")
    n = profile.num_samples
    everyone = torch.arange(n)
    per_risk = delta / len(risks)
    found: list[Certified] = []
    report: dict[str, dict[ExitRule, Certified | None]] = {}
    for risk in risks:
        if family_selection == "bonferroni":
            alpha = per_risk / len(families)
            results = {
                f: fixed_sequence(profile, table, everyone, labels, f, risk, epsilon, alpha, drop_bound)
                for f in families
            }
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            choose, test = order[: n // 2], order[n // 2 :]
            picks = [point_estimate_pick(profile, table, choose, labels, f, risk, epsilon) for f in families]
            picks = [p for p in picks if p is not None]
            results = {}
            if picks:
                family = max(picks, key=lambda p: p.speedup).rule.replace(speed=0.0)
                results[family] = fixed_sequence(
                    profile, table, test, labels, family, risk, epsilon, per_risk, drop_bound
                )
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
