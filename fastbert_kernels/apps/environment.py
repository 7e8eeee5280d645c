"""Versions, build and backend facts: the ``env`` report, and the header of every results file."""

from __future__ import annotations

import platform

import torch


def environment() -> dict:
    """Versions, build and backend facts, for the env report and every results file."""
    import transformers

    from .. import __version__
    from ..ops import compiled, report
    from ..ops.triton_backend import IMPORT_ERROR as triton_error

    facts = {
        "fastbert_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": "missing" if triton_error else __import__("triton").__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "extension_build": compiled.BUILD_INFO or compiled.LOAD_ERROR,
    }
    facts["backends"] = report()
    return facts
