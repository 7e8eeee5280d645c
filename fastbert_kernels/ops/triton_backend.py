"""Host side of the Triton kernels: launch configuration (chosen in one helper), launchers, and
ahead-of-time compilation for GPUs this machine does not have."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import torch

from . import folding
from .types import BranchWeights

try:
    import triton

    from . import triton_kernels as kernels

    IMPORT_ERROR: str | None = None
except ImportError as err:  # triton is optional
    triton = None
    kernels = None
    IMPORT_ERROR = f"triton is not importable ({err}); pip install triton"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if interpreted() else frozenset({"cuda"})


def available() -> tuple[bool, str]:
    if IMPORT_ERROR is not None:
        return False, IMPORT_ERROR
    if interpreted():
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1; CPU tensors too, slow)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on CPU)"
    return True, f"Triton {triton.__version__} on CUDA"


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    """Tile sizes of the exit-head kernels for branch width R, heads*R = QK and C classes."""

    block_r: int
    block_o: int
    block_s: int
    block_n: int
    block_k: int
    block_c: int
    num_warps: int = 4
    # The tail holds [BLOCK_N, BLOCK_R] and [BLOCK_N, BLOCK_C] accumulators plus weight tiles:
    # at 4 warps ptxas needs 255 registers and spills on sm_90, at 8 it does not.
    tail_warps: int = 8

    @classmethod
    def for_sizes(cls, r: int, c: int) -> ExitHeadConfig:
        block_r = _pow2(r)
        # Keep every [rows, BLOCK_R] register tile at <= 4096 float32 (32 registers a thread at 4 warps).
        return cls(
            block_r=block_r,
            block_o=max(16, 4096 // block_r),
            block_s=max(1, 4096 // block_r),
            block_n=16,
            block_k=32,
            block_c=_pow2(c),
        )


# The plan kernel scans a [BLOCK_N, BLOCK_S] int64 tile of the mask: 128 x 16 keeps it in
# registers (256 x 64 spilled 7 KB a thread in ptxas -v).
COMPACT_BLOCK_N = 128
COMPACT_BLOCK_S = 16
GATHER_BLOCK = 1024


def exit_head(
    hidden: torch.Tensor, mask: torch.Tensor, weights: BranchWeights, num_heads: int, speed: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = folding.folded(weights, num_heads, hidden.dtype)
    n, s, h = hidden.shape
    r, c = w.b_in.shape[0], w.b_cls.shape[0]
    qk = num_heads * r
    logits = torch.empty(n, c, dtype=torch.float32, device=hidden.device)
    uncertainty = torch.empty(n, dtype=torch.float32, device=hidden.device)
    exits = torch.empty(n, dtype=torch.bool, device=hidden.device)
    if n == 0:
        return logits, uncertainty, exits
    cfg = ExitHeadConfig.for_sizes(r, c)
    projected = hidden.reshape(n * s, h) @ w.w_in.T  # the vendor GEMM, in hidden's dtype
    mask = mask.contiguous()
    query = torch.empty(n, qk, dtype=torch.float32, device=hidden.device)
    zbar = torch.empty(n, qk, dtype=torch.float32, device=hidden.device)
    kernels._cls_query_kernel[(n, triton.cdiv(qk, cfg.block_o))](
        projected,
        w.b_in,
        w.w_qk,
        w.b_qk,
        query,
        s,
        r,
        qk,
        BLOCK_R=cfg.block_r,
        BLOCK_O=cfg.block_o,
        num_warps=cfg.num_warps,
    )
    kernels._cls_attention_kernel[(n, num_heads)](
        projected,
        mask,
        w.b_in,
        query,
        zbar,
        s,
        r,
        qk,
        BLOCK_S=cfg.block_s,
        BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps,
    )
    kernels._exit_tail_kernel[(triton.cdiv(n, cfg.block_n),)](
        zbar,
        w.w_ov,
        w.b_ov,
        w.w_pool,
        w.b_pool,
        w.w_cls,
        w.b_cls,
        logits,
        uncertainty,
        exits.view(torch.int8),
        n,
        r,
        qk,
        c,
        math.log(c),
        float(speed),
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        BLOCK_C=cfg.block_c,
        num_warps=cfg.tail_warps,
    )
    return logits, uncertainty, exits


def compact(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, trim: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, mask, rows, keep = hidden.contiguous(), mask.contiguous(), rows.contiguous(), keep.contiguous()
    n, s, h = hidden.shape
    index = torch.empty(n, dtype=torch.int64, device=hidden.device)
    # Without a kernel launch (no rows) the result is empty with the untrimmed length when not trimming.
    stats = torch.tensor([0, 0 if trim else s], dtype=torch.int64, device=hidden.device)
    if n:
        kernels._compact_plan_kernel[(1,)](
            keep.view(torch.int8),
            mask,
            index,
            stats,
            n,
            s,
            TRIM=trim,
            BLOCK_N=COMPACT_BLOCK_N,
            BLOCK_S=COMPACT_BLOCK_S,
        )
    # The one host sync of a layer: the survivors' count and length size the outputs.
    survivors, length = stats.tolist()
    if survivors == n and length == s:  # everyone stays, nothing trimmed: no copy
        return hidden, mask, rows
    hidden_out = torch.empty(survivors, length, h, dtype=hidden.dtype, device=hidden.device)
    mask_out = torch.empty(survivors, length, dtype=mask.dtype, device=mask.device)
    rows_out = torch.empty(survivors, dtype=rows.dtype, device=rows.device)
    if survivors:
        grid = (survivors, max(1, triton.cdiv(length * h, GATHER_BLOCK)))
        kernels._compact_gather_kernel[grid](
            hidden, mask, rows, index, hidden_out, mask_out, rows_out, s, h, length, BLOCK=GATHER_BLOCK
        )
    return hidden_out, mask_out, rows_out


# ---- Ahead-of-time compilation (no GPU needed) -------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AotSpec(NamedTuple):
    """A kernel as the launchers above run it: signature, constexprs and warps."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


def aot_specs(dtype: torch.dtype = torch.float32, r: int = 128, c: int = 2, trim: bool = True) -> dict[str, AotSpec]:
    """Each kernel with the signature and constexprs the launchers above use for these sizes:
    ``{name: (kernel, signature, constexprs)}``, for :func:`aot_compile`."""
    cfg = ExitHeadConfig.for_sizes(r, c)
    t = _TRITON_TYPES[dtype]
    return {
        "cls_query": AotSpec(
            kernels._cls_query_kernel,
            {
                "a_ptr": f"*{t}",
                "b_in_ptr": "*fp32",
                "w_qk_ptr": "*fp32",
                "b_qk_ptr": "*fp32",
                "q_ptr": "*fp32",
                "S": "i32",
                "R": "i32",
                "QK": "i32",
                "BLOCK_R": "constexpr",
                "BLOCK_O": "constexpr",
            },
            {"BLOCK_R": cfg.block_r, "BLOCK_O": cfg.block_o},
            cfg.num_warps,
        ),
        "cls_attention": AotSpec(
            kernels._cls_attention_kernel,
            {
                "a_ptr": f"*{t}",
                "mask_ptr": "*i64",
                "b_in_ptr": "*fp32",
                "q_ptr": "*fp32",
                "zbar_ptr": "*fp32",
                "S": "i32",
                "R": "i32",
                "QK": "i32",
                "BLOCK_S": "constexpr",
                "BLOCK_R": "constexpr",
            },
            {"BLOCK_S": cfg.block_s, "BLOCK_R": cfg.block_r},
            cfg.num_warps,
        ),
        "exit_tail": AotSpec(
            kernels._exit_tail_kernel,
            {
                "zbar_ptr": "*fp32",
                "w_ov_ptr": "*fp32",
                "b_ov_ptr": "*fp32",
                "w_pool_ptr": "*fp32",
                "b_pool_ptr": "*fp32",
                "w_cls_ptr": "*fp32",
                "b_cls_ptr": "*fp32",
                "logits_ptr": "*fp32",
                "uncertainty_ptr": "*fp32",
                "exits_ptr": "*i8",
                "N": "i32",
                "R": "i32",
                "QK": "i32",
                "C": "i32",
                "log_classes": "fp32",
                "speed": "fp32",
                "BLOCK_N": "constexpr",
                "BLOCK_R": "constexpr",
                "BLOCK_K": "constexpr",
                "BLOCK_C": "constexpr",
            },
            {"BLOCK_N": cfg.block_n, "BLOCK_R": cfg.block_r, "BLOCK_K": cfg.block_k, "BLOCK_C": cfg.block_c},
            cfg.tail_warps,
        ),
        "compact_plan": AotSpec(
            kernels._compact_plan_kernel,
            {
                "keep_ptr": "*i8",
                "mask_ptr": "*i64",
                "index_ptr": "*i64",
                "stats_ptr": "*i64",
                "N": "i32",
                "S": "i32",
                "TRIM": "constexpr",
                "BLOCK_N": "constexpr",
                "BLOCK_S": "constexpr",
            },
            {"TRIM": trim, "BLOCK_N": COMPACT_BLOCK_N, "BLOCK_S": COMPACT_BLOCK_S},
            4,
        ),
        "compact_gather": AotSpec(
            kernels._compact_gather_kernel,
            {
                "hidden_ptr": f"*{t}",
                "mask_ptr": "*i64",
                "rows_ptr": "*i64",
                "index_ptr": "*i64",
                "hidden_out_ptr": f"*{t}",
                "mask_out_ptr": "*i64",
                "rows_out_ptr": "*i64",
                "S": "i32",
                "H": "i32",
                "LENGTH": "i32",
                "BLOCK": "constexpr",
            },
            {"BLOCK": GATHER_BLOCK},
            4,
        ),
    }


def aot_compile(spec: AotSpec, capability: int):
    """Compiles a Triton kernel for ``sm_<capability>`` without a GPU; returns the compiled kernel
    (``.asm['ptx']``, ``.asm['cubin']``, ``.n_regs``, ``.n_spills`` where the backend fills them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreted():
        raise RuntimeError(
            "TRITON_INTERPRET=1 turns the kernels into interpreter objects that cannot be compiled; "
            "run `python -m fastbert_kernels.ops.triton_aot` (it unsets the variable in a subprocess)"
        )
    source = ASTSource(spec.kernel, spec.signature, spec.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": spec.num_warps})
