"""FastBERT settings attached to a patched model and saved beside its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Literal

import torch

from .ops.types import check_exit_rule

TeacherKind = Literal["model", "branch"]

CONFIG_FILE = "fastbert_config.json"
BRANCHES_FILE = "fastbert_branches.safetensors"
FORMAT_VERSION = 1


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


@dataclasses.dataclass
class FastBertConfig:
    """Shape of the branches and how the patched model uses them.

    Attributes:
        branch_size: width of every branch (the paper: 128).
        branch_heads: attention heads of the branch self-attention (the paper: 2 of 64).
        teacher: ``"model"`` keeps the model's own classification head as the teacher (drop-in on a
            fine-tuned checkpoint, students after layers 1..L-1); ``"branch"`` adds the paper's branch
            after the last layer too and uses it as the teacher.
        default_speed: speed used when a call passes none.
        trim_sequence: after each compaction, cut the sequence axis to the longest survivor.
        exit_criterion: how a classifier's logits become the uncertainty compared with the speed,
            one of :data:`fastbert_kernels.ops.EXIT_CRITERIA`: ``"entropy"`` (the paper's
            normalised entropy), ``"max_prob"`` (1 - p_top1) or ``"margin"`` (1 - (p_top1 - p_top2)).
        exit_temperature: the exit decision reads ``softmax(logits / T)``; the answers' logits are
            never divided. Below 1 it sharpens many-class students whose entropy stays near 1.
        exit_patience: a sample leaves after the k-th student in a row that was confident
            (uncertainty below the speed) and agreed with the previous ones on the class; 1 is the
            paper's rule, and with speed 1 every student counts as confident (PABEE's rule).
        students_trained: whether the students were distilled (set by
            :func:`fastbert_kernels.distill`, saved with the checkpoint). Students that never were
            answer at random, so the model warns at ``speed > 0`` and the command line refuses.
        certificate: what :func:`fastbert_kernels.calibrate` certified for the rule above (risk,
            epsilon, delta, samples, bound), or None for a rule nobody certified.
    :func:`fastbert_kernels.calibrate` chooses the exit rule and the speed on validation data.
    """

    branch_size: int = 128
    branch_heads: int = 2
    teacher: TeacherKind = "model"
    default_speed: float = 0.0
    trim_sequence: bool = True
    exit_criterion: str = "entropy"
    exit_temperature: float = 1.0
    exit_patience: int = 1
    students_trained: bool = False
    certificate: dict | None = None

    def __post_init__(self) -> None:
        if self.certificate is not None and not isinstance(self.certificate, dict):
            raise TypeError(f"certificate must be an object or null, got {self.certificate!r}")
        for name, kind in (("branch_size", int), ("branch_heads", int), ("exit_patience", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name in ("trim_sequence", "students_trained"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.teacher not in ("model", "branch"):
            raise ValueError(f"teacher must be 'model' or 'branch', got {self.teacher!r}")
        if self.branch_size <= 0 or self.branch_heads <= 0 or self.branch_size % self.branch_heads:
            raise ValueError(
                f"branch_size ({self.branch_size}) must be a positive multiple of branch_heads ({self.branch_heads})"
            )
        try:
            self.default_speed = check_speed(self.default_speed)
        except (TypeError, ValueError) as err:
            raise type(err)(f"default_speed: {err}") from err
        try:
            check_exit_rule(self.exit_criterion, self.exit_temperature, self.exit_patience)
        except (TypeError, ValueError) as err:  # the messages name the rule's parts, not the keys
            raise type(err)(f"exit_criterion/exit_temperature/exit_patience: {err}") from err
        self.exit_temperature = float(self.exit_temperature)

    @property
    def exit_rule(self) -> tuple[str, float, int]:
        """``(criterion, temperature, patience)``, as the exit op takes them; checked again here,
        since a config's fields may be set after it was made."""
        check_exit_rule(self.exit_criterion, self.exit_temperature, self.exit_patience)
        return self.exit_criterion, float(self.exit_temperature), self.exit_patience

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> FastBertConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no {CONFIG_FILE}: it is not a FastBERT checkpoint "
                "(save one with model.save_pretrained after fastbert_kernels.patch)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {version}, this package reads {FORMAT_VERSION}")
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{path} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(fields))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:  # the message names the key and what it allows
            raise ValueError(f"{path}: {err}") from err
