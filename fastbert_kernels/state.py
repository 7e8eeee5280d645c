"""Where a patched model keeps its FastBERT parts, and the accessors everything else uses.

:func:`fastbert_kernels.patch` adds two attributes to a Hugging Face classifier: the branch
modules (an ``nn.ModuleList``, so they move, cast and save with the model) and the
:class:`FastBertConfig`.
"""

from __future__ import annotations

import warnings

from torch import nn

from .architectures import architecture_for
from .branch import BranchClassifier
from .config import FastBertConfig

BRANCHES_ATTR = "fastbert_branches"
CONFIG_ATTR = "fastbert_config"


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, BRANCHES_ATTR, None), nn.ModuleList) and hasattr(model, CONFIG_ATTR)


def branch_modules(model: nn.Module) -> nn.ModuleList:
    """Every branch of a patched model: students after layers 1..L-1 (and the teacher in 'branch' mode)."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call fastbert_kernels.patch(model) first")
    return getattr(model, BRANCHES_ATTR)


def fastbert_config(model: nn.Module) -> FastBertConfig:
    branch_modules(model)  # raises when unpatched
    return getattr(model, CONFIG_ATTR)


def students(model: nn.Module) -> list[BranchClassifier]:
    """The student branches, after layers 1..L-1 (in 'branch' teacher mode the last is the teacher)."""
    num_layers = len(architecture_for(model).layers(model))
    return list(branch_modules(model))[: num_layers - 1]


class UntrainedStudentsWarning(UserWarning):
    """A patched model runs at ``speed > 0`` with students that were never distilled."""


_WARNED_ATTR = "_fastbert_warned_untrained"
# Hashes of the texts distil() saw, in this process, so that calibration can warn about reusing them.
DISTILLED_TEXTS_ATTR = "_fastbert_distilled_texts"


def check_students_trained(model: nn.Module, speed: float, refuse: bool = False) -> None:
    """At ``speed > 0``, students that were never distilled choose the exits at random: warn
    (once per model), or with ``refuse`` raise a ``ValueError`` that says what to do."""
    if speed <= 0 or fastbert_config(model).students_trained:
        return
    message = (
        "this model's students were never distilled, so at speed > 0 untrained classifiers choose the "
        "exits; run fastbert_kernels.distill(model, texts, tokenizer) (or `python -m fastbert_kernels "
        "distill`) first, use speed 0, or set fastbert_config(model).students_trained = True if you "
        "trained them yourself"
    )
    if refuse:
        raise ValueError(message)
    if not getattr(model, _WARNED_ATTR, False):
        object.__setattr__(model, _WARNED_ATTR, True)
        warnings.warn(message, UntrainedStudentsWarning, stacklevel=3)
