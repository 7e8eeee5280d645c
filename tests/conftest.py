"""Shared fixtures: fresh random seeds every run, tiny random models, forced backends.

Triton's interpreter must be switched on before the kernels' module is imported, so it is set
here, first, on machines without CUDA; the Triton backend then runs on CPU tensors.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastbert_kernels.ops import BACKENDS, ENV_VAR

# A new seed every run (so inputs are fresh), printed in the header; FASTBERT_TEST_SEED=N replays one.
SESSION_SEED = int(os.environ.get("FASTBERT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"fastbert_kernels test seed: {SESSION_SEED} (replay with FASTBERT_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    return seed


def available_backends() -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.available()[0] and "cpu" in backend.devices()]


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch):
    """Forces each backend that can run on CPU here, through the environment variable users set."""
    monkeypatch.setenv(ENV_VAR, request.param)
    return request.param
