"""The exit profile: what every classifier says about every sample, from one full pass.

Each sample's exit depends on its own classifiers only, so one pass that runs every student and
the teacher tells exactly what any :class:`~fastbert_kernels.ExitRule` would do: the layer each
sample leaves after, the answer it gets, and the FLOPs it costs (:class:`FlopsTable`), without
running the model again. Calibration sweeps thousands of rules over one profile.

Memory: the profile keeps, per sample and classifier, the argmax and one float32 uncertainty per
(criterion, temperature) profiled; never the logits. With ``K`` pairs that is
``N * L * (8 + 4 K)`` bytes, whatever the number of classes: 20,000 texts through 12 classifiers
at the default 3 criteria x 3 temperatures take 10.6 MB (the logits of 1,000 classes would take
960 MB). The pass itself holds one batch's logits at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import flops
from .architectures import architecture_for
from .encoder import all_layer_states, embed
from .exit_rule import ExitRule
from .modeling import teacher_logits
from .ops.reference import uncertainty as criterion_uncertainty
from .ops.types import EXIT_CRITERIA
from .quantization import float_source
from .state import fastbert_config, students

Batch = dict[str, torch.Tensor]

# The temperatures a profile measures by default (calibration tries these).
DEFAULT_TEMPERATURES = (1.0, 0.5, 0.25)


@dataclasses.dataclass
class ExitProfile:
    """Every classifier's answer and uncertainty for every sample (column L-1 is the teacher).

    Attributes:
        prediction: ``[N, L]`` int64 argmax; a student's is 0 where its logits are not finite (as
            the exit op records it: such a row never exits there).
        uncertainties: ``{(criterion, temperature): [N, L] float32}``, NaN for non-finite logits.
        lengths: ``[N]`` real tokens per sample.
        padded: ``[N]`` the padded length of the batch each sample ran in.
        num_classes: C, the classifiers' width.
        reference: ``[N]`` the answers every risk is measured against, when they are not the
            teacher's (column L-1): an int8 model's float model's full-depth answers
            (:mod:`fastbert_kernels.quantization`); None: the teacher's.
    """

    prediction: torch.Tensor
    uncertainties: dict[tuple[str, float], torch.Tensor]
    lengths: torch.Tensor
    padded: torch.Tensor
    num_classes: int
    reference: torch.Tensor | None = None

    @property
    def full_answers(self) -> torch.Tensor:
        """``[N]`` the answers the risks compare with: ``reference``, else the teacher's."""
        return self.prediction[:, -1] if self.reference is None else self.reference

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        lengths: torch.Tensor,
        padded: torch.Tensor | None = None,
        criteria: Sequence[str] = EXIT_CRITERIA,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    ) -> ExitProfile:
        """The profile of classifier logits ``[N, L, C]`` (the teacher last)."""
        if logits.dim() != 3 or logits.shape[1] < 1:
            raise ValueError(f"logits must be [N, L, C], got {tuple(logits.shape)}")
        n, layers, c = logits.shape
        flat = logits.reshape(n * layers, c).float()
        finite = torch.isfinite(flat).all(-1)
        argmax = flat.argmax(-1)
        prediction = torch.where(finite, argmax, 0).view(n, layers)
        prediction[:, -1] = argmax.view(n, layers)[:, -1]  # the teacher answers whatever its logits are
        uncertainties = {
            (criterion, float(t)): torch.where(finite, criterion_uncertainty(flat, criterion, t), float("nan")).view(
                n, layers
            )
            for criterion in criteria
            for t in temperatures
        }
        return cls(prediction, uncertainties, lengths, lengths.clone() if padded is None else padded, c)

    @classmethod
    def concat(cls, profiles: Sequence[ExitProfile]) -> ExitProfile:
        """The profiles' samples one after another (they must have profiled the same pairs)."""
        first = profiles[0]
        if any(p.uncertainties.keys() != first.uncertainties.keys() for p in profiles):
            raise ValueError("the profiles measured different (criterion, temperature) pairs")
        if any(p.num_classes != first.num_classes or p.num_layers != first.num_layers for p in profiles):
            raise ValueError("the profiles come from classifiers of different shapes")
        if len({p.reference is None for p in profiles}) > 1:
            raise ValueError("some profiles have reference answers and some do not")
        return cls(
            torch.cat([p.prediction for p in profiles]),
            {key: torch.cat([p.uncertainties[key] for p in profiles]) for key in first.uncertainties},
            torch.cat([p.lengths for p in profiles]),
            torch.cat([p.padded for p in profiles]),
            first.num_classes,
            None if first.reference is None else torch.cat([p.reference for p in profiles]),
        )

    def subset(self, rows: torch.Tensor) -> ExitProfile:
        """The samples ``rows`` (indices into ``[N]``), in that order."""
        return ExitProfile(
            self.prediction[rows],
            {key: u[rows] for key, u in self.uncertainties.items()},
            self.lengths[rows],
            self.padded[rows],
            self.num_classes,
            None if self.reference is None else self.reference[rows],
        )

    @property
    def num_samples(self) -> int:
        return self.prediction.shape[0]

    @property
    def num_layers(self) -> int:
        return self.prediction.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory the profile holds."""
        tensors = [self.prediction, self.lengths, self.padded, *self.uncertainties.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def uncertainty(self, criterion: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
        """``[N, L]`` every classifier's uncertainty under ``criterion`` at ``temperature``."""
        key = (criterion, float(temperature))
        if key not in self.uncertainties:
            measured = ", ".join(f"{c} T={t:g}" for c, t in self.uncertainties)
            raise ValueError(
                f"this profile did not measure {criterion} at T={temperature:g} (it measured {measured}); "
                "profile again with exit_profile(model, batches, criteria=..., temperatures=...)"
            )
        return self.uncertainties[key]

    def exit_layers(self, rule: ExitRule) -> torch.Tensor:
        """``[N]`` int64, the 1-based layer each sample leaves after under ``rule`` (L: the teacher):
        the first evaluated student at which it has been confident (``u < speed``) and in agreement
        for ``patience`` evaluated students in a row."""
        return self.exit_layers_at(rule, [rule.speed])[0]

    def exit_layers_at(
        self, family: ExitRule, speeds: Sequence[float], rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[S, N]`` (``[S, len(rows)]``) the exit layers of ``family`` at each of ``speeds`` (its
        own speed is ignored), for every sample or the samples ``rows``: one vectorised pass over
        the students instead of one per speed. Speeds compare in float32, as the kernels do."""
        u = self.uncertainty(family.criterion, family.temperature)
        prediction = self.prediction
        if rows is not None:
            u, prediction = u[rows], prediction[rows]
        thresholds = torch.tensor(list(speeds), dtype=torch.float32)[:, None]  # [S, 1]
        layers = self.num_layers
        out = torch.full((thresholds.shape[0], u.shape[0]), layers, dtype=torch.int64)
        evaluated = family.student_layers(layers)
        if not evaluated:
            return out
        if family.patience == 1:  # the first confident student: no state to carry
            columns = torch.tensor(evaluated) - 1
            below = u[:, columns].T[:, None, :] < thresholds[None]  # [E, S, N]
            first = below.to(torch.uint8).argmax(0)  # the first True (argmax returns the first maximum)
            return torch.where(below.any(0), columns[first] + 1, out)
        # The patience rule of ops.reference.update_streak, for all speeds at once: streak 0 when
        # unsure, else the previous student's streak + 1 when it recorded the same argmax, else 1.
        previous_prediction, previous_streak = None, None
        for student in evaluated:
            column = student - 1
            current = prediction[:, column][None, :]  # [1, N]
            streak = torch.ones_like(out)
            if previous_streak is not None:
                streak = torch.where(previous_prediction == current, previous_streak + 1, streak)
            streak = torch.where(u[:, column][None, :] < thresholds, streak, 0)
            out = torch.where((streak >= family.patience) & (out == layers), student, out)
            previous_prediction, previous_streak = current, streak
        return out

    def answers(self, exit_layers: torch.Tensor) -> torch.Tensor:
        """``[N]`` the class each sample is answered with when it leaves after ``exit_layers``."""
        return self.prediction.gather(1, (exit_layers - 1)[:, None]).squeeze(1)

    def predictions(self, rule: ExitRule) -> torch.Tensor:
        """``[N]`` the class each sample is answered with under ``rule``."""
        return self.answers(self.exit_layers(rule))


@torch.no_grad()
def exit_profile(
    model,
    batches: list[Batch],
    criteria: Sequence[str] = EXIT_CRITERIA,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
) -> ExitProfile:
    """One full pass with every classifier evaluated (reference math), keeping per sample and
    classifier the argmax and the uncertainty under each ``criteria`` x ``temperatures`` pair. For
    an int8 model (:func:`fastbert_kernels.quantize`) the float model's full-depth answers are the
    ``reference``, so that every risk includes quantisation's own cost."""
    arch = architecture_for(model)
    source = float_source(model)
    parts = []
    for b in batches:
        inputs = embed(model, arch, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"))
        states = all_layer_states(model, arch, inputs)
        layer_logits = [s(states[i], inputs.mask).float() for i, s in enumerate(students(model))]
        layer_logits.append(teacher_logits(model, arch, states[-1], inputs.mask).float())
        logits = torch.stack(layer_logits, 1).cpu()
        lengths = inputs.mask.sum(1).cpu()
        padded = torch.full((inputs.mask.shape[0],), inputs.mask.shape[1])
        part = ExitProfile.from_logits(logits, lengths, padded, criteria, temperatures)
        if source is not None:
            part.reference = source(**b, speed=0.0).logits.argmax(-1).cpu()
        parts.append(part)
    if not parts:
        raise ValueError("an exit profile needs at least one batch")
    return ExitProfile.concat(parts)


class FlopsTable:
    """The FLOPs of every sample of a profile at every exit layer, so that the ideal speed-up of an
    exit rule is a gather: ``full [N]`` (the unpatched model), ``layers [L, N]`` (the layers and
    the teacher head a sample leaving after layer l runs) and ``branch [N]`` (one student's cost).

    A sample leaving after layer ``e`` costs ``layers[e] + branch * (students of the rule at layers
    <= min(e, L-1))``; speed 0 runs no student. Branches are counted as the paper counts them, or
    (``fused``) as the fused kernel runs them."""

    def __init__(self, model, seq_lengths: torch.Tensor, fused: bool = False) -> None:
        c, settings = model.config, fastbert_config(model)
        seqs = seq_lengths.tolist()
        shape = (c.num_hidden_layers, c.hidden_size, c.intermediate_size)
        self.num_layers = c.num_hidden_layers
        self.full = torch.tensor([flops.model_flops(*shape, s, c.num_labels) for s in seqs], dtype=torch.float64)
        self.layers = torch.tensor(
            [
                [flops.adaptive_flops(layer, *shape, s, c.num_labels, with_branches=False) for s in seqs]
                for layer in range(1, self.num_layers + 1)
            ],
            dtype=torch.float64,
        )
        width, heads = settings.branch_size, settings.branch_heads
        if fused:
            branch = [flops.fused_branch_flops(c.hidden_size, s, c.num_labels, width, heads) for s in seqs]
        else:
            branch = [flops.branch_flops(c.hidden_size, s, c.num_labels, width) for s in seqs]
        self.branch = torch.tensor(branch, dtype=torch.float64)

    def students_run(self, exit_layers: torch.Tensor, rule: ExitRule) -> torch.Tensor:
        """How many of ``rule``'s students a sample passes when it leaves after ``exit_layers``
        (any shape): those at layers <= min(exit layer, L-1), whatever the speed."""
        ran = torch.cumsum(rule.student_mask(self.num_layers).long(), 0)  # [L-1]
        return ran[(exit_layers.clamp(max=self.num_layers - 1) - 1)]

    def speedup(self, exit_layers: torch.Tensor, rule: ExitRule, rows: torch.Tensor | None = None) -> float:
        """Full FLOPs / adaptive FLOPs of the samples ``rows`` (default: all) leaving after
        ``exit_layers [len(rows)]`` (1-based) under ``rule``."""
        return float(self.speedups(exit_layers[None, :], rule, [rule.speed], rows)[0])

    def speedups(
        self, exit_layers: torch.Tensor, family: ExitRule, speeds: Sequence[float], rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[S]``: :meth:`speedup` of ``family`` at each of ``speeds``, its samples ``rows``
        leaving after ``exit_layers [S, len(rows)]`` (from :meth:`ExitProfile.exit_layers_at`)."""
        layers, branch, full = self.layers, self.branch, self.full
        if rows is not None:
            layers, branch, full = layers[:, rows], branch[rows], full[rows]
        ran = self.students_run(exit_layers, family) * (torch.tensor(list(speeds)) > 0)[:, None]  # speed 0: none
        spent = layers.gather(0, exit_layers - 1).sum(1) + (branch * ran).sum(1)
        return full.sum() / spent


def flops_speedup(
    model, exit_layers: torch.Tensor, seq_lengths: torch.Tensor, rule: ExitRule, fused: bool = False
) -> float:
    """Full model FLOPs / adaptive FLOPs, each sample at ``seq_lengths`` tokens leaving after
    ``exit_layers`` under ``rule`` (which students ran; speed 0 runs none)."""
    return FlopsTable(model, seq_lengths, fused).speedup(exit_layers, rule)
