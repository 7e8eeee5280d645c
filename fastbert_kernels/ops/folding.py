"""Cache of folded exit-head weights, so a layer's branch is folded once, not on every call.

An entry belongs to the exact tensor objects it was folded from (held by weak reference) and
records their version counters: an in-place update (an optimiser step, ``load_state_dict``) bumps
a version and so refolds, and an entry disappears with its tensors. Keying on storage addresses
alone would be unsafe: a freed tensor's address is soon reused (torch's CUDA caching allocator
hands it straight back), and a new model would then get an old model's folding.
Thread-safe: several threads running one model share the entries, which are never mutated.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .types import BranchWeights, FoldedWeights

# Re-entrant: a weak-reference callback (_forget) can run during garbage collection triggered
# inside a locked section of this same thread.
_lock = threading.RLock()
# id(w_in) -> (weak references to the 10 tensors, {(num_heads, dtype, versions): folded})
_cache: dict[int, tuple[tuple[weakref.ref, ...], dict[tuple, FoldedWeights]]] = {}


def _forget(anchor_id: int) -> None:
    with _lock:
        _cache.pop(anchor_id, None)


def folded(weights: BranchWeights, num_heads: int, dtype: torch.dtype) -> FoldedWeights:
    """The folded weights for hidden states of ``dtype`` (``w_in`` is cast to it), cached."""
    anchor = id(weights.w_in)
    signature = (num_heads, dtype, *(t._version for t in weights))
    with _lock:
        entry = _cache.get(anchor)
        if entry is not None and all(ref() is t for ref, t in zip(entry[0], weights, strict=True)):
            hit = entry[1].get(signature)
            if hit is not None:
                return hit
    with torch.no_grad():
        result = weights.fold(num_heads)
        result = result._replace(w_in=result.w_in.to(dtype).contiguous())
    with _lock:
        entry = _cache.get(anchor)
        if entry is None or not all(ref() is t for ref, t in zip(entry[0], weights, strict=True)):
            refs = tuple(weakref.ref(t, lambda _, key=anchor: _forget(key)) for t in weights)
            entry = (refs, {})
            _cache[anchor] = entry
        # Older versions of these tensors are gone for good; keep the current one per (heads, dtype).
        stale = [k for k in entry[1] if k[:2] == signature[:2]]
        for key in stale:
            del entry[1][key]
        entry[1][signature] = result
    return result


def cache_size() -> int:
    """Number of weight sets with folded entries (for tests and diagnostics)."""
    with _lock:
        return len(_cache)


def clear() -> None:
    with _lock:
        _cache.clear()
