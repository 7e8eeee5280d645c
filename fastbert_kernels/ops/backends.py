"""Which kernels implement the ops on each device, and the one place that changes it.

Backends:

* ``extension``: the compiled C++ extension (``fastbert_kernels._C``): CPU kernels, and CUDA
  kernels when built with CUDA. They register themselves with the dispatcher, from C++, when the
  extension loads, so a call on CPU tensors never re-enters Python.
* ``triton``: the Triton kernels, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``,
  Triton's interpreter: slow, for testing).
* ``torch``: plain-torch kernels over the same folded weights; registered as every op's default.

Automatic choice: CUDA tensors -> ``triton``, else ``extension``, else ``torch``; CPU tensors ->
``extension``, else ``torch``. ``FASTBERT_KERNELS_BACKEND`` forces one (and fails loudly, at the
first op call, when it cannot be honoured). The choice becomes a dispatcher registration for the
device's key; it is re-read on every op call, so changing the variable takes effect at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable

import torch

from . import compiled, torch_kernels
from .library import NAMESPACE, SCHEMAS

ENV_VAR = "FASTBERT_KERNELS_BACKEND"
OP_NAMES = tuple(SCHEMAS)
# Names of earlier releases, for an error that says what they became.
_RENAMED = {"reference": "torch", "cpu": "extension", "cuda": "extension"}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """name; devices() it runs on; available() -> (ok, why); python_kernel(op) -> its Python kernel,
    or None where the backend registers its kernels itself (the C++ extension)."""

    name: str
    devices: Callable[[], frozenset[str]]
    available: Callable[[], tuple[bool, str]]
    python_kernel: Callable[[str], Callable | None]


def _triton_kernel(name: str) -> Callable:
    # Triton is imported on first use only: `import fastbert_kernels` must not pay for it or fail
    # without it, and TRITON_INTERPRET must be read when the kernels' module is imported.
    def call(*args):
        from . import triton_backend

        return getattr(triton_backend, name)(*args)

    return call


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> tuple[bool, str]:
    # Without importing triton (seconds): choosing a backend at import must not pay for it.
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed; pip install triton"
    if _triton_interpreted():
        return True, "Triton interpreter (TRITON_INTERPRET=1; CPU tensors too, slow)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on CPU)"
    return True, "Triton on CUDA"


def _triton_devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if _triton_interpreted() else frozenset({"cuda"})


def _extension_devices() -> frozenset[str]:
    return frozenset({"cpu", "cuda"}) if compiled.BUILD_INFO.get("cuda") else frozenset({"cpu"})


def _extension_available() -> tuple[bool, str]:
    ok, why = compiled.cpu_available()
    if not ok:
        return ok, why
    cuda_ok, cuda_why = compiled.cuda_available()
    return True, f"{why}; CUDA: {cuda_why if not cuda_ok else 'yes, ' + cuda_why}"


BACKENDS: dict[str, Backend] = {
    "extension": Backend("extension", _extension_devices, _extension_available, lambda name: None),
    "triton": Backend("triton", _triton_devices, _triton_available, _triton_kernel),
    "torch": Backend(
        "torch", lambda: frozenset({"cpu", "cuda"}), lambda: (True, "plain torch"), lambda n: getattr(torch_kernels, n)
    ),
}

AUTOMATIC_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "extension", "torch"), "cpu": ("extension", "torch")}


def forced_backend() -> str | None:
    """The backend named by ``FASTBERT_KERNELS_BACKEND``, or None when unset/empty."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    return name or None


def _runs(backend: Backend, device_type: str) -> bool:
    if device_type not in backend.devices():
        return False
    if backend.name == "extension" and device_type == "cuda":
        return compiled.cuda_available()[0]
    return backend.available()[0]


@functools.cache
def _select(device_type: str, forced: str | None) -> Backend:
    if forced is not None:
        if forced not in BACKENDS:
            hint = f" ({forced!r} is now {_RENAMED[forced]!r})" if forced in _RENAMED else ""
            raise BackendUnavailableError(
                f"{ENV_VAR}={forced!r} is not a backend{hint}; choose one of {sorted(BACKENDS)}"
            )
        backend = BACKENDS[forced]
        ok, why = backend.available()
        if not ok:
            raise BackendUnavailableError(f"{ENV_VAR}={forced} cannot be honoured: {why}")
        if not _runs(backend, device_type):
            raise BackendUnavailableError(
                f"{ENV_VAR}={forced} does not run on {device_type} tensors here "
                f"(it runs on {sorted(backend.devices())})"
            )
        return backend
    for name in AUTOMATIC_ORDER.get(device_type, ("torch",)):
        if _runs(BACKENDS[name], device_type):
            return BACKENDS[name]
    raise BackendUnavailableError(f"no backend runs on {device_type} tensors")


def select_backend(device: torch.device) -> Backend:
    """The backend that runs ops on ``device``: forced by the environment, or chosen automatically."""
    return _select(device.type, forced_backend())


# Per device type: the (forced value, backend) last applied, and the Library holding the Python
# kernels registered for it (None when the extension's C++ kernels or the default serve it).
_applied: dict[str, tuple[str | None, str]] = {}
_registrations: dict[str, torch.library.Library] = {}
_lock = threading.Lock()


def ensure_registered(device: torch.device) -> None:
    """Makes the dispatcher run the selected backend's kernels for ``device``'s type. A dictionary
    lookup when nothing changed; raises :class:`BackendUnavailableError` for an impossible choice."""
    forced = forced_backend()
    applied = _applied.get(device.type)
    if applied is not None and applied[0] == forced:
        return
    backend = _select(device.type, forced)
    with _lock:
        _register(device.type, backend)
        _applied[device.type] = (forced, backend.name)


def _register(device_type: str, backend: Backend) -> None:
    old = _registrations.pop(device_type, None)
    if old is not None:
        old._destroy()  # the dispatcher falls back to what was there before: C++ kernels or the default
    key = _DISPATCH_KEYS.get(device_type)
    kernels = {name: backend.python_kernel(name) for name in OP_NAMES}
    if key is None or any(k is None for k in kernels.values()):
        return
    library = torch.library.Library(NAMESPACE, "IMPL")
    with warnings.catch_warnings():
        # Registering over the extension's C++ kernel for the same key is the point here; torch
        # warns about it once per process.
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        warnings.filterwarnings("ignore", message=".*other operators may also be overridden.*")
        for name, kernel in kernels.items():
            library.impl(name, kernel, key)
    _registrations[device_type] = library


def active_backend(device_type: str) -> str | None:
    """The backend whose kernels the dispatcher runs for ``device_type`` now (None before any call)."""
    applied = _applied.get(device_type)
    return None if applied is None else applied[1]


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
            rows[chosen]["used_for"] = (rows[chosen].get("used_for", "") + " " + device_type).strip()
        except BackendUnavailableError as err:
            rows.setdefault("error", {})[device_type] = str(err)
    return rows
