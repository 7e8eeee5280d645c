"""Cache of folded exit-head weights, so a layer's branch is folded once, not on every call.

Keyed on each tensor's storage pointer and version counter: an in-place update of a parameter
(an optimiser step, ``load_state_dict``) bumps the version and so refolds. Thread-safe: several
threads running one model share the entries, which are never mutated.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .types import BranchWeights, FoldedWeights

_MAX_ENTRIES = 256
_cache: OrderedDict[tuple, FoldedWeights] = OrderedDict()
_lock = threading.Lock()


def _key(weights: BranchWeights, num_heads: int, dtype: torch.dtype) -> tuple:
    return (num_heads, dtype, *((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in weights))


def folded(weights: BranchWeights, num_heads: int, dtype: torch.dtype) -> FoldedWeights:
    """The folded weights for hidden states of ``dtype`` (``w_in`` is cast to it), cached."""
    key = _key(weights, num_heads, dtype)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    with torch.no_grad():
        result = weights.fold(num_heads)
        result = result._replace(w_in=result.w_in.to(dtype).contiguous())
    with _lock:
        _cache[key] = result
        while len(_cache) > _MAX_ENTRIES:
            _cache.popitem(last=False)
    return result


def clear() -> None:
    with _lock:
        _cache.clear()
