"""Ops of the adaptive forward pass, defined once (:mod:`.library`) and implemented per device.

* :func:`exit_head`: FastBERT branch + softmax + the exit criterion (:data:`EXIT_CRITERIA`, with
  an optional temperature) + the exit decision (with patience), fused.
* :func:`compact`: gather the survivors of every per-sample tensor, trim the sequence axis.

These wrappers check their inputs (with messages that name the problem) and call the registered
ops, ``torch.ops.fastbert.*``, whose kernel the dispatcher picks by device (see :mod:`.backends`).
Eager calls and ``torch.compile`` take that same route.
"""

from __future__ import annotations

import contextlib

import torch

from . import backends, torch_kernels
from .backends import BACKENDS, ENV_VAR, BackendUnavailableError, report, select_backend
from .library import op
from .sync_counter import host_read
from .types import (
    EXIT_CRITERIA,
    BranchWeights,
    Compacted,
    ExitHeadOutput,
    FoldedWeights,
    check_exit_rule,
    check_hidden_and_mask,
    check_streak,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "EXIT_CRITERIA",
    "BackendUnavailableError",
    "BranchWeights",
    "Compacted",
    "ExitHeadOutput",
    "FoldedWeights",
    "check_exit_rule",
    "compact",
    "exit_head",
    "report",
    "select_backend",
]


def _dispatch_to(device: torch.device) -> None:
    # Outside compiled graphs only: the registration is made by the first eager call (or at
    # import, below) and a graph then holds the op, whichever kernel serves it.
    if not torch.compiler.is_compiling():
        backends.ensure_registered(device)


def exit_head(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weights: FoldedWeights,
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: torch.Tensor | None = None,
) -> ExitHeadOutput:
    """FastBERT exit head on the surviving rows of one layer (inference only).

    Args:
        hidden: ``[N, S, H]`` float32/float16/bfloat16 layer output.
        mask: ``[N, S]`` int64, nonzero for real tokens; each row needs at least one.
        weights: the branch's folded weights (:meth:`BranchWeights.fold`; the branch module
            keeps them: :meth:`fastbert_kernels.BranchClassifier.folded_weights`).
        num_heads: heads of the branch attention (``R % num_heads == 0``).
        speed: exit threshold in [0, 1]: a row is confident when its uncertainty is below it.
        criterion: how logits become an uncertainty, one of :data:`EXIT_CRITERIA`.
        temperature: ``T > 0``; the decision uses ``softmax(logits / T)`` (the returned logits are
            not divided).
        patience: a row exits when this many students in a row, this one included, were
            confident and agreed on the argmax (1: when this one is confident).
        streak: ``[N, 2]`` int64, the rows' state from the previous student's call (its
            ``streak`` output, compacted with the rows), or None before the first student.
    Returns:
        :class:`ExitHeadOutput`: logits ``[N, C]`` float32, uncertainty ``[N]`` float32,
        exits ``[N]`` bool, streak ``[N, 2]`` int64 (``[argmax, confident agreeing students]``).
    Raises:
        ValueError for inputs that need gradients: the kernels are not differentiable; the branch
        module's forward is (:meth:`fastbert_kernels.BranchClassifier.exit_decision` picks it).
    """
    check_hidden_and_mask(hidden, mask)
    if not isinstance(weights, FoldedWeights):
        raise TypeError(f"weights must be FoldedWeights (BranchWeights.fold), got {type(weights).__name__}")
    r, h = weights.w_in.shape
    if h != hidden.shape[2]:
        raise ValueError(f"w_in is [R, H] = {tuple(weights.w_in.shape)} but hidden has H = {hidden.shape[2]}")
    if weights.w_cls.shape[0] < 2:
        raise ValueError(f"the branch needs at least 2 classes, got {weights.w_cls.shape[0]}")
    if num_heads < 1 or r % num_heads:
        raise ValueError(f"branch width {r} is not divisible by num_heads {num_heads}")
    if weights.w_in.dtype != hidden.dtype:
        raise TypeError(f"w_in must have hidden's dtype {hidden.dtype}, got {weights.w_in.dtype}")
    for name, tensor in zip(FoldedWeights._fields, weights, strict=True):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    check_exit_rule(criterion, temperature, patience)
    check_streak(streak, hidden.shape[0], hidden.device)
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise ValueError("exit_head is inference-only; for gradients use the branch module's forward")
    return exit_head_unchecked(hidden, mask, weights, num_heads, speed, criterion, temperature, patience, streak)


def exit_head_unchecked(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weights: FoldedWeights,
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: torch.Tensor | None = None,
) -> ExitHeadOutput:
    """:func:`exit_head` without the Python-level checks, for callers whose inputs are valid by
    construction (the adaptive forward: its weights come from the branch, its hidden states from
    the layer, its rule from the checked config). The same op, the same route; at batch 1 the
    checks cost a visible share of a layer. The compiled kernels still check everything
    (``TORCH_CHECK``)."""
    _dispatch_to(hidden.device)
    return ExitHeadOutput(
        *_EXIT_HEAD(
            hidden, mask, list(weights), num_heads, float(speed), criterion, float(temperature), patience, streak
        )
    )


def compact(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, trim: bool = True
) -> Compacted:
    """Gather the kept rows of every per-sample tensor into dense tensors, in input order.

    Args:
        hidden: ``[N, S, H]``; mask: ``[N, S]`` int64; rows: ``[N]`` int64, each row's index in the
            original batch; keep: ``[N]`` bool, True for rows that continue.
        trim: cut the sequence axis to ``S'`` = the index after the last column any kept row uses.
    Returns:
        :class:`Compacted`: ``hidden [M, S', H]``, ``mask [M, S']``, ``rows [M]``, ``M = keep.sum()``:
        fresh bit-exact copies, or the inputs themselves with ``changed`` False when every row is
        kept and nothing is trimmed; and ``padded``: whether a kept row has masked columns within
        ``S'``. One host read (one device sync on a GPU) for M, S' and padded. Differentiable when
        ``hidden`` needs gradients (then a plain index_select).
    """
    check_hidden_and_mask(hidden, mask)
    n = mask.shape[0]
    if rows.shape != (n,) or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [N] = [{n}], got {rows.dtype} {tuple(rows.shape)}")
    if keep.shape != (n,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool [N] = [{n}], got {keep.dtype} {tuple(keep.shape)}")
    for name, tensor in (("rows", rows), ("keep", keep)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    return compact_unchecked(hidden, mask, rows, keep, trim)


def compact_unchecked(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, trim: bool = True
) -> Compacted:
    """:func:`compact` without the Python-level checks (see :func:`exit_head_unchecked`)."""
    n, s = mask.shape
    _dispatch_to(hidden.device)
    index, stats = _COMPACT_PLAN(keep, mask, trim)
    count, length, fewest = host_read(stats)
    if count == n and length == s:
        return Compacted(hidden, mask, rows, padded=fewest < length, changed=False)
    if torch.is_grad_enabled() and hidden.requires_grad:  # differentiable: index_select and slicing
        gathered = torch_kernels.compact_gather(hidden, mask, rows, index, count, length)
    else:
        gathered = _COMPACT_GATHER(hidden, mask, rows, index, count, length)
    return Compacted(*gathered, padded=fewest < length, changed=True, kept=index[:count])


# The op overloads, looked up once (torch.ops attribute lookups cost a microsecond or two each).
_EXIT_HEAD = op("exit_head").default
_COMPACT_PLAN = op("compact_plan").default
_COMPACT_GATHER = op("compact_gather").default

# The registrations for this process's devices, made now so that a graph compiled before any
# eager call also finds them; an impossible forced choice is reported by the first op call instead
# (importing never fails).
for _device in ("cpu", *(("cuda",) if torch.cuda.is_available() else ())):
    with contextlib.suppress(BackendUnavailableError):
        backends.ensure_registered(torch.device(_device))
