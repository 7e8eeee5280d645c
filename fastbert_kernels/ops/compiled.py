"""The C++ extension (``fastbert_kernels._C``): CPU kernels, and CUDA kernels when built with CUDA.

Loading it registers its kernels as the CPU and CUDA implementations of the ops defined in
:mod:`.library` (imported first, so the schemas exist). Importing this module never fails: a
missing or broken build (including a kernel whose C++ signature no longer matches its schema,
which the dispatcher refuses) is recorded in ``LOAD_ERROR``.
"""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (defines the schemas the extension registers against)

try:
    from .. import _C

    BUILD_INFO: dict = dict(_C.build_info())
    LOAD_ERROR: str | None = None
except ImportError as err:  # not built (a source checkout without `pip install -e .`)
    BUILD_INFO = {}
    LOAD_ERROR = f"fastbert_kernels._C is not importable ({err}); build it with `make install`"
except RuntimeError as err:  # built, but the dispatcher refused a registration
    BUILD_INFO = {}
    LOAD_ERROR = f"fastbert_kernels._C does not match the ops' schemas ({err}); rebuild it with `make install`"


def cpu_available() -> tuple[bool, str]:
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    return True, "C++ extension" + (" with OpenMP" if BUILD_INFO.get("openmp") else " WITHOUT OpenMP (one thread)")


def built_architectures() -> list[int]:
    """Compute capabilities (e.g. 80, 90) the CUDA kernels carry machine code for; the last also
    carries PTX, which the driver compiles for any newer GPU."""
    return [int(a) for a in BUILD_INFO.get("cuda_archs", "").replace(",", ";").split(";") if a]


def runs_on_capability(capability: tuple[int, int], archs: list[int]) -> bool:
    """Whether a build for ``archs`` runs on a GPU of ``capability`` (major, minor): machine code for
    sm_XY runs on the same major with minor >= Y; the newest architecture's PTX runs on anything newer."""
    major, minor = capability
    if not archs:
        return False
    if any(a // 10 == major and a % 10 <= minor for a in archs):
        return True
    return major * 10 + minor >= archs[-1]


def cuda_available() -> tuple[bool, str]:
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    if not BUILD_INFO.get("cuda"):
        return False, "the C++ extension was built without CUDA (torch has no CUDA, or FASTBERT_SKIP_CUDA=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    archs = built_architectures()
    capability = torch.cuda.get_device_capability()
    if not runs_on_capability(capability, archs):
        return False, (
            f"the CUDA kernels were built for sm_{archs} but this GPU is sm_{capability[0]}{capability[1]}; "
            "rebuild with FASTBERT_CUDA_ARCH_LIST including it"
        )
    return True, f"CUDA extension (sm_{'/'.join(map(str, archs))}, PTX for newer)"
