"""The C++ extension (``fastbert_kernels._C``): CPU kernels, and CUDA kernels when built with CUDA.

Importing this module never fails: a missing or broken build is recorded in ``LOAD_ERROR``.
"""

from __future__ import annotations

import torch

from . import folding
from .types import BranchWeights

try:
    from .. import _C  # registers the torch.ops.fastbert_C ops

    BUILD_INFO: dict = dict(_C.build_info())
    LOAD_ERROR: str | None = None
except ImportError as err:  # not built (a source checkout without `pip install -e .`)
    BUILD_INFO = {}
    LOAD_ERROR = f"fastbert_kernels._C is not importable ({err}); build it with `make install`"


def cpu_available() -> tuple[bool, str]:
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    return True, "C++ extension" + (" with OpenMP" if BUILD_INFO.get("openmp") else " WITHOUT OpenMP (one thread)")


def cuda_available() -> tuple[bool, str]:
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    if not BUILD_INFO.get("cuda"):
        return False, "the C++ extension was built without CUDA (torch has no CUDA, or FASTBERT_SKIP_CUDA=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "CUDA extension"


def exit_head(
    hidden: torch.Tensor, mask: torch.Tensor, weights: BranchWeights, num_heads: int, speed: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = folding.folded(weights, num_heads, hidden.dtype)
    return torch.ops.fastbert_C.exit_head_folded(hidden.contiguous(), mask.contiguous(), *w, num_heads, speed)


def compact(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, trim: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.fastbert_C.compact(
        hidden.contiguous(), mask.contiguous(), rows.contiguous(), keep.contiguous(), trim
    )
