"""Plain-torch reference of every op: the executable specification.

Tests and benchmarks compare every compiled backend with these functions, and the package falls
back to them when nothing is compiled. They follow the paper's arithmetic literally (K and V for
every token, Q for the CLS token only), in fp32, so that the kernels' algebraic shortcuts are
checked against the plain formula rather than against themselves.

Notation: N rows (surviving samples), S tokens, H backbone width, R branch width, C classes,
h = R / num_heads the width of one head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sync_counter import host_read
from .types import EXIT_CRITERIA, BranchWeights, ExitHeadOutput


def branch_logits(hidden: torch.Tensor, mask: torch.Tensor, weights: BranchWeights, num_heads: int) -> torch.Tensor:
    """FastBERT branch classifier, differentiable.

    z = tanh(W_in x + b_in)                                  per token, [N, S, R]
    q = W_q z_0 + b_q;  k_s = W_k z_s + b_k;  v_s = W_v z_s + b_v   (q for the CLS token only)
    a = softmax_s(q_j . k_{s,j} / sqrt(h) over unmasked s)       per head j
    c = W_o concat_j(sum_s a_s v_{s,j}) + b_o
    logits = W_cls tanh(W_pool c + b_pool) + b_cls

    Args:
        hidden: ``[N, S, H]`` layer output, any float dtype.
        mask: ``[N, S]``, nonzero where the token is real; every row needs one.
        weights: the branch's parameters (see :class:`BranchWeights`).
        num_heads: heads of the branch attention.
    Returns:
        ``[N, C]`` float32 logits.
    """
    n, s, _ = hidden.shape
    w = weights.float()
    r = w.b_in.shape[0]
    head = r // num_heads
    z = torch.tanh(F.linear(hidden.float(), w.w_in, w.b_in))
    wq, wk, wv = w.w_qkv.split(r)
    bq, bk, bv = w.b_qkv.split(r)
    q = F.linear(z[:, 0], wq, bq).view(n, num_heads, head)
    k = F.linear(z, wk, bk).view(n, s, num_heads, head)
    v = F.linear(z, wv, bv).view(n, s, num_heads, head)
    scores = torch.einsum("njd,nsjd->njs", q, k) / math.sqrt(head)
    scores = scores.masked_fill((mask == 0)[:, None, :], float("-inf"))
    attention = torch.softmax(scores, dim=-1)
    context = torch.einsum("njs,nsjd->njd", attention, v).reshape(n, r)
    out = F.linear(context, w.w_out, w.b_out)
    pooled = torch.tanh(F.linear(out, w.w_pool, w.b_pool))
    return F.linear(pooled, w.w_cls, w.b_cls)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """u = -sum_c p_c log p_c / log C with p = softmax(logits); ``[N, C]`` -> ``[N]`` float32 in [0, 1]."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1) / math.log(logits.shape[-1])


def uncertainty(logits: torch.Tensor, criterion: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
    """The exit criterion's uncertainty of ``p = softmax(logits / temperature)``: ``[N, C]`` -> ``[N]``
    float32 in [0, 1] (:data:`.types.EXIT_CRITERIA`):

    * ``entropy``:  u = -sum_c p_c log p_c / log C
    * ``max_prob``: u = 1 - p_top1
    * ``margin``:   u = 1 - (p_top1 - p_top2)
    """
    scaled = logits.float() / temperature
    if criterion == "entropy":
        u = normalized_entropy(scaled)
    elif criterion in ("max_prob", "margin"):
        top = torch.softmax(scaled, dim=-1).topk(2, dim=-1).values
        u = 1 - top[:, 0] if criterion == "max_prob" else 1 - (top[:, 0] - top[:, 1])
    else:
        raise ValueError(f"unknown exit criterion {criterion!r}; known: {', '.join(EXIT_CRITERIA)}")
    return u.clamp(0.0, 1.0)


def update_streak(
    prediction: torch.Tensor,
    uncertainty: torch.Tensor,
    speed: float | torch.Tensor,
    patience: int,
    previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The patience rule for one student's rows.

    streak = 0 if u >= speed; else previous streak + 1 if the argmax equals the previous student's,
    else 1. A row exits when streak >= patience (patience 1: u < speed). ``speed`` may be a float
    or one per row ``[N]``; ``previous`` is ``[N, 2]`` = [argmax, streak] after the last student,
    or None before the first. Returns exits ``[N]`` bool and the new state ``[N, 2]`` int64.
    """
    confident = uncertainty < speed
    streak = torch.ones_like(prediction)
    if previous is not None:
        streak = torch.where(previous[:, 0] == prediction, previous[:, 1] + 1, streak)
    streak = torch.where(confident, streak, 0)
    return streak >= patience, torch.stack([prediction, streak], dim=1)


def exit_head(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weights: BranchWeights,
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: torch.Tensor | None = None,
) -> ExitHeadOutput:
    """Branch + softmax + the criterion's uncertainty (of logits / temperature) + the exit decision
    (:func:`update_streak`); the logits are returned undivided."""
    logits = branch_logits(hidden, mask, weights, num_heads)
    return exit_decision(logits, speed, criterion, temperature, patience, streak)


def exit_decision(
    logits: torch.Tensor,
    speed: float | torch.Tensor,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: torch.Tensor | None = None,
) -> ExitHeadOutput:
    """The exit rule on a branch's logits ``[N, C]``: the criterion's uncertainty of
    ``logits / temperature`` and :func:`update_streak`; the logits are returned undivided.

    A row with a non-finite logit (NaN or inf: an fp16 overflow upstream, say) is never confident:
    its uncertainty is NaN, it does not exit, its streak is 0 and its recorded argmax 0. It goes on
    to the next layer and, if every student stays unsure of it, gets the teacher's answer, which is
    what the unpatched model gives. Every backend does exactly this.
    """
    finite = torch.isfinite(logits).all(dim=-1)
    u = torch.where(finite, uncertainty(logits, criterion, temperature), float("nan"))
    prediction = torch.where(finite, logits.argmax(dim=-1), 0)
    exits, new_streak = update_streak(prediction, u, speed, patience, streak)
    return ExitHeadOutput(logits, u, exits, new_streak)


def compact(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    keep: torch.Tensor,
    trim: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Gather the kept rows of every per-sample tensor, in order; optionally trim the sequence axis.

    Args:
        hidden: ``[N, S, H]``; mask: ``[N, S]`` int64; rows: ``[N]`` int64 original row indices;
        keep: ``[N]`` bool, True for survivors; trim: cut S to S' = the index after the last column
        that any kept row uses.
    Returns:
        ``hidden [M, S', H]``, ``mask [M, S']``, ``rows [M]`` with M = keep.sum(), all contiguous
        (the inputs themselves when every row is kept and nothing is trimmed), and ``padded``: whether
        some kept row has a masked column within the first S' (then the layers need a mask).
    """
    n, s = mask.shape
    if n == 0:  # nobody to keep: the trimmed length is 0
        length = 0 if trim else s
        return hidden[:, :length].contiguous(), mask[:, :length].contiguous(), rows, False
    real = mask != 0
    last_used = (real * torch.arange(1, s + 1, device=mask.device)).amax(dim=1)  # [N]
    length = torch.where(keep, last_used, 0).amax() if trim else torch.tensor(s, device=mask.device)
    fewest = torch.where(keep, real.sum(dim=1), s).amin()
    # One host read for the three numbers that size the outputs (one device sync on a GPU).
    survivors, length, fewest = host_read(torch.stack([keep.sum(), length, fewest]))
    padded = fewest < length
    if survivors == n and length == s:
        return hidden, mask, rows, padded  # everyone stays, nothing trimmed: no copy
    # A stable sort puts the kept rows first, in their order, without nonzero()'s own sync.
    index = torch.argsort(~keep, stable=True)[:survivors]
    hidden, mask, rows = hidden.index_select(0, index), mask.index_select(0, index), rows.index_select(0, index)
    return hidden[:, :length].contiguous(), mask[:, :length].contiguous(), rows, padded
