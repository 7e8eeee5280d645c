"""The public ops registered with torch's dispatcher, with fake implementations for torch.compile.

``fastbert::exit_head`` and ``fastbert::compact`` each have one schema; their kernels route to the
backend that :func:`backends.select_backend` picks for the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import select_backend
from .types import BranchWeights


@torch.library.custom_op("fastbert::exit_head", mutates_args=())
def exit_head(
    hidden: Tensor,
    mask: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_qkv: Tensor,
    b_qkv: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    w_pool: Tensor,
    b_pool: Tensor,
    w_cls: Tensor,
    b_cls: Tensor,
    num_heads: int,
    speed: float,
) -> tuple[Tensor, Tensor, Tensor]:
    weights = BranchWeights(w_in, b_in, w_qkv, b_qkv, w_out, b_out, w_pool, b_pool, w_cls, b_cls)
    return select_backend(hidden.device).exit_head(hidden, mask, weights, num_heads, speed)


@exit_head.register_fake
def _exit_head_fake(
    hidden, mask, w_in, b_in, w_qkv, b_qkv, w_out, b_out, w_pool, b_pool, w_cls, b_cls, num_heads, speed
):
    n, c = hidden.shape[0], w_cls.shape[0]
    return (
        hidden.new_empty((n, c), dtype=torch.float32),
        hidden.new_empty((n,), dtype=torch.float32),
        hidden.new_empty((n,), dtype=torch.bool),
    )


@torch.library.custom_op("fastbert::compact", mutates_args=())
def compact(hidden: Tensor, mask: Tensor, rows: Tensor, keep: Tensor, trim: bool) -> tuple[Tensor, Tensor, Tensor]:
    out = select_backend(hidden.device).compact(hidden, mask, rows, keep, trim)[:3]
    # Backends hand back their inputs when nothing changes; a registered op must not alias them.
    return tuple(o.clone() if o is i else o for o, i in zip(out, (hidden, mask, rows), strict=True))


@compact.register_fake
def _compact_fake(hidden, mask, rows, keep, trim):
    ctx = torch.library.get_ctx()
    survivors = ctx.new_dynamic_size()
    length = ctx.new_dynamic_size() if trim else hidden.shape[1]
    return (
        hidden.new_empty((survivors, length, hidden.shape[2])),
        mask.new_empty((survivors, length)),
        rows.new_empty((survivors,)),
    )
