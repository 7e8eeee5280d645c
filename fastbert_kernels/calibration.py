"""Calibration: choosing the exit rule for a target, from one exit profile.

:func:`~fastbert_kernels.profile.exit_profile` runs every classifier on every sample once; the
exit layer, answer and ideal speed-up of any :class:`~fastbert_kernels.ExitRule` follow from it
without running the model again. :func:`calibrate` chooses the rule (criterion, temperature,
patience, speed and the students evaluated), certified by default (:mod:`.certification`);
:func:`choose_speed` picks only the speed of a fixed rule.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch

from . import certification
from .architectures import architecture_for
from .batching import make_batches
from .certification import Certificate
from .encoder import model_device
from .exit_rule import ExitRule
from .ops.types import EXIT_CRITERIA
from .profile import DEFAULT_TEMPERATURES, ExitProfile, FlopsTable, exit_profile, flops_speedup
from .state import DISTILLED_TEXTS_ATTR, fastbert_config

__all__ = [
    "DEFAULT_PATIENCES",
    "DEFAULT_TEMPERATURES",
    "Calibration",
    "ExitProfile",
    "ExitSetting",
    "FlopsTable",
    "calibrate",
    "check_labels",
    "choose_speed",
    "exit_profile",
    "flops_speedup",
    "sweep",
]

Batch = dict[str, torch.Tensor]

# Speeds every sweep tries: a uniform grid, to which the sweep adds quantiles of the students'
# uncertainties (many-class criteria crowd into a narrow band that a grid alone would step over).
SPEED_GRID = tuple(i / 200 for i in range(201))
SPEED_QUANTILES = 100
# Patiences that :func:`calibrate` tries by default (temperatures: DEFAULT_TEMPERATURES).
DEFAULT_PATIENCES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class ExitSetting:
    """One exit rule and what it does on the calibration data: accuracy (NaN without labels) and
    ideal speed-up (the layers and students each sample runs, FLOPs at its real length, against
    the full model)."""

    rule: ExitRule
    accuracy: float
    speedup: float

    def as_dict(self) -> dict:
        return {"rule": self.rule.as_dict(), "accuracy": self.accuracy, "speedup": self.speedup}


def sweep(
    profile: ExitProfile,
    labels: torch.Tensor,
    model,
    family: ExitRule | None = None,
    speeds: Sequence[float] | None = None,
    table: FlopsTable | None = None,
) -> list[ExitSetting]:
    """Accuracy and ideal speed-up of ``family`` (a rule whose speed is replaced; default: the
    default rule) at every speed (default: :data:`SPEED_GRID` plus quantiles of the students'
    uncertainties), by speed."""
    family = family or ExitRule()
    labels = labels.cpu()
    table = table or FlopsTable(model, profile.lengths)
    if speeds is None:
        u = profile.uncertainty(family.criterion, family.temperature)[:, :-1].flatten()
        u = u[~u.isnan()]
        quantiles = torch.quantile(u, torch.linspace(0, 1, SPEED_QUANTILES)).tolist() if u.numel() else []
        speeds = set(SPEED_GRID) | {round(q, 6) for q in quantiles}
    speeds = sorted(speeds)
    layers = profile.exit_layers_at(family, speeds)  # [S, N]
    answers = profile.prediction.gather(1, (layers - 1).T).T
    accuracies = (answers == labels[None, :]).float().mean(1).tolist()
    speedups = table.speedups(layers, family, speeds).tolist()
    return [
        ExitSetting(family.replace(speed=speed), accuracy, speedup)
        for speed, accuracy, speedup in zip(speeds, accuracies, speedups, strict=True)
    ]


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` found: the ``chosen`` setting, the teacher's accuracy on the same data
    (NaN without labels), every family's sweep (``curves``, point-estimate calibration only), per
    criterion its best setting for the same target (``best``), and the certificate (None:
    uncertified)."""

    chosen: ExitSetting
    teacher_accuracy: float
    best: dict[str, ExitSetting | None]
    curves: dict[ExitRule, list[ExitSetting]]
    certificate: Certificate | None = None

    @property
    def rule(self) -> ExitRule:
        return self.chosen.rule

    def apply(self, model) -> None:
        """Writes the chosen rule and the certificate into the model's FastBERT config (saved
        with it)."""
        self.rule.check_for(len(architecture_for(model).layers(model)))
        config = fastbert_config(model)
        config.exit_rule = self.rule
        config.certificate = None if self.certificate is None else self.certificate.as_dict()

    def table(self) -> str:
        """The best setting per criterion, as a Markdown table."""
        lines = [
            "| criterion | temperature | patience | students | speed | accuracy | ideal speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for criterion, best in self.best.items():
            if best is None:
                lines.append(f"| {criterion} | - | - | - | - | no setting meets the target | - |")
                continue
            rule = best.rule
            mark = " (chosen)" if rule == self.rule else ""
            accuracy = "-" if math.isnan(best.accuracy) else f"{100 * best.accuracy:.2f}%"
            students = "all" if rule.students is None else ",".join(map(str, rule.students)) or "none"
            lines.append(
                f"| {criterion}{mark} | {rule.temperature:g} | {rule.patience} | {students} | {rule.speed:.4f} | "
                f"{accuracy} | {best.speedup:.2f}x |"
            )
        return "\n".join(lines)


def _best(
    settings: list[ExitSetting], teacher_accuracy: float, max_accuracy_drop: float | None, min_speedup: float | None
) -> ExitSetting | None:
    if max_accuracy_drop is not None:
        ok = [s for s in settings if s.accuracy >= teacher_accuracy - max_accuracy_drop]
        # The fastest; among equals the most accurate, then the lowest speed (the safest margin).
        return max(ok, key=lambda s: (round(s.speedup, 9), s.accuracy, -s.rule.speed), default=None)
    ok = [s for s in settings if s.speedup >= min_speedup]
    return max(ok, key=lambda s: (s.accuracy, round(s.speedup, 9), -s.rule.speed), default=None)


def _check_target(max_accuracy_drop: float | None, min_speedup: float | None) -> None:
    if (max_accuracy_drop is None) == (min_speedup is None):
        raise ValueError("give exactly one of max_accuracy_drop or min_speedup")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    if min_speedup is not None and min_speedup <= 0:
        raise ValueError(f"min_speedup must be positive, got {min_speedup}")


def check_labels(labels, profile: ExitProfile) -> torch.Tensor:
    """``labels`` as an int64 CPU tensor ``[N]``, one class in ``[0, C)`` per profiled sample; a
    ``ValueError``/``TypeError`` that names the problem otherwise (a rule fitted to labels that
    cannot be right, an ignore index of -100 say, would be written into the config)."""
    labels = torch.as_tensor(labels).cpu()
    n, num_classes = profile.num_samples, profile.num_classes
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}] (one per profiled sample), got {list(labels.shape)}")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{int(bad.sum())} labels are not classes of [0, {num_classes}); the first is labels[{first}] = "
            f"{int(labels[first])}"
        )
    return labels.long()


def _profile_of(model, data, tokenizer, batch_size: int, max_length: int, temperatures) -> ExitProfile:
    """An :class:`ExitProfile` of ``data``: one already, texts (with ``tokenizer``) or batches."""
    if isinstance(data, ExitProfile):
        return data
    if isinstance(data, (str, bytes)):
        raise TypeError("calibration data must be a list of texts, a list of batches or an ExitProfile")
    data = list(data)
    if not data:
        raise ValueError("calibration needs at least one text")
    if all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise TypeError("texts need a tokenizer: calibrate(model, texts, tokenizer, ...)")
        _warn_if_distilled_on(model, data)
        batches = make_batches(tokenizer, data, batch_size, max_length, model_device(model))
        return exit_profile(model, batches, temperatures=temperatures)
    if all(isinstance(b, dict) for b in data):
        return exit_profile(model, data, temperatures=temperatures)
    raise TypeError("calibration data must be a list of texts, a list of batches or an ExitProfile")


def _warn_if_distilled_on(model, texts: list[str]) -> None:
    """Texts the students were distilled on agree with the teacher more than new ones: calibrating
    on them makes the certificate optimistic. :func:`fastbert_kernels.distill` remembers (in this
    process) the hashes of the texts it saw."""
    seen = getattr(model, DISTILLED_TEXTS_ATTR, None)
    if not seen:
        return
    overlap = sum(hash(t) in seen for t in texts)
    if overlap:
        warnings.warn(
            f"{overlap} of the {len(texts)} calibration texts were used to distil the students; their "
            "agreement with the teacher is optimistic, so the certificate may not hold on new text: "
            "calibrate on texts kept out of distillation",
            stacklevel=4,
        )


def _student_sets(model, student_sets) -> list[tuple[int, ...] | None]:
    num_layers = len(architecture_for(model).layers(model))
    if student_sets == "auto":
        return certification.student_sets(num_layers)
    if student_sets == "all":
        return [None]
    rules = [ExitRule(students=s) for s in student_sets]  # each set checked as a rule's would be
    if not rules:
        raise ValueError("student_sets must name at least one set of students")
    for rule in rules:
        rule.check_for(num_layers)
    return [rule.students for rule in rules]


def calibrate(
    model,
    data,
    tokenizer=None,
    *,
    labels=None,
    unlabelled=None,
    max_disagreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    delta: float = 0.05,
    certified: bool = True,
    family_selection: str = "bonferroni",
    drop_bound: str = "betting",
    criteria: Sequence[str] = EXIT_CRITERIA,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    patiences: Sequence[int] = DEFAULT_PATIENCES,
    student_sets="auto",
    batch_size: int = 64,
    max_length: int = 128,
    apply: bool = True,
) -> Calibration:
    """Chooses the exit rule (criterion, temperature, patience, speed and the students evaluated),
    by default with a certificate (:mod:`.certification`): with probability at least ``1 - delta``
    over the calibration sample, the chosen rule's risk on new exchangeable data is within the
    target.

    ``data``: unlabelled texts (with ``tokenizer``), tokenised batches, or an :class:`ExitProfile`.
    Keep them out of distillation (see :mod:`.certification`). Targets (exactly one):

    * ``max_disagreement=e`` (no labels): the share of answers that differ from the full model's
      is at most ``e``. It bounds the accuracy drop too.
    * ``max_accuracy_drop=d`` (``labels``, one per text of ``data``): the accuracy drop against
      the full model is at most ``d``, certified through the disagreement or the drop itself,
      whichever gives the faster rule. ``unlabelled`` texts (or batches, or a profile) join the
      disagreement route and tighten its bound.
    * ``min_speedup=s`` (``labels``, uncertified): the most accurate rule whose ideal speed-up is at
      least ``s``. ``certified=False`` makes the other targets point estimates too (the fastest
      rule that looks within budget on this sample: no guarantee off it).

    ``drop_bound``: how the labelled accuracy drop is bounded: ``"betting"`` (a betting
    confidence bound that adapts to the drop's small variance; the default, the tighter one
    measured) or ``"clopper-pearson"`` (the difference of two exact binomial bounds).

    ``student_sets``: which sets of students to try: ``"auto"`` (every student, and the students
    from about 1/6, 1/3, 1/2, 2/3 and 5/6 of the depth on; each set is one more family sharing
    ``delta``), ``"all"``, or a list of sets of 1-based layers (None: every student). A rule
    whose ideal speed-up does not exceed 1 (its students cost more than its exits save) is not
    returned: speed 0 is faster and exact.

    The fastest certified rule is returned with its :class:`.certification.Certificate` and, with
    ``apply``, written with it into the model's config (saved with the checkpoint). Raises
    ``ValueError`` when nothing certifies, saying how many texts the best candidate would need.
    """
    targets = [t for t in (max_disagreement, max_accuracy_drop, min_speedup) if t is not None]
    if len(targets) != 1:
        raise ValueError("give exactly one of max_disagreement, max_accuracy_drop or min_speedup")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    profile = _profile_of(model, data, tokenizer, batch_size, max_length, temperatures)
    labels = None if labels is None else check_labels(labels, profile)
    if (max_accuracy_drop is not None or min_speedup is not None) and labels is None:
        raise ValueError(
            "max_accuracy_drop and min_speedup need labels=...; without labels use max_disagreement, "
            "which bounds the accuracy drop from above"
        )
    sets = _student_sets(model, student_sets)
    families = certification.default_families(criteria, temperatures, patiences, sets)
    if min_speedup is not None or not certified:
        if max_disagreement is not None:
            raise ValueError("max_disagreement is certified only: use certified=True")
        if unlabelled is not None:
            raise ValueError("unlabelled texts serve the certified disagreement bound only: use certified=True")
        return _point_estimate_calibration(model, profile, labels, max_accuracy_drop, min_speedup, families, apply)
    epsilon = max_disagreement if max_disagreement is not None else max_accuracy_drop
    if not 0 < epsilon < 1:
        raise ValueError(f"the target must be in (0, 1), got {epsilon}")
    labelled_count = profile.num_samples
    if unlabelled is not None:
        extra = _profile_of(model, unlabelled, tokenizer, batch_size, max_length, temperatures)
        profile = ExitProfile.concat([profile, extra])
        if labels is not None:  # -1: no label, counted for the disagreement only
            labels = torch.cat([labels, torch.full((extra.num_samples,), -1, dtype=torch.long)])
    risks = ["disagreement"] if max_disagreement is not None else ["disagreement", "accuracy_drop"]
    table = FlopsTable(model, profile.lengths)
    found, report = certification.certify(
        profile, table, labels, risks=risks, epsilon=epsilon, delta=delta, families=families,
        family_selection=family_selection, drop_bound=drop_bound,
    )  # fmt: skip
    if found is None:
        raise ValueError(_nothing_certifies(profile, families, epsilon, delta / len(risks) / len(families)))
    if found.speedup <= 1.0:  # speed 0 (no student at all) is then both safe and faster
        raise ValueError(
            f"no certified exit rule pays for its students on these {profile.num_samples} texts (the fastest "
            f"certified one, {found.rule.describe()}, gives {found.speedup:.3f}x ideal); keep speed 0, or "
            "calibrate on more texts or with a larger target"
        )
    labelled = None if labels is None else labels[:labelled_count]

    def accuracy_of(rule: ExitRule) -> float:
        if labelled is None:
            return math.nan
        return float((profile.predictions(rule)[:labelled_count] == labelled).float().mean())

    teacher_accuracy = (
        math.nan if labelled is None else float((profile.full_answers[:labelled_count] == labelled).float().mean())
    )
    best: dict[str, ExitSetting | None] = {}
    for criterion in criteria:
        mine = [r for results in report.values() for r in results.values() if r and r.rule.criterion == criterion]
        top = max(mine, key=lambda r: r.speedup, default=None)
        best[criterion] = None if top is None else ExitSetting(top.rule, accuracy_of(top.rule), top.speedup)
    certificate = certification.Certificate(
        risk=found.risk if max_disagreement is not None else "accuracy_drop",
        epsilon=epsilon,
        delta=delta,
        samples=found.samples,
        estimate=found.estimate,
        upper_bound=found.upper_bound,
        bound=certification.bound_name(found.risk, drop_bound),
        alpha=found.alpha,
        families=len(families),
        family_selection=family_selection,
        ideal_speedup=found.speedup,
    )
    chosen = ExitSetting(found.rule, accuracy_of(found.rule), found.speedup)
    result = Calibration(chosen, teacher_accuracy, best, {}, certificate)
    if apply:
        result.apply(model)
    return result


def _nothing_certifies(profile: ExitProfile, families: Sequence[ExitRule], epsilon: float, alpha: float) -> str:
    """The error when no speed certifies: for each family's gentlest exiting speed, its observed
    disagreement, and the fewest texts at which that rate would have certified."""
    best_rate, needed = None, None
    for family in families:
        predictions = profile.predictions(family.replace(speed=certification.CERTIFY_SPEEDS[0]))
        rate = float((predictions != profile.full_answers).float().mean())
        count = certification.required_samples(rate, epsilon, alpha)
        if count is not None and (needed is None or count < needed):
            best_rate, needed = rate, count
    advice = (
        f"at the observed disagreement of {best_rate:.4f}, about {needed} texts would certify it"
        if needed is not None
        else "even the gentlest rule disagrees with the full model more often than the target allows"
    )
    return f"no exit rule certifies risk <= {epsilon:g} on these {profile.num_samples} texts; {advice}"


def _point_estimate_calibration(
    model, profile: ExitProfile, labels, max_accuracy_drop, min_speedup, families: Sequence[ExitRule], apply: bool
) -> Calibration:
    """The uncertified sweep: every family at every speed, the fastest (or most accurate) setting
    whose point estimate meets the target."""
    _check_target(max_accuracy_drop, min_speedup)
    teacher_accuracy = float((profile.full_answers == labels).float().mean())
    table = FlopsTable(model, profile.lengths)
    curves = {family: sweep(profile, labels, model, family, table=table) for family in families}
    best: dict[str, ExitSetting | None] = {}
    for criterion in dict.fromkeys(f.criterion for f in families):
        settings = [s for family, curve in curves.items() if family.criterion == criterion for s in curve]
        best[criterion] = _best(settings, teacher_accuracy, max_accuracy_drop, min_speedup)
    found = [s for s in best.values() if s is not None]
    if not found:
        fastest = max(s.speedup for curve in curves.values() for s in curve)
        raise ValueError(f"no exit rule reaches the target on this data (the fastest gives {fastest:.2f}x)")
    chosen = _best(found, teacher_accuracy, max_accuracy_drop, min_speedup)
    result = Calibration(chosen, teacher_accuracy, best, curves)
    if apply:
        result.apply(model)
    return result


def choose_speed(
    profile: ExitProfile,
    labels: torch.Tensor,
    model,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    speeds: Sequence[float] | None = None,
    rule: ExitRule | None = None,
) -> tuple[float, dict[str, float]]:
    """Picks only the speed of ``rule`` (its speed is replaced; default: the default rule), on a
    validation set, from its :class:`ExitProfile`:

    * ``max_accuracy_drop=d``: the largest speed whose accuracy is at least teacher accuracy - d;
    * ``min_speedup=s``: the smallest speed whose ideal speed-up (layer and branch work, FLOPs at the
      real lengths) reaches s.
    Returns the speed and its accuracy / speed-up. Raises if no speed meets the target.
    """
    _check_target(max_accuracy_drop, min_speedup)
    labels = check_labels(labels, profile)
    teacher_accuracy = float((profile.full_answers == labels).float().mean())
    table = sweep(profile, labels, model, rule, speeds or SPEED_GRID)
    if max_accuracy_drop is not None:
        ok = [row for row in table if row.accuracy >= teacher_accuracy - max_accuracy_drop]
        if not ok:
            raise ValueError(f"no speed keeps accuracy within {max_accuracy_drop} of the teacher (include speed 0)")
        chosen = max(ok, key=lambda row: row.rule.speed)
    else:
        ok = [row for row in table if row.speedup >= min_speedup]
        if not ok:
            best = max(row.speedup for row in table)
            raise ValueError(f"no speed reaches a {min_speedup}x speed-up on this data (best {best:.2f}x)")
        chosen = min(ok, key=lambda row: row.rule.speed)
    stats = {"accuracy": chosen.accuracy, "speedup": chosen.speedup, "teacher_accuracy": teacher_accuracy}
    return chosen.rule.speed, stats
