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


# Every device this machine has: on a GPU machine the same command checks every backend on CUDA too.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def backend_cases() -> list[tuple[str, str]]:
    """(backend, device) for every available backend on every device it runs on here."""
    return [
        (name, device)
        for device in DEVICES
        for name, backend in BACKENDS.items()
        if backend.available()[0] and device in backend.devices()
    ]


@pytest.fixture(params=backend_cases(), ids=lambda case: f"{case[0]}-{case[1]}")
def backend_case(request, monkeypatch) -> tuple[str, str]:
    """Forces each backend, through the environment variable users set, on each device it runs on."""
    monkeypatch.setenv(ENV_VAR, request.param[0])
    return request.param


@pytest.fixture
def backend(backend_case) -> str:
    return backend_case[0]


@pytest.fixture
def device(backend_case) -> torch.device:
    """The device the forced backend is tested on: tests put their tensors and models there."""
    return torch.device(backend_case[1])
