"""The one place where a backend is chosen for a device.

Automatic choice: CUDA tensors -> ``triton``, else ``cuda`` (the compiled CUDA extension), else
``reference``; CPU tensors -> ``cpu`` (the C++ extension), else ``reference``. The environment
variable ``FASTBERT_KERNELS_BACKEND`` (``reference``, ``cpu``, ``triton``, ``cuda``) forces one and
fails loudly when it cannot be honoured. ``TRITON_INTERPRET=1`` lets the ``triton`` backend run on
CPU tensors (Triton's interpreter; slow, for testing).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import torch

from . import compiled, reference
from .types import BranchWeights

ENV_VAR = "FASTBERT_KERNELS_BACKEND"

ExitHeadFn = Callable[
    [torch.Tensor, torch.Tensor, BranchWeights, int, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]
# hidden, mask, rows, keep, trim -> kept hidden, mask, rows and whether they still carry padding.
CompactFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool],
]


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    exit_head: ExitHeadFn
    compact: CompactFn
    devices: Callable[[], frozenset[str]]
    available: Callable[[], tuple[bool, str]]


def _triton_available() -> tuple[bool, str]:
    from . import triton_backend

    return triton_backend.available()


def _triton_devices() -> frozenset[str]:
    from . import triton_backend

    return triton_backend.devices()


def _lazy_triton(name: str) -> Callable:
    # Triton is imported on first use only: `import fastbert_kernels` must not pay for it or fail
    # without it, and TRITON_INTERPRET must be read when the kernels' module is imported.
    def call(*args):
        from . import triton_backend

        return getattr(triton_backend, name)(*args)

    return call


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference",
        reference.exit_head,
        reference.compact,
        lambda: frozenset({"cpu", "cuda"}),
        lambda: (True, "plain torch"),
    ),
    "cpu": Backend("cpu", compiled.exit_head, compiled.compact, lambda: frozenset({"cpu"}), compiled.cpu_available),
    "triton": Backend("triton", _lazy_triton("exit_head"), _lazy_triton("compact"), _triton_devices, _triton_available),
    "cuda": Backend("cuda", compiled.exit_head, compiled.compact, lambda: frozenset({"cuda"}), compiled.cuda_available),
}

AUTOMATIC_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def forced_backend() -> str | None:
    """The backend named by ``FASTBERT_KERNELS_BACKEND``, or None when unset/empty."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    return name or None


@functools.cache
def _select(device_type: str, forced: str | None) -> Backend:
    if forced is not None:
        if forced not in BACKENDS:
            raise BackendUnavailableError(f"{ENV_VAR}={forced!r} is not a backend; choose one of {sorted(BACKENDS)}")
        backend = BACKENDS[forced]
        ok, why = backend.available()
        if not ok:
            raise BackendUnavailableError(f"{ENV_VAR}={forced} cannot be honoured: {why}")
        if device_type not in backend.devices():
            raise BackendUnavailableError(
                f"{ENV_VAR}={forced} does not run on {device_type} tensors (it runs on {sorted(backend.devices())})"
            )
        return backend
    for name in AUTOMATIC_ORDER.get(device_type, ("reference",)):
        backend = BACKENDS[name]
        if device_type in backend.devices() and backend.available()[0]:
            return backend
    raise BackendUnavailableError(f"no backend runs on {device_type} tensors")


def select_backend(device: torch.device) -> Backend:
    """The backend that runs ops on ``device``: forced by the environment, or chosen automatically."""
    return _select(device.type, forced_backend())


def report() -> dict[str, dict[str, str]]:
    """For every backend: whether it is available, why, and for which devices it is the choice."""
    rows = {}
    for name, backend in BACKENDS.items():
        ok, why = backend.available()
        rows[name] = {"available": "yes" if ok else "no", "detail": why}
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        try:
            chosen = _select(device_type, forced_backend()).name
            rows[chosen].setdefault("used_for", "")
            rows[chosen]["used_for"] = (rows[chosen]["used_for"] + " " + device_type).strip()
        except BackendUnavailableError as err:
            rows.setdefault("error", {})[device_type] = str(err)
    return rows
