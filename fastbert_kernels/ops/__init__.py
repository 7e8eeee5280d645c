"""Ops of the adaptive forward pass: one Python entry point per op.

* :func:`exit_head`: FastBERT branch + softmax + normalised entropy + exit decision, fused.
* :func:`compact`: gather the survivors of every per-sample tensor, trim the sequence axis.

Each checks its inputs and routes to the backend chosen for the device (see :mod:`.backends`).
Calls that need gradients take the reference (see :func:`_needs_grad`).
In eager mode the backend is called directly, since the dispatcher's Python custom-op path costs
tens of microseconds a call, which is visible at batch 1; under ``torch.compile`` the registered
ops (:mod:`.custom_ops`) are used so that the graph holds them with their fake implementations.
"""

from __future__ import annotations

import torch

from . import custom_ops  # noqa: F401  (registers the torch ops)
from .backends import BACKENDS, ENV_VAR, BackendUnavailableError, report, select_backend
from .types import BranchWeights, Compacted, FoldedWeights

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "BranchWeights",
    "Compacted",
    "FoldedWeights",
    "compact",
    "exit_head",
    "report",
    "select_backend",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd must see through the op. The compiled kernels are inference-only, so such
    calls (attribution methods on an eval-mode model, for instance) take the plain-torch reference,
    whose exit head is the differentiable branch and whose compaction is an index_select: gradients
    are then the reference's on every backend, never silently cut."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_hidden_mask(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, S, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [N, S] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.int64:
        raise TypeError(f"mask must be int64, got {mask.dtype}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def exit_head(
    hidden: torch.Tensor, mask: torch.Tensor, weights: BranchWeights, num_heads: int, speed: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FastBERT exit head on the surviving rows of one layer.

    Args:
        hidden: ``[N, S, H]`` float32/float16/bfloat16 layer output.
        mask: ``[N, S]`` int64, nonzero for real tokens; each row needs at least one.
        weights: the branch's parameters (:class:`BranchWeights`; ``R`` wide, ``C >= 2`` classes).
        num_heads: heads of the branch attention (``R % num_heads == 0``).
        speed: exit threshold in [0, 1].
    Returns:
        logits ``[N, C]`` float32; uncertainty ``u = -sum p log p / log C`` ``[N]`` float32;
        exits ``[N]`` bool, ``u < speed``.
    """
    _check_hidden_mask(hidden, mask)
    r, h = weights.w_in.shape
    if h != hidden.shape[2]:
        raise ValueError(f"w_in is [R, H] = {tuple(weights.w_in.shape)} but hidden has H = {hidden.shape[2]}")
    if weights.w_cls.shape[0] < 2:
        raise ValueError(f"the branch needs at least 2 classes, got {weights.w_cls.shape[0]}")
    if r % num_heads:
        raise ValueError(f"branch width {r} is not divisible by num_heads {num_heads}")
    for name, tensor in zip(BranchWeights._fields, weights, strict=True):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if _needs_grad(hidden, *weights):
        return BACKENDS["reference"].exit_head(hidden, mask, weights, num_heads, float(speed))
    if torch.compiler.is_compiling():
        return torch.ops.fastbert.exit_head(hidden, mask, *weights, num_heads, float(speed))
    return select_backend(hidden.device).exit_head(hidden, mask, weights, num_heads, float(speed))


def compact(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, trim: bool = True
) -> Compacted:
    """Gather the kept rows of every per-sample tensor into dense tensors, in input order.

    Args:
        hidden: ``[N, S, H]``; mask: ``[N, S]`` int64; rows: ``[N]`` int64, each row's index in the
            original batch; keep: ``[N]`` bool, True for rows that continue.
        trim: cut the sequence axis to ``S'`` = the index after the last column any kept row uses.
    Returns:
        :class:`Compacted`: ``hidden [M, S', H]``, ``mask [M, S']``, ``rows [M]``, ``M = keep.sum()``,
        bit-exact copies (or the inputs themselves when nothing changes, with ``changed`` False), and
        ``padded``: whether a kept row has masked columns within ``S'`` (None under torch.compile,
        where it is not computed). On a GPU this costs one device-to-host sync, for M, S' and padded.
    """
    _check_hidden_mask(hidden, mask)
    n = hidden.shape[0]
    if rows.shape != (n,) or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [N] = [{n}], got {rows.dtype} {tuple(rows.shape)}")
    if keep.shape != (n,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool [N] = [{n}], got {keep.dtype} {tuple(keep.shape)}")
    for name, tensor in (("rows", rows), ("keep", keep)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if _needs_grad(hidden):
        backend = BACKENDS["reference"]
    elif torch.compiler.is_compiling():
        out_hidden, out_mask, out_rows = torch.ops.fastbert.compact(hidden, mask, rows, keep, trim)
        return Compacted(out_hidden, out_mask, out_rows, padded=None, changed=True)
    else:
        backend = select_backend(hidden.device)
    out_hidden, out_mask, out_rows, padded = backend.compact(hidden, mask, rows, keep, trim)
    return Compacted(out_hidden, out_mask, out_rows, padded=padded, changed=out_hidden.shape != hidden.shape)
