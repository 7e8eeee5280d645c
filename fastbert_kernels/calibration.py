"""Calibration: what every exit rule would do on a validation set, from one pass.

:func:`exit_profile` runs every classifier on every sample once and keeps their logits. Each
sample's exit depends on its own logits only, so the exit layer, accuracy and ideal speed-up of any
exit rule (criterion, temperature, patience, speed) follow exactly (:class:`ExitProfile`), without
running the model again. :func:`calibrate` sweeps them and picks the rule for a target;
:func:`choose_speed` picks only the speed for a fixed rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence

import torch

from . import flops
from .architectures import architecture_for
from .batching import make_batches
from .certification import Certificate
from .encoder import all_layer_states, embed, model_device
from .modeling import teacher_logits
from .ops.reference import uncertainty as criterion_uncertainty
from .ops.reference import update_streak
from .ops.types import EXIT_CRITERIA, check_exit_rule
from .state import DISTILLED_TEXTS_ATTR, fastbert_config, students

Batch = dict[str, torch.Tensor]

# Speeds every sweep tries: a uniform grid, to which the sweep adds quantiles of the students'
# uncertainties (many-class criteria crowd into a narrow band that a grid alone would step over).
SPEED_GRID = tuple(i / 200 for i in range(201))
SPEED_QUANTILES = 100
# Temperatures and patiences that :func:`calibrate` tries by default.
DEFAULT_TEMPERATURES = (1.0, 0.5, 0.25)
DEFAULT_PATIENCES = (1, 2, 3)


@dataclasses.dataclass
class ExitProfile:
    """Every classifier's logits for every sample, from one full pass: ``logits [N, L, C]`` float32
    (column L-1 is the teacher), ``lengths [N]`` real tokens, ``padded [N]`` the padded length of
    the batch each sample ran in.

    Because exits are decided per sample, the exit layer under any rule follows exactly: the first
    student at which the sample has been confident (uncertainty < speed) and in agreement for
    ``patience`` students in a row, else L (:meth:`exit_layers`)."""

    logits: torch.Tensor
    lengths: torch.Tensor
    padded: torch.Tensor

    def __post_init__(self) -> None:
        self._uncertainty: dict[tuple[str, float], torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    @functools.cached_property
    def prediction(self) -> torch.Tensor:
        """``[N, L]`` every classifier's argmax."""
        return self.logits.argmax(-1)

    def uncertainty(self, criterion: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
        """``[N, L]`` every classifier's uncertainty under ``criterion`` at ``temperature``."""
        key = (criterion, float(temperature))
        if key not in self._uncertainty:
            n, layers, c = self.logits.shape
            flat = criterion_uncertainty(self.logits.reshape(n * layers, c), criterion, temperature)
            self._uncertainty[key] = flat.view(n, layers)
        return self._uncertainty[key]

    def exit_layers(
        self, speed: float, criterion: str = "entropy", temperature: float = 1.0, patience: int = 1
    ) -> torch.Tensor:
        """``[N]`` int64, the 1-based layer each sample leaves after under this rule (L: the teacher)."""
        u = self.uncertainty(criterion, temperature)
        layer = torch.full((u.shape[0],), self.num_layers, dtype=torch.int64)
        if patience == 1:  # the first confident student: no state to carry
            below = u[:, :-1] < speed
            return torch.where(below.any(1), below.float().argmax(1) + 1, layer)
        streak = None
        for i in range(self.num_layers - 1):
            exits, streak = update_streak(self.prediction[:, i], u[:, i], speed, patience, streak)
            layer = torch.where(exits & (layer == self.num_layers), i + 1, layer)
        return layer

    def predictions(
        self, speed: float, criterion: str = "entropy", temperature: float = 1.0, patience: int = 1
    ) -> torch.Tensor:
        """``[N]`` the class each sample is answered with under this rule."""
        layer = self.exit_layers(speed, criterion, temperature, patience)
        return self.prediction.gather(1, (layer - 1)[:, None]).squeeze(1)


@torch.no_grad()
def exit_profile(model, batches: list[Batch]) -> ExitProfile:
    """One full pass with every branch evaluated (reference math), keeping every logit."""
    arch = architecture_for(model)
    logits, lengths, padded = [], [], []
    for b in batches:
        inputs = embed(model, arch, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"))
        states = all_layer_states(model, arch, inputs)
        layer_logits = [s(states[i], inputs.mask).float() for i, s in enumerate(students(model))]
        layer_logits.append(teacher_logits(model, arch, states[-1], inputs.mask).float())
        logits.append(torch.stack(layer_logits, 1).cpu())
        lengths.append(inputs.mask.sum(1).cpu())
        padded.append(torch.full((inputs.mask.shape[0],), inputs.mask.shape[1]))
    return ExitProfile(torch.cat(logits), torch.cat(lengths), torch.cat(padded))


class FlopsTable:
    """The FLOPs of every sample of a profile at every exit layer, so that the ideal speed-up of
    an exit rule is one gather: ``full [N]``, and ``adaptive [L, N]`` with or without the branches
    (speed 0 runs none)."""

    def __init__(self, model, seq_lengths: torch.Tensor, with_branches: bool = True, fused: bool = False) -> None:
        self._config, self._settings = model.config, fastbert_config(model)
        self._seqs, self._fused = seq_lengths.tolist(), fused
        c = self._config
        self.full = torch.tensor(
            [
                flops.model_flops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, s, c.num_labels)
                for s in self._seqs
            ],
            dtype=torch.float64,
        )
        self._adaptive = {with_branches: self._table(with_branches)}

    def _table(self, with_branches: bool) -> torch.Tensor:
        c, settings = self._config, self._settings
        return torch.tensor(
            [
                [
                    flops.adaptive_flops(
                        layer,
                        c.num_hidden_layers,
                        c.hidden_size,
                        c.intermediate_size,
                        s,
                        c.num_labels,
                        settings.branch_size,
                        with_branches,
                        self._fused,
                        settings.branch_heads,
                    )
                    for s in self._seqs
                ]
                for layer in range(1, c.num_hidden_layers + 1)
            ],
            dtype=torch.float64,
        )

    def speedup_of(self, exit_layers: torch.Tensor, rows: torch.Tensor) -> float:
        """:meth:`speedup` of the samples ``rows`` alone, leaving after ``exit_layers [len(rows)]``."""
        spent = self._adaptive_table(True)[:, rows].gather(0, (exit_layers - 1)[None, :]).sum()
        return float(self.full[rows].sum() / spent)

    def _adaptive_table(self, with_branches: bool) -> torch.Tensor:
        if with_branches not in self._adaptive:
            self._adaptive[with_branches] = self._table(with_branches)
        return self._adaptive[with_branches]

    def speedup(self, exit_layers: torch.Tensor, with_branches: bool = True) -> float:
        """Full FLOPs / adaptive FLOPs when the samples leave after ``exit_layers [N]`` (1-based)."""
        spent = self._adaptive_table(with_branches).gather(0, (exit_layers - 1)[None, :]).sum()
        return float(self.full.sum() / spent)


def flops_speedup(
    model, exit_layers: torch.Tensor, seq_lengths: torch.Tensor, with_branches: bool = True, fused: bool = False
) -> float:
    """Full model FLOPs / adaptive FLOPs, each sample at ``seq_lengths`` tokens; branches counted as
    the paper does, or (``fused``) as the fused kernel runs them; ``with_branches=False`` for speed
    0, where no branch runs."""
    return FlopsTable(model, seq_lengths, with_branches, fused).speedup(exit_layers, with_branches)


@dataclasses.dataclass(frozen=True)
class ExitSetting:
    """One exit rule and what it does on the calibration data: accuracy and ideal speed-up (the
    layers and branches each sample runs, FLOPs at its real length, against the full model)."""

    criterion: str
    temperature: float
    patience: int
    speed: float
    accuracy: float
    speedup: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sweep(
    profile: ExitProfile,
    labels: torch.Tensor,
    model,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    speeds: Sequence[float] | None = None,
    table: FlopsTable | None = None,
) -> list[ExitSetting]:
    """Accuracy and ideal speed-up of one rule at every speed (default: :data:`SPEED_GRID` plus
    quantiles of the students' uncertainties), sorted by speed."""
    check_exit_rule(criterion, temperature, patience)
    labels = labels.cpu()
    table = table or FlopsTable(model, profile.lengths)
    if speeds is None:
        u = profile.uncertainty(criterion, temperature)[:, :-1].flatten()
        quantiles = torch.quantile(u, torch.linspace(0, 1, SPEED_QUANTILES)).tolist() if u.numel() else []
        speeds = set(SPEED_GRID) | {round(q, 6) for q in quantiles}
    rows = []
    for speed in sorted(speeds):
        layers = profile.exit_layers(speed, criterion, temperature, patience)
        predicted = profile.prediction.gather(1, (layers - 1)[:, None]).squeeze(1)
        accuracy = float((predicted == labels).float().mean())
        # Speed 0 runs no branch at all (the unpatched computation).
        speedup = table.speedup(layers, with_branches=speed > 0)
        rows.append(ExitSetting(criterion, float(temperature), patience, float(speed), accuracy, speedup))
    return rows


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` found: the ``chosen`` rule, the teacher's accuracy on the same data,
    every rule's sweep (``curves``, keyed by ``(criterion, temperature, patience)``) and, per
    criterion, its best setting for the same target (``best``)."""

    chosen: ExitSetting
    teacher_accuracy: float
    best: dict[str, ExitSetting | None]
    curves: dict[tuple[str, float, int], list[ExitSetting]]
    certificate: Certificate | None = None

    def apply(self, model) -> None:
        """Writes the chosen rule and speed, and the certificate (None: uncertified), into the
        model's FastBERT config (saved with it)."""
        config = fastbert_config(model)
        config.exit_criterion = self.chosen.criterion
        config.exit_temperature = self.chosen.temperature
        config.exit_patience = self.chosen.patience
        config.default_speed = self.chosen.speed
        config.certificate = None if self.certificate is None else self.certificate.as_dict()

    def table(self) -> str:
        """The best setting per criterion, as a Markdown table."""
        lines = [
            "| criterion | temperature | patience | speed | accuracy | ideal speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for criterion, best in self.best.items():
            if best is None:
                lines.append(f"| {criterion} | - | - | - | no setting meets the target | - |")
            else:
                same = dataclasses.astuple(best)[:4] == dataclasses.astuple(self.chosen)[:4]
                mark = " (chosen)" if same else ""
                accuracy = "-" if math.isnan(best.accuracy) else f"{100 * best.accuracy:.2f}%"
                lines.append(
                    f"| {criterion}{mark} | {best.temperature:g} | {best.patience} | {best.speed:.4f} | "
                    f"{accuracy} | {best.speedup:.2f}x |"
                )
        return "\n".join(lines)


def _best(
    settings: list[ExitSetting], teacher_accuracy: float, max_accuracy_drop: float | None, min_speedup: float | None
) -> ExitSetting | None:
    if max_accuracy_drop is not None:
        ok = [s for s in settings if s.accuracy >= teacher_accuracy - max_accuracy_drop]
        # The fastest; among equals the most accurate, then the lowest speed (the safest margin).
        return max(ok, key=lambda s: (round(s.speedup, 9), s.accuracy, -s.speed), default=None)
    ok = [s for s in settings if s.speedup >= min_speedup]
    return max(ok, key=lambda s: (s.accuracy, round(s.speedup, 9), -s.speed), default=None)


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
    n, num_classes = profile.logits.shape[0], profile.logits.shape[-1]
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


def _profile_of(model, data, tokenizer, batch_size: int, max_length: int) -> ExitProfile:
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
        return exit_profile(model, make_batches(tokenizer, data, batch_size, max_length, model_device(model)))
    if all(isinstance(b, dict) for b in data):
        return exit_profile(model, data)
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
            stacklevel=3,
        )


def calibrate(
    model,
    data,
    tokenizer=None,
    *,
    labels=None,
    max_disagreement: float | None = None,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    delta: float = 0.05,
    certified: bool = True,
    family_selection: str = "bonferroni",
    criteria: Sequence[str] = EXIT_CRITERIA,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    patiences: Sequence[int] = DEFAULT_PATIENCES,
    batch_size: int = 64,
    max_length: int = 128,
    apply: bool = True,
) -> Calibration:
    """Chooses the exit rule (criterion, temperature, patience) and the speed, by default with a
    certificate (:mod:`.certification`): with probability at least ``1 - delta`` over the
    calibration sample, the chosen rule's risk on new exchangeable data is within the target.

    ``data``: unlabelled texts (with ``tokenizer``), tokenised batches, or an :class:`ExitProfile`.
    Keep them out of distillation (see :mod:`.certification`). Targets (exactly one):

    * ``max_disagreement=e`` (no labels): the share of answers that differ from the full model's
      is at most ``e``. It bounds the accuracy drop too.
    * ``max_accuracy_drop=d`` (``labels``): the accuracy drop against the full model is at most
      ``d``, certified through the disagreement or the drop itself, whichever gives the faster rule.
    * ``min_speedup=s`` (``labels``, uncertified): the most accurate rule whose ideal speed-up is at
      least ``s``. ``certified=False`` makes the other targets point estimates too (the fastest
      rule that looks within budget on this sample: no guarantee off it).

    The fastest certified rule is returned with its :class:`.certification.Certificate` and, with
    ``apply``, written with it into the model's config (saved with the checkpoint). Raises
    ``ValueError`` when nothing certifies, saying how many texts the best candidate would need.
    """
    from . import certification

    targets = [t for t in (max_disagreement, max_accuracy_drop, min_speedup) if t is not None]
    if len(targets) != 1:
        raise ValueError("give exactly one of max_disagreement, max_accuracy_drop or min_speedup")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    profile = _profile_of(model, data, tokenizer, batch_size, max_length)
    labels = None if labels is None else check_labels(labels, profile)
    if (max_accuracy_drop is not None or min_speedup is not None) and labels is None:
        raise ValueError(
            "max_accuracy_drop and min_speedup need labels=...; without labels use max_disagreement, "
            "which bounds the accuracy drop from above"
        )
    if min_speedup is not None or not certified:
        if max_disagreement is not None:
            raise ValueError("max_disagreement is certified only: use certified=True")
        return _point_estimate_calibration(
            model, profile, labels, max_accuracy_drop, min_speedup, criteria, temperatures, patiences, apply
        )
    epsilon = max_disagreement if max_disagreement is not None else max_accuracy_drop
    if not 0 < epsilon < 1:
        raise ValueError(f"the target must be in (0, 1), got {epsilon}")
    families = certification.default_families(criteria, temperatures, patiences)
    risks = ["disagreement"] if max_disagreement is not None else ["disagreement", "accuracy_drop"]
    table = FlopsTable(model, profile.lengths)
    found, report = certification.certify(
        profile, table, labels, risks=risks, epsilon=epsilon, delta=delta, families=families,
        family_selection=family_selection,
    )  # fmt: skip
    if found is None:
        raise ValueError(_nothing_certifies(profile, families, epsilon, delta / len(risks) / len(families)))
    teacher_accuracy = float((profile.prediction[:, -1] == labels).float().mean()) if labels is not None else math.nan

    def setting(result) -> ExitSetting:
        criterion, temperature, patience = result.family
        accuracy = (
            float((profile.predictions(result.speed, criterion, temperature, patience) == labels).float().mean())
            if labels is not None
            else math.nan
        )
        return ExitSetting(criterion, temperature, patience, result.speed, accuracy, result.speedup)

    best: dict[str, ExitSetting | None] = {}
    for criterion in criteria:
        mine = [r for results in report.values() for f, r in results.items() if r is not None and f[0] == criterion]
        best[criterion] = setting(max(mine, key=lambda r: r.speedup)) if mine else None
    certificate = certification.Certificate(
        risk=found.risk if max_disagreement is not None else "accuracy_drop",
        epsilon=epsilon,
        delta=delta,
        samples=found.samples,
        estimate=found.estimate,
        upper_bound=found.upper_bound,
        bound="Clopper-Pearson" if found.risk == "disagreement" else "Clopper-Pearson difference",
        alpha=found.alpha,
        families=len(families),
        family_selection=family_selection,
        ideal_speedup=found.speedup,
    )
    result = Calibration(setting(found), teacher_accuracy, best, {}, certificate)
    if apply:
        result.apply(model)
    return result


def _nothing_certifies(profile, families, epsilon: float, alpha: float) -> str:
    """The error when no speed certifies: for each family's gentlest exiting speed, its observed
    disagreement, and the fewest texts at which that rate would have certified."""
    from .certification import CERTIFY_SPEEDS, required_samples

    n = profile.prediction.shape[0]
    best_rate, needed = None, None
    for criterion, temperature, patience in families:
        predictions = profile.predictions(CERTIFY_SPEEDS[0], criterion, temperature, patience)
        rate = float((predictions != profile.prediction[:, -1]).float().mean())
        count = required_samples(rate, epsilon, alpha)
        if count is not None and (needed is None or count < needed):
            best_rate, needed = rate, count
    advice = (
        f"at the observed disagreement of {best_rate:.4f}, about {needed} texts would certify it"
        if needed is not None
        else "even the gentlest rule disagrees with the full model more often than the target allows"
    )
    return f"no exit rule certifies risk <= {epsilon:g} on these {n} texts; {advice}"


def _point_estimate_calibration(
    model, profile, labels, max_accuracy_drop, min_speedup, criteria, temperatures, patiences, apply
) -> Calibration:
    """The uncertified sweep: every family at every speed, the fastest (or most accurate) setting
    whose point estimate meets the target."""
    _check_target(max_accuracy_drop, min_speedup)
    teacher_accuracy = float((profile.prediction[:, -1] == labels).float().mean())
    table = FlopsTable(model, profile.lengths)
    curves: dict[tuple[str, float, int], list[ExitSetting]] = {}
    best: dict[str, ExitSetting | None] = {}
    for criterion in criteria:
        settings = []
        for temperature in temperatures:
            for patience in patiences:
                curve = sweep(profile, labels, model, criterion, temperature, patience, table=table)
                curves[(criterion, float(temperature), patience)] = curve
                settings += curve
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
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
) -> tuple[float, dict[str, float]]:
    """Picks only ``speed`` for a fixed exit rule, on a validation set, from its :class:`ExitProfile`:

    * ``max_accuracy_drop=d``: the largest speed whose accuracy is at least teacher accuracy - d;
    * ``min_speedup=s``: the smallest speed whose ideal speed-up (layer and branch work, FLOPs at the
      real lengths) reaches s.
    Returns the speed and its accuracy / speed-up. Raises if no speed meets the target.
    """
    _check_target(max_accuracy_drop, min_speedup)
    labels = check_labels(labels, profile)
    teacher_accuracy = float((profile.prediction[:, -1] == labels).float().mean())
    table = sweep(profile, labels, model, criterion, temperature, patience, speeds or SPEED_GRID)
    if max_accuracy_drop is not None:
        ok = [row for row in table if row.accuracy >= teacher_accuracy - max_accuracy_drop]
        if not ok:
            raise ValueError(f"no speed keeps accuracy within {max_accuracy_drop} of the teacher (include speed 0)")
        chosen = max(ok, key=lambda row: row.speed)
    else:
        ok = [row for row in table if row.speedup >= min_speedup]
        if not ok:
            best = max(row.speedup for row in table)
            raise ValueError(f"no speed reaches a {min_speedup}x speed-up on this data (best {best:.2f}x)")
        chosen = min(ok, key=lambda row: row.speed)
    return chosen.speed, {"accuracy": chosen.accuracy, "speedup": chosen.speedup, "teacher_accuracy": teacher_accuracy}
