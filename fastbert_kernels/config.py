"""FastBERT settings attached to a patched model and saved beside its checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from .exit_rule import ExitRule, check_speed

__all__ = ["BRANCHES_FILE", "CONFIG_FILE", "FORMAT_VERSION", "FastBertConfig", "check_speed"]

TeacherKind = Literal["model", "branch"]

CONFIG_FILE = "fastbert_config.json"
BRANCHES_FILE = "fastbert_branches.safetensors"
FORMAT_VERSION = 2
# Version 1 kept the exit rule as loose keys; they are read into one ExitRule (and named in the
# error for code that still passes them).
LOOSE_RULE_KEYS = {
    "exit_criterion": "criterion",
    "exit_temperature": "temperature",
    "exit_patience": "patience",
    "default_speed": "speed",
}


@dataclasses.dataclass
class FastBertConfig:
    """Shape of the branches and how the patched model uses them.

    Attributes:
        branch_size: width of every branch (the paper: 128).
        branch_heads: attention heads of the branch self-attention (the paper: 2 of 64).
        teacher: ``"model"`` keeps the model's own classification head as the teacher (drop-in on a
            fine-tuned checkpoint, students after layers 1..L-1); ``"branch"`` adds the paper's branch
            after the last layer too and uses it as the teacher.
        trim_sequence: after each compaction, cut the sequence axis to the longest survivor.
        exit_rule: the :class:`~fastbert_kernels.ExitRule` a call uses when it passes no speed
            (criterion, temperature, patience, speed, students evaluated); its speed is the
            default speed. A call's ``speed`` replaces the speed only.
        students_trained: whether the students were distilled (set by
            :func:`fastbert_kernels.distill`, saved with the checkpoint). Students that never were
            answer at random, so the model warns at ``speed > 0`` and the command line refuses.
        certificate: what :func:`fastbert_kernels.calibrate` certified for the rule above (risk,
            epsilon, delta, samples, bound), or None for a rule nobody certified.
        quantization: None for a float encoder, ``"int8"`` for one that
            :func:`fastbert_kernels.quantize` made (the checkpoint then holds the float weights
            and loading quantises them again, so the certificate holds for what is served).
    :func:`fastbert_kernels.calibrate` chooses the exit rule and the speed on validation data.
    """

    branch_size: int = 128
    branch_heads: int = 2
    teacher: TeacherKind = "model"
    trim_sequence: bool = True
    exit_rule: ExitRule = dataclasses.field(default_factory=ExitRule)
    students_trained: bool = False
    certificate: dict | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.certificate is not None and not isinstance(self.certificate, dict):
            raise TypeError(f"certificate must be an object or null, got {self.certificate!r}")
        for name, kind in (("branch_size", int), ("branch_heads", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name in ("trim_sequence", "students_trained"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be null or 'int8', got {self.quantization!r}")
        if self.teacher not in ("model", "branch"):
            raise ValueError(f"teacher must be 'model' or 'branch', got {self.teacher!r}")
        if self.branch_size <= 0 or self.branch_heads <= 0 or self.branch_size % self.branch_heads:
            raise ValueError(
                f"branch_size ({self.branch_size}) must be a positive multiple of branch_heads ({self.branch_heads})"
            )
        if isinstance(self.exit_rule, dict):  # from JSON
            try:
                self.exit_rule = ExitRule.from_dict(self.exit_rule)
            except (TypeError, ValueError) as err:
                raise type(err)(f"exit_rule: {err}") from err
        if not isinstance(self.exit_rule, ExitRule):
            raise TypeError(f"exit_rule must be a fastbert_kernels.ExitRule, got {type(self.exit_rule).__name__}")

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "exit_rule": self.exit_rule.as_dict(),
        }

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_options(cls, **options) -> FastBertConfig:
        """``FastBertConfig(**options)``, with an error that says what replaced the version-1
        keyword options (``default_speed``, ``exit_criterion``, ...)."""
        loose = sorted(set(options) & set(LOOSE_RULE_KEYS))
        if loose:
            rule = ", ".join(f"{LOOSE_RULE_KEYS[k]}=..." for k in loose)
            raise TypeError(f"{', '.join(loose)} moved into the exit rule: pass exit_rule=fbk.ExitRule({rule})")
        return cls(**options)

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
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        version = data.pop("format_version", None)
        if version == 1:
            rule = {new: data.pop(old) for old, new in LOOSE_RULE_KEYS.items() if old in data}
            data["exit_rule"] = rule
        elif version != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {version}, this package reads 1 and {FORMAT_VERSION}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{path} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(fields))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:  # the message names the key and what it allows
            raise ValueError(f"{path}: {err}") from err
