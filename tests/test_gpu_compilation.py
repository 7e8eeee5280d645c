"""GPU code checked without a GPU: every Triton kernel compiled ahead of time for sm_80 and sm_90,
every .cu file compiled by nvcc for both. A kernel that passes the interpreter but does not
compile for a GPU is broken."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

triton_backend = pytest.importorskip("fastbert_kernels.ops.triton_backend")
if triton_backend.IMPORT_ERROR is not None:
    pytest.skip(triton_backend.IMPORT_ERROR, allow_module_level=True)

from fastbert_kernels.ops.triton_aot import CAPABILITIES, DTYPES, compile_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
KERNELS = sorted(triton_backend.aot_specs())


@pytest.fixture(scope="module")
def paper_sizes() -> dict[tuple[str, str, int], dict]:
    """Every kernel compiled once (in a subprocess, since the tests run the interpreter) at the
    paper's branch width 128 and 77 classes."""
    return {(row["kernel"], row["dtype"], row["capability"]): row for row in compile_report(r=128, c=77)}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_compiles_for_gpu(paper_sizes, kernel, capability, dtype):
    row = paper_sizes[(kernel, dtype, capability)]
    assert row["ptx_target_ok"], row
    assert row["cubin_bytes"] > 0
    if row["registers"] is not None:  # ptxas -v ran
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{kernel} spills: {row}"


def test_triton_kernels_compile_for_other_sizes():
    rows = compile_report(r=48, c=3)
    assert {row["kernel"] for row in rows} == set(KERNELS)
    assert all(row["ptx_target_ok"] and row["cubin_bytes"] > 0 for row in rows)


def test_aot_refuses_interpreted_kernels():
    spec = triton_backend.aot_specs()["compact_gather"]
    if triton_backend.interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            triton_backend.aot_compile(spec, 80)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    result = subprocess.run(
        [
            "nvcc",
            "-c",
            "-std=c++20",
            f"-arch={arch}",
            "-Werror",
            "all-warnings",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(source),
            "-o",
            str(tmp_path / "out.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_sources_exist():
    assert {p.name for p in CUDA_SOURCES} == {"exit_head.cu", "compact.cu"}
