"""Ahead-of-time compilation of every Triton kernel for GPUs this machine does not have, with
registers and spills from ``ptxas -v``.

    python -m fastbert_kernels.ops.triton_aot [--json out.json]

:func:`compile_report` runs this in a subprocess with ``TRITON_INTERPRET`` unset, so callers that
use the interpreter (the tests) can still compile the real kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# sm_80 (A100), sm_90 (H100/H200), sm_100 (B200): the GPUs these kernels are meant for.
CAPABILITIES = (80, 90, 100)
DTYPES = ("float32", "bfloat16")
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# Branch widths and class counts the kernels must serve: the paper's 128 and up to BERT-base's
# hidden size 768, from 2 classes to 1,000.
SIZE_GRID = ((128, 2), (128, 1000), (384, 77), (768, 257), (768, 1000))


def _ptxas(capability: int) -> str | None:
    """The ptxas Triton itself uses for this GPU (its PTX may be newer than the system CUDA's)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, AttributeError, RuntimeError):
        return shutil.which("ptxas")


def _ptxas_usage(ptx: str, capability: int) -> dict[str, int | None]:
    """Registers and spill bytes that ``ptxas -v`` reports for the PTX (None where ptxas is absent)."""
    ptxas = _ptxas(capability)
    if ptxas is None:
        return {"registers": None, "spill_stores": None, "spill_loads": None}
    # Triton targets the architecture-specific variant (sm_90a), so ptxas must be told the same.
    target = re.search(r"\.target\s+(sm_\w+)", ptx)
    arch = target.group(1) if target else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", str(path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": int(stores.group(1)) if stores else None,
        "spill_loads": int(loads.group(1)) if loads else None,
    }


def _compile_row(name: str, spec, capability: int, with_ptxas: bool, **extra) -> dict:
    from . import triton_backend

    compiled = triton_backend.aot_compile(spec, capability)
    ptx = compiled.asm["ptx"]
    fn = spec.kernel
    usage = _ptxas_usage(ptx, capability) if with_ptxas else {}
    return {
        "kernel": name,
        "function": fn.__name__,
        "capability": capability,
        "num_warps": spec.num_warps,
        "ptx_target_ok": f".target sm_{capability}" in ptx and fn.__name__ in ptx,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": SHARED_LIMIT_BYTES[capability],
        **usage,
        **extra,
    }


def compile_all(r: int = 128, c: int = 77) -> list[dict]:
    """Compiles every kernel in this process (no interpreter), in three sets of rows:

    * ``paper``: branch width ``r``, ``c`` classes, every dtype and capability, with ptxas
      registers and spills;
    * ``grid``: every (R, C) of :data:`SIZE_GRID` in bfloat16, for shared memory against each
      capability's limit;
    * ``ones``: each integer parameter of each kernel compiled at the value 1 (as Triton's JIT
      specialises it), for sm_90;
    * ``criteria``: the exit tail for every exit criterion, with and without a patience state,
      for sm_90.
    """
    import torch

    from . import triton_backend
    from .types import EXIT_CRITERIA

    rows = []
    for dtype_name in DTYPES:
        for name, spec in triton_backend.aot_specs(dtype=getattr(torch, dtype_name), r=r, c=c).items():
            for capability in CAPABILITIES:
                rows.append(_compile_row(name, spec, capability, True, set="paper", dtype=dtype_name, r=r, c=c))
    for grid_r, grid_c in SIZE_GRID:
        for name, spec in triton_backend.aot_specs(dtype=torch.bfloat16, r=grid_r, c=grid_c).items():
            for capability in CAPABILITIES:
                rows.append(
                    _compile_row(name, spec, capability, False, set="grid", dtype="bfloat16", r=grid_r, c=grid_c)
                )
    for trim in (True, False):
        specs = triton_backend.aot_specs(dtype=torch.float32, r=r, c=c, trim=trim)
        for name, spec in specs.items():
            if name == "compact_plan" or trim:  # only the plan kernel depends on trim
                for parameter in triton_backend.integer_parameters(spec):
                    one = triton_backend.respecialize(spec, frozenset({parameter}))
                    rows.append(
                        _compile_row(name, one, 90, False, set="ones", dtype="float32", one=parameter, trim=trim)
                    )
    for criterion in EXIT_CRITERIA:
        for with_streak in (False, True):
            spec = triton_backend.aot_specs(r=r, c=c, criterion=criterion, with_streak=with_streak)["exit_tail"]
            rows.append(
                _compile_row(
                    "exit_tail",
                    spec,
                    90,
                    True,
                    set="criteria",
                    dtype="float32",
                    r=r,
                    c=c,
                    criterion=criterion,
                    streak=with_streak,
                )
            )
    return rows


def compile_report(r: int = 128, c: int = 77, timeout: float = 600) -> list[dict]:
    """:func:`compile_all` in a fresh interpreter with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        subprocess.run(
            [sys.executable, "-m", "fastbert_kernels.ops.triton_aot", "--json", str(out), "-r", str(r), "-c", str(c)],
            env=env,
            check=True,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("-r", type=int, default=128, help="branch width (the paper: 128)")
    parser.add_argument("-c", type=int, default=77, help="classes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = compile_all(args.r, args.c)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    for row in rows:
        if row["set"] == "paper":
            print(
                f"{row['kernel']:15s} {row['dtype']:9s} sm_{row['capability']:<3}  registers "
                f"{row['registers']!s:>4}  spills {row['spill_stores']}/{row['spill_loads']} B  "
                f"shared {row['shared_bytes']} B  cubin {row['cubin_bytes']} B"
            )
    worst = max((r for r in rows if r["set"] == "grid"), key=lambda r: r["shared_bytes"] / r["shared_limit"])
    print(
        f"largest shared memory over R x C = {list(SIZE_GRID)}: {worst['shared_bytes']} B "
        f"({worst['kernel']}, R={worst['r']}, C={worst['c']}, sm_{worst['capability']} allows {worst['shared_limit']})"
    )
    print(f"{sum(r['set'] == 'ones' for r in rows)} compilations with an integer argument at 1: all compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
