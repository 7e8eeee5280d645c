"""The exit rule: one typed value for when a sample leaves, from config to kernels to benchmarks.

A rule is (criterion, temperature, patience, speed, students). At every evaluated student the
fused exit head measures ``u = criterion(softmax(logits / temperature))`` in [0, 1]; a row leaves
after ``patience`` evaluated students in a row were confident (``u < speed``) and agreed on the
class. Students outside ``students`` are not run at all: a student whose layer almost nobody
leaves at is pure overhead, so calibration chooses which to run like any other part of the rule.

The C++ and CUDA kernels take the per-layer part as ``FastbertExitRule`` (criterion, 1 /
temperature, speed, patience; ``csrc/include/fastbert/exit_rule.h``); the student set is decided
by the layer loop, which skips a student's op entirely (no launch, no host read).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable

import torch

from .ops.types import EXIT_CRITERIA, check_exit_rule

__all__ = ["EXIT_CRITERIA", "ExitRule", "check_speed"]


def check_speed(speed) -> float:
    """``speed`` as a float: any real scalar (Python or numpy number, 0-dim tensor) in [0, 1];
    otherwise a ``TypeError`` or ``ValueError`` that says what was wrong."""
    if isinstance(speed, torch.Tensor):
        if speed.dim() != 0 or speed.dtype.is_complex or speed.dtype == torch.bool:
            raise TypeError(
                f"speed must be a real scalar in [0, 1]; got a {speed.dtype} tensor of shape {tuple(speed.shape)}"
            )
        speed = speed.item()
    if isinstance(speed, bool) or not isinstance(speed, numbers.Real):
        raise TypeError(f"speed must be a real number in [0, 1], got {type(speed).__name__}")
    speed = float(speed)
    if math.isnan(speed) or not 0.0 <= speed <= 1.0:
        raise ValueError(f"speed must be in [0, 1], got {speed}")
    return speed


def _check_students(students: Iterable[int] | None) -> tuple[int, ...] | None:
    if students is None:
        return None
    if isinstance(students, (str, bytes)) or not isinstance(students, Iterable):
        raise TypeError(f"students must be a list of 1-based layer numbers or None (all), got {students!r}")
    layers = tuple(students)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"students must be 1-based layer numbers (ints), got {layer!r}")
        if layer < 1:
            raise ValueError(f"students are numbered from layer 1, got {layer}")
    layers = tuple(int(layer) for layer in layers)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"students must be increasing layer numbers without repeats, got {list(layers)}")
    return layers


@dataclasses.dataclass(frozen=True)
class ExitRule:
    """When a sample leaves.

    Attributes:
        criterion: one of :data:`EXIT_CRITERIA`: ``"entropy"`` (FastBERT's normalised entropy
            ``-sum p log p / log C``), ``"max_prob"`` (``1 - p_top1``) or ``"margin"``
            (``1 - (p_top1 - p_top2)``), over ``p = softmax(logits / temperature)``.
        temperature: divides the logits the decision reads (never the answer's logits); below 1
            it sharpens many-class students whose entropy stays near 1.
        patience: a row leaves after this many evaluated students in a row were confident and
            agreed on the class (1: the paper's rule; with speed 1, PABEE's agreement rule).
        speed: the threshold: confident when ``u < speed``. 0 runs no student at all and equals
            the unpatched model.
        students: the 1-based layers whose student is evaluated, increasing; ``None`` evaluates
            every student (layers 1..L-1), ``()`` none.
    """

    criterion: str = "entropy"
    temperature: float = 1.0
    patience: int = 1
    speed: float = 0.0
    students: tuple[int, ...] | None = None
    # Membership, for the layer loop's per-layer test (not part of the value).
    _evaluated: frozenset[int] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_exit_rule(self.criterion, self.temperature, self.patience)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "speed", check_speed(self.speed))
        students = _check_students(self.students)
        object.__setattr__(self, "students", students)
        object.__setattr__(self, "_evaluated", None if students is None else frozenset(students))

    def replace(self, **changes) -> ExitRule:
        """A copy with ``changes`` (checked like a new rule)."""
        return dataclasses.replace(self, **changes)

    def evaluates(self, layer: int) -> bool:
        """Whether the student after 1-based ``layer`` runs under this rule."""
        return self._evaluated is None or layer in self._evaluated

    def student_layers(self, num_layers: int) -> tuple[int, ...]:
        """The 1-based layers whose student runs in a model of ``num_layers`` layers."""
        self.check_for(num_layers)
        return tuple(range(1, num_layers)) if self.students is None else self.students

    def student_mask(self, num_layers: int) -> torch.Tensor:
        """``[num_layers - 1]`` bool: True where the student after that layer runs."""
        mask = torch.zeros(num_layers - 1, dtype=torch.bool)
        mask[[layer - 1 for layer in self.student_layers(num_layers)]] = True
        return mask

    def check_for(self, num_layers: int) -> None:
        """A ``ValueError`` unless every student of this rule exists in a ``num_layers``-layer model
        (students sit after layers 1..L-1; the teacher answers after layer L)."""
        if self.students and self.students[-1] >= num_layers:
            raise ValueError(
                f"the exit rule evaluates the student after layer {self.students[-1]}, but a {num_layers}-layer "
                f"model has students after layers 1..{num_layers - 1}"
            )

    @property
    def family(self) -> tuple[str, float, int, tuple[int, ...] | None]:
        """Everything but the speed: what calibration tests a sequence of speeds for."""
        return self.criterion, self.temperature, self.patience, self.students

    def as_dict(self) -> dict:
        """JSON-ready: ``students`` as a list (or null for all)."""
        return {
            "criterion": self.criterion,
            "temperature": self.temperature,
            "patience": self.patience,
            "speed": self.speed,
            "students": None if self.students is None else list(self.students),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExitRule:
        """The inverse of :meth:`as_dict`; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise TypeError(f"an exit rule must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown exit-rule keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``entropy T=1 patience 1 speed 0.3000 students 4-11``."""
        if self.students is None:
            students = "all students"
        elif not self.students:
            students = "no students"
        elif len(self.students) == 1:
            students = f"student {self.students[0]}"
        elif list(self.students) == list(range(self.students[0], self.students[-1] + 1)):
            students = f"students {self.students[0]}-{self.students[-1]}"
        else:
            students = "students " + ",".join(map(str, self.students))
        return f"{self.criterion} T={self.temperature:g} patience {self.patience} speed {self.speed:.4f} {students}"
