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

CAPABILITIES = (80, 90)
DTYPES = ("float32", "bfloat16")


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


def compile_all(r: int = 128, c: int = 77) -> list[dict]:
    """Compiles every kernel for every capability and dtype in this process (no interpreter)."""
    import torch

    from . import triton_backend

    rows = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for name, spec in triton_backend.aot_specs(dtype=dtype, r=r, c=c).items():
            fn = spec.kernel
            for capability in CAPABILITIES:
                compiled = triton_backend.aot_compile(spec, capability)
                ptx = compiled.asm["ptx"]
                rows.append(
                    {
                        "kernel": name,
                        "function": fn.__name__,
                        "dtype": dtype_name,
                        "capability": capability,
                        "num_warps": spec.num_warps,
                        "ptx_target_ok": f".target sm_{capability}" in ptx and fn.__name__ in ptx,
                        "cubin_bytes": len(compiled.asm["cubin"]),
                        **_ptxas_usage(ptx, capability),
                    }
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
        print(
            f"{row['kernel']:15s} {row['dtype']:9s} sm_{row['capability']}  registers {row['registers']!s:>4}  "
            f"spills {row['spill_stores']}/{row['spill_loads']} B  cubin {row['cubin_bytes']} B"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
