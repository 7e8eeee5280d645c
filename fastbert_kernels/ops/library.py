"""The ops' single definition: their schemas, fake implementations and plain-torch default kernels.

Three ops in the ``fastbert`` namespace, each defined here once and implemented per device:

* ``exit_head(Tensor hidden, Tensor mask, Tensor[] weights, int num_heads, float speed,``
  ``str criterion="entropy", float temperature=1., int patience=1, Tensor? streak=None)``
  ``-> (Tensor logits, Tensor uncertainty, Tensor exits, Tensor streak)``: the fused branch
  classifier, softmax, the criterion's uncertainty (:data:`.types.EXIT_CRITERIA`, of logits / T)
  and the exit decision with patience, over the folded weights (:class:`.types.FoldedWeights`, in
  the order of its fields, which every language unpacks them in); ``streak [N, 2]`` is the rows'
  patience state (:func:`.reference.update_streak`), in and out.
* ``compact_plan(Tensor keep, Tensor mask, bool trim) -> (Tensor index, Tensor stats)``: which rows
  survive (``index[:count]``, in order; -1 after) and ``stats = [count, length, fewest]``: survivors, the
  sequence length they need, and the fewest real tokens of a survivor (``< length``: padding left).
* ``compact_gather(Tensor hidden, Tensor mask, Tensor rows, Tensor index, SymInt count,``
  ``SymInt length) -> (Tensor hidden, Tensor mask, Tensor rows)``: fresh tensors holding the rows
  ``index[:count]`` cut to ``length`` tokens (never views of the inputs).

Compaction is two ops because its output sizes are data: the caller reads ``stats`` once (the one
host sync of a layer on a GPU) and calls the gather only when something changes.

Implementations: the plain-torch kernels of :mod:`.torch_kernels` are registered here as the
default (``CompositeExplicitAutograd``: any device without a kernel of its own); the C++ extension
registers its CPU and CUDA kernels from C++ when it loads (``csrc/ops.cpp``); :mod:`.backends`
registers Triton for CUDA and honours ``FASTBERT_KERNELS_BACKEND``. Eager calls and compiled graphs
reach the same kernels through the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_kernels
from .types import FoldedWeights

NAMESPACE = "fastbert"

SCHEMAS = {
    "exit_head": (
        "exit_head(Tensor hidden, Tensor mask, Tensor[] weights, int num_heads, float speed, "
        'str criterion="entropy", float temperature=1., int patience=1, Tensor? streak=None) '
        "-> (Tensor logits, Tensor uncertainty, Tensor exits, Tensor streak)"
    ),
    "compact_plan": "compact_plan(Tensor keep, Tensor mask, bool trim) -> (Tensor index, Tensor stats)",
    "compact_gather": (
        "compact_gather(Tensor hidden, Tensor mask, Tensor rows, Tensor index, SymInt count, SymInt length) "
        "-> (Tensor hidden, Tensor mask, Tensor rows)"
    ),
}

# Kept alive for the life of the process: a Library that is garbage-collected deregisters its ops.
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _LIBRARY.define(_schema)
for _name in SCHEMAS:
    _LIBRARY.impl(_name, getattr(torch_kernels, _name), "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::exit_head")
def _exit_head_fake(
    hidden: Tensor,
    mask: Tensor,
    weights: list[Tensor],
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: Tensor | None = None,
):
    n, c = hidden.shape[0], FoldedWeights(*weights).b_cls.shape[0]
    return (
        hidden.new_empty((n, c), dtype=torch.float32),
        hidden.new_empty((n,), dtype=torch.float32),
        hidden.new_empty((n,), dtype=torch.bool),
        hidden.new_empty((n, 2), dtype=torch.int64),
    )


@torch.library.register_fake(f"{NAMESPACE}::compact_plan")
def _compact_plan_fake(keep: Tensor, mask: Tensor, trim: bool):
    return mask.new_empty((mask.shape[0],)), mask.new_empty((3,))


@torch.library.register_fake(f"{NAMESPACE}::compact_gather")
def _compact_gather_fake(hidden: Tensor, mask: Tensor, rows: Tensor, index: Tensor, count, length):
    return (
        hidden.new_empty((count, length, hidden.shape[2])),
        mask.new_empty((count, length)),
        rows.new_empty((count,)),
    )


def op(name: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.fastbert.<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name)
