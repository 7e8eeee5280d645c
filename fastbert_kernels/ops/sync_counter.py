"""Counting host syncs and kernel launches of a forward pass, for tests and the GPU check.

Every host read the package makes on purpose goes through :func:`host_read` (``tolist()`` is not
visible to a dispatch mode), and :func:`counting` adds a dispatch mode that sees every other way
a tensor's value reaches the host (``item()``, ``bool()``, ``nonzero``, a copy to the CPU), for
instance a check inside transformers. On a CPU these are host reads; on a GPU each one is a
device-to-host synchronisation, which is what they are counted for. Dispatched ops that do
arithmetic (not views or allocations) and Triton launches approximate the kernels a GPU would
run; ``torch.cuda.set_sync_debug_mode`` and the profiler measure the real ones on a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_aten = torch.ops.aten
# Ops whose result needs the tensor's values on the host (a sync on a GPU).
_SYNCING = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
}
# Ops that move no data and launch nothing.
_FREE = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.detach.default,
    _aten.lift_fresh.default,
}


@dataclasses.dataclass
class Counts:
    """host_reads: reads through :func:`host_read`; other_syncs: any other value read to the host;
    ops: dispatched ops that compute or copy; triton_launches: Triton kernels launched."""

    host_reads: int = 0
    other_syncs: int = 0
    ops: int = 0
    triton_launches: int = 0
    sync_sources: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def syncs(self) -> int:
        return self.host_reads + self.other_syncs

    @property
    def launches(self) -> int:
        return self.ops + self.triton_launches


_active: contextvars.ContextVar[Counts | None] = contextvars.ContextVar("fastbert_sync_counts", default=None)


def host_read(tensor: torch.Tensor) -> list:
    """``tensor.tolist()``, counted: the package's deliberate device-to-host reads all go here."""
    counts = _active.get()
    if counts is not None:
        counts.host_reads += 1
        counts.sync_sources["host_read"] += 1
    return tensor.tolist()


def counted_launch() -> contextlib.AbstractContextManager:
    """Around one Triton launch: counts it, and hides what the launch itself dispatches (under
    ``TRITON_INTERPRET=1`` the interpreter runs the kernel as torch ops, which a GPU would not)."""
    counts = _active.get()
    if counts is None:
        return contextlib.nullcontext()
    counts.triton_launches += 1
    return _disable_current_modes()


def _is_device_to_host(func, args, kwargs) -> bool:
    if func is _aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if func is _aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING or _is_device_to_host(func, args, kwargs):
            self.counts.other_syncs += 1
            self.counts.sync_sources[str(func)] += 1
        elif func not in _FREE and not func.is_view:
            self.counts.ops += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Counts host syncs and launches of whatever runs inside the block (this thread)."""
    counts = Counts()
    token = _active.set(counts)
    try:
        with _CountingMode(counts):
            yield counts
    finally:
        _active.reset(token)
