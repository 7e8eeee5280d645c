"""GPU code checked without a GPU: every Triton kernel compiled ahead of time for sm_80 and sm_90,
every .cu file compiled by nvcc for both. A kernel that passes the interpreter but does not
compile for a GPU is broken."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

triton_backend = pytest.importorskip("fastbert_kernels.ops.triton_backend")
if triton_backend.IMPORT_ERROR is not None:
    pytest.skip(triton_backend.IMPORT_ERROR, allow_module_level=True)

from fastbert_kernels.ops.triton_aot import CAPABILITIES, DTYPES, SIZE_GRID, compile_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
KERNELS = sorted(triton_backend.aot_specs())


@pytest.fixture(scope="module")
def report() -> list[dict]:
    """Every kernel compiled once (in a subprocess, since the tests run the interpreter): the
    paper's branch width 128 with 77 classes, the (R, C) grid, and each integer argument at 1."""
    return compile_report(r=128, c=77)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_compiles_for_gpu(report, kernel, capability, dtype):
    (row,) = [
        r
        for r in report
        if (r["set"], r["kernel"], r["dtype"], r["capability"]) == ("paper", kernel, dtype, capability)
    ]
    assert row["ptx_target_ok"], row
    assert row["cubin_bytes"] > 0
    # Triton ships its own ptxas, so the spill check always runs.
    assert row["registers"] is not None, f"ptxas -v gave no register count: {row}"
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{kernel} spills: {row}"


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("r,c", SIZE_GRID)
def test_triton_shared_memory_fits_every_gpu(report, r, c, capability):
    rows = [x for x in report if x["set"] == "grid" and (x["r"], x["c"], x["capability"]) == (r, c, capability)]
    assert {x["kernel"] for x in rows} == set(KERNELS)
    for row in rows:
        assert row["ptx_target_ok"] and row["cubin_bytes"] > 0, row
        assert row["shared_bytes"] <= row["shared_limit"], f"{row['kernel']} needs too much shared memory: {row}"


def test_every_integer_argument_compiles_at_one(report):
    """Triton's JIT turns an integer argument equal to 1 into a constant; each must still compile."""
    compiled = {(r["kernel"], r["one"], r["trim"]) for r in report if r["set"] == "ones" and r["cubin_bytes"] > 0}
    for trim in (True, False):
        for name, spec in triton_backend.aot_specs(trim=trim).items():
            if name == "compact_plan" or trim:
                for parameter in triton_backend.integer_parameters(spec):
                    assert (name, parameter, trim) in compiled


def test_exit_tail_compiles_for_every_criterion_and_patience_state(report):
    from fastbert_kernels.ops import EXIT_CRITERIA

    rows = [r for r in report if r["set"] == "criteria"]
    assert {(r["criterion"], r["streak"]) for r in rows} == {(c, s) for c in EXIT_CRITERIA for s in (False, True)}
    assert all(r["ptx_target_ok"] and r["cubin_bytes"] > 0 for r in rows), rows
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), rows  # sm_90


def test_aot_specs_follow_the_kernels_signatures():
    # Derived from the launchers, so every kernel parameter is there, in the kernel's own order.
    for spec in triton_backend.aot_specs().values():
        assert list(spec.signature) == list(spec.kernel.arg_names)


def test_aot_refuses_interpreted_kernels():
    spec = triton_backend.aot_specs()["compact_gather"]
    if triton_backend.interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            triton_backend.aot_compile(spec, 80)


def test_triton_launch_guards_the_tensors_device():
    """A launch makes the tensors' GPU current (Triton launches on the current device)."""
    import contextlib

    assert isinstance(triton_backend.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = triton_backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def _nvcc(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = ["nvcc", "-c", "-std=c++20", *flags, f"-I{ROOT / 'csrc' / 'include'}", str(source), "-o", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    result = _nvcc(source, tmp_path / "out.o", f"-arch={arch}", "-Werror", "all-warnings")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_kernels_use_no_local_memory(tmp_path):
    """ptxas -v: no stack frame (a per-thread array indexed at run time lands there) and no spills."""
    for source in CUDA_SOURCES:
        result = _nvcc(source, tmp_path / "out.o", "-arch=sm_90", "-Xptxas", "-v")
        assert result.returncode == 0, result.stderr
        frames = re.findall(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr
        )
        assert frames, result.stderr
        assert all(f == ("0", "0", "0") for f in frames), f"{source.name}: {result.stderr}"


def test_cuda_sources_exist():
    assert {p.name for p in CUDA_SOURCES} == {"exit_head.cu", "compact.cu"}
