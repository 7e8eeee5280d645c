"""Where a patched model keeps its FastBERT parts, and the accessors everything else uses.

:func:`fastbert_kernels.patch` adds two attributes to a Hugging Face classifier: the branch
modules (an ``nn.ModuleList``, so they move, cast and save with the model) and the
:class:`FastBertConfig`.
"""

from __future__ import annotations

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
