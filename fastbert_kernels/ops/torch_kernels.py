"""Plain-torch kernels of the ops (:mod:`.library`), over the folded weights: the default on any
device without a compiled kernel, and the ``torch`` backend.

Unlike :mod:`.reference` (the paper's formula, literally, which tests compare everything with),
these use the folding of :meth:`.types.BranchWeights.fold`, so they take the same inputs as the
compiled kernels and are checked against the reference like them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import exit_decision
from .types import FoldedWeights


def exit_head(
    hidden: Tensor,
    mask: Tensor,
    weights: list[Tensor],
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden ``[N, S, H]``, mask ``[N, S]``, folded weights -> logits ``[N, C]``, u ``[N]``,
    exits ``[N]``, streak ``[N, 2]`` (the exit rule: :func:`.reference.update_streak`).

    z = tanh(W_in x + b_in) ``[N, S, R]``; per head j: q'_j = W_qk,j z_0 + b_qk,j, a_j = softmax_s(z_s . q'_j)
    over real tokens, zbar_j = sum_s a_{s,j} z_s; logits = W_cls tanh(W_pool (W_ov zbar + b_ov) + b_pool) + b_cls.
    """
    w = FoldedWeights(*weights)
    n = hidden.shape[0]
    r = w.b_in.shape[0]
    z = torch.tanh(F.linear(hidden, w.w_in).float() + w.b_in)
    query = F.linear(z[:, 0], w.w_qk, w.b_qk).view(n, num_heads, r)
    scores = torch.einsum("njr,nsr->njs", query, z).masked_fill((mask == 0)[:, None, :], float("-inf"))
    zbar = torch.einsum("njs,nsr->njr", torch.softmax(scores, dim=-1), z).reshape(n, num_heads * r)
    pooled = torch.tanh(F.linear(F.linear(zbar, w.w_ov, w.b_ov), w.w_pool, w.b_pool))
    logits = F.linear(pooled, w.w_cls, w.b_cls)
    return tuple(exit_decision(logits, speed, criterion, temperature, patience, streak))


def compact_plan(keep: Tensor, mask: Tensor, trim: bool) -> tuple[Tensor, Tensor]:
    """keep ``[N]`` bool, mask ``[N, S]`` -> index ``[N]`` (the kept rows in order, then -1), stats ``[3]``
    = [kept, length after trimming (S without), fewest real tokens of a kept row (S if none)]."""
    n, s = mask.shape
    real = mask != 0
    if n == 0:
        return mask.new_empty((0,)), torch.tensor([0, 0 if trim else s, s], device=mask.device)
    last_used = (real * torch.arange(1, s + 1, device=mask.device)).amax(dim=1)
    length = torch.where(keep, last_used, 0).amax() if trim else torch.tensor(s, device=mask.device)
    fewest = torch.where(keep, real.sum(dim=1), s).amin()
    # A stable sort puts the kept rows first, in order, without nonzero()'s own host sync.
    count = keep.sum()
    index = torch.where(torch.arange(n, device=mask.device) < count, torch.argsort(~keep, stable=True), -1)
    return index, torch.stack([count, length, fewest])


def compact_gather(
    hidden: Tensor, mask: Tensor, rows: Tensor, index: Tensor, count: int, length: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``index[:count]`` of hidden ``[N, S, H]``, mask ``[N, S]``, rows ``[N]``, cut to
    ``length`` tokens: fresh contiguous tensors ``[count, length, H]``, ``[count, length]``, ``[count]``."""
    kept = index[:count]
    return (
        hidden.index_select(0, kept)[:, :length].contiguous(),
        mask.index_select(0, kept)[:, :length].contiguous(),
        rows.index_select(0, kept),
    )
