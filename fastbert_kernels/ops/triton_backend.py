"""Host side of the Triton kernels: launch configuration (chosen in one helper), launchers, and
ahead-of-time compilation for GPUs this machine does not have."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .sync_counter import counted_launch
from .types import (
    EXIT_CRITERIA,
    BranchWeights,
    FoldedWeights,
    check_exit_rule,
    check_folded_weights,
    check_hidden_and_mask,
    check_streak,
)

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


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    """Tile sizes of the exit-head kernels for branch width R (the tail's tiles do not depend on
    R or C: it loops over both, so shared memory stays bounded for any width and class count)."""

    block_r: int
    block_o: int
    block_s: int
    block_n: int = 16  # tl.dot needs M >= 16
    block_j: int = 64
    # 16 (tl.dot's least K): with 32 the tail sat at sm_80's 255 registers and spilled once the
    # exit criteria's top-two pass was added; 16 needs 168 and spills nothing on sm_80/90/100.
    block_k: int = 16
    num_warps: int = 4
    tail_warps: int = 4

    @classmethod
    def for_width(cls, r: int) -> ExitHeadConfig:
        block_r = _pow2(r)
        # Keep every [rows, BLOCK_R] register tile at <= 4096 float32 (32 registers a thread at 4 warps).
        config = cls(block_r=block_r, block_o=max(1, 4096 // block_r), block_s=max(1, 4096 // block_r))
        if interpreted():
            # The interpreter pays per tile step in Python, not per byte of shared memory: wider
            # tiles run the same loops (still several steps at R >= 256 or C > 128) 4x faster.
            config = dataclasses.replace(config, block_j=128, block_k=128)
        return config


# The plan kernel scans a [BLOCK_N, BLOCK_S] int64 tile of the mask: 128 x 16 keeps it in
# registers (256 x 64 spilled 7 KB a thread in ptxas -v).
COMPACT_BLOCK_N = 128
COMPACT_BLOCK_S = 16
GATHER_BLOCK = 1024


class Launch(NamedTuple):
    """One kernel launch as the host code below makes it: what AOT compilation replays."""

    kernel: object
    args: tuple
    constexprs: dict[str, object]
    num_warps: int


_recorded: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("fastbert_triton_record", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within this block the launchers record their launches instead of running them (the
    outputs stay uninitialised): :func:`aot_specs` derives every kernel's signature from them."""
    launches: list[Launch] = []
    token = _recorded.set(launches)
    try:
        yield launches
    finally:
        _recorded.reset(token)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device and its stream; a tensor on cuda:1 needs that
    device made current for the launch (the CUDA binding does the same with a CUDAGuard)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, grid: tuple[int, ...], device: torch.device, *args, num_warps: int, **constexprs) -> None:
    launches = _recorded.get()
    if launches is not None:
        launches.append(Launch(kernel, args, constexprs, num_warps))
        return
    with counted_launch(), device_guard(device):
        kernel[grid](*args, num_warps=num_warps, **constexprs)


def exit_head(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weights: list[torch.Tensor],
    num_heads: int,
    speed: float,
    criterion: str = "entropy",
    temperature: float = 1.0,
    patience: int = 1,
    streak: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fastbert::exit_head`` op on Triton: the vendor GEMM, then three kernels."""
    # Reached through the dispatcher too, past the Python wrapper's checks: the C++ binding's
    # checks here (the kernels index the weights by these shapes and read them as float32).
    check_exit_rule(criterion, temperature, patience)
    check_hidden_and_mask(hidden, mask)
    if not 0.0 <= speed <= 1.0:
        raise ValueError(f"speed must be in [0, 1], got {speed}")
    w = FoldedWeights(*weights)
    check_folded_weights(hidden, w, num_heads)
    hidden = hidden.contiguous()
    n, s, h = hidden.shape
    r, c = w.b_in.shape[0], w.b_cls.shape[0]
    qk = num_heads * r
    device = hidden.device
    logits = torch.empty(n, c, dtype=torch.float32, device=device)
    uncertainty = torch.empty(n, dtype=torch.float32, device=device)
    exits = torch.empty(n, dtype=torch.bool, device=device)
    new_streak = torch.empty(n, 2, dtype=torch.int64, device=device)
    if n == 0:
        return logits, uncertainty, exits, new_streak
    if s == 0:  # the kernels read token 0 (the CLS query) of every row
        raise ValueError("hidden has an empty sequence axis (S = 0)")
    check_streak(streak, n, device)
    if streak is not None:
        streak = streak.contiguous()
    cfg = ExitHeadConfig.for_width(r)
    projected = hidden.reshape(n * s, h) @ w.w_in.T  # the vendor GEMM, in hidden's dtype
    mask = mask.contiguous()
    # One allocation for the per-row intermediates: query [QK] | zbar [QK] | out [R] | pooled [R].
    scratch = torch.empty(n, 2 * qk + 2 * r, dtype=torch.float32, device=device)
    query, zbar, tail = scratch[:, :qk], scratch[:, qk : 2 * qk], scratch[:, 2 * qk :]
    stride = scratch.stride(0)
    _launch(
        kernels._cls_query_kernel,
        (n, triton.cdiv(qk, cfg.block_o)),
        device,
        projected,
        w.b_in,
        w.w_qk,
        w.b_qk,
        query,
        s,
        r,
        qk,
        stride,
        BLOCK_R=cfg.block_r,
        BLOCK_O=cfg.block_o,
        num_warps=cfg.num_warps,
    )
    _launch(
        kernels._cls_attention_kernel,
        (n, num_heads),
        device,
        projected,
        mask,
        w.b_in,
        query,
        zbar,
        s,
        r,
        stride,
        BLOCK_S=cfg.block_s,
        BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps,
    )
    _launch(
        kernels._exit_tail_kernel,
        (triton.cdiv(n, cfg.block_n),),
        device,
        zbar,
        w.w_ov,
        w.b_ov,
        w.w_pool,
        w.b_pool,
        w.w_cls,
        w.b_cls,
        tail,
        new_streak if streak is None else streak,  # not read without HAS_STREAK
        logits,
        uncertainty,
        exits.view(torch.int8),
        new_streak,
        n,
        r,
        qk,
        c,
        stride,
        math.log(c),
        float(speed),
        1.0 / temperature,
        patience,
        CRITERION=EXIT_CRITERIA.index(criterion),
        HAS_STREAK=streak is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_J=cfg.block_j,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.tail_warps,
    )
    return logits, uncertainty, exits, new_streak


def compact_plan(keep: torch.Tensor, mask: torch.Tensor, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fastbert::compact_plan`` op: ``index [N]`` (kept rows first, in order), ``stats [3]``."""
    keep, mask = keep.contiguous(), mask.contiguous()
    n, s = mask.shape
    if n == 0:  # nothing to scan: no launch
        return mask.new_empty((0,)), torch.tensor([0, 0 if trim else s, s], device=mask.device)
    index = torch.full((n,), -1, dtype=torch.int64, device=mask.device)  # the kernel writes index[:count]
    stats = torch.empty(3, dtype=torch.int64, device=mask.device)
    _launch(
        kernels._compact_plan_kernel,
        (1,),
        mask.device,
        keep.view(torch.int8),
        mask,
        index,
        stats,
        n,
        s,
        TRIM=trim,
        BLOCK_N=COMPACT_BLOCK_N,
        BLOCK_S=COMPACT_BLOCK_S,
        num_warps=4,
    )
    return index, stats


def compact_gather(
    hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, survivors: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fastbert::compact_gather`` op: rows ``index[:survivors]``, cut to ``length`` tokens."""
    hidden, mask, rows, index = hidden.contiguous(), mask.contiguous(), rows.contiguous(), index.contiguous()
    _, s, h = hidden.shape
    hidden_out = torch.empty(survivors, length, h, dtype=hidden.dtype, device=hidden.device)
    mask_out = torch.empty(survivors, length, dtype=mask.dtype, device=mask.device)
    rows_out = torch.empty(survivors, dtype=rows.dtype, device=rows.device)
    if survivors:
        grid = (survivors, max(1, triton.cdiv(length * h, GATHER_BLOCK)))
        _launch(
            kernels._compact_gather_kernel,
            grid,
            hidden.device,
            hidden,
            mask,
            rows,
            index,
            hidden_out,
            mask_out,
            rows_out,
            s,
            h,
            length,
            BLOCK=GATHER_BLOCK,
            num_warps=4,
        )
    return hidden_out, mask_out, rows_out


# ---- Ahead-of-time compilation (no GPU needed) -------------------------------------------------

_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
}


class AotSpec(NamedTuple):
    """A kernel as the launchers above run it: signature, constexprs and warps."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def spec_of(launch: Launch) -> AotSpec:
    """The AOT signature of a recorded launch, read from the kernel's own parameter names and the
    real arguments (so it cannot drift from the launcher)."""
    names = [name for name in launch.kernel.arg_names if name not in launch.constexprs]
    if len(names) != len(launch.args):
        raise TypeError(f"{launch.kernel.__name__}: {len(launch.args)} launch arguments for parameters {names}")
    signature = {name: _triton_type(value) for name, value in zip(names, launch.args, strict=True)}
    signature.update(dict.fromkeys(launch.constexprs, "constexpr"))
    return AotSpec(launch.kernel, signature, dict(launch.constexprs), launch.num_warps)


def respecialize(spec: AotSpec, ones: frozenset[str]) -> AotSpec:
    """``spec`` with the integer parameters ``ones`` compiled at the value 1: Triton's JIT turns an
    integer argument equal to 1 into a compile-time constant, so a kernel must compile that way."""
    signature = {name: "constexpr" if name in ones else kind for name, kind in spec.signature.items()}
    return spec._replace(signature=signature, constexprs={**spec.constexprs, **dict.fromkeys(ones, 1)})


def integer_parameters(spec: AotSpec) -> list[str]:
    return [name for name, kind in spec.signature.items() if kind in ("i32", "i64")]


def aot_specs(
    dtype: torch.dtype = torch.float32,
    r: int = 128,
    c: int = 2,
    trim: bool = True,
    criterion: str = "entropy",
    with_streak: bool = False,
) -> dict[str, AotSpec]:
    """Every kernel with the signature and constexprs the launchers above use for hidden states of
    ``dtype``, branch width ``r``, ``c`` classes, the exit ``criterion`` and, ``with_streak``, a
    patience state from the previous student (``{name: AotSpec}``, for :func:`aot_compile`).
    Derived by running the launchers on small CPU tensors with launches recorded, not restated."""
    n, s, h, heads = 3, 5, 16, 2
    hidden = torch.zeros(n, s, h, dtype=dtype)
    mask = torch.ones(n, s, dtype=torch.int64)
    weights = BranchWeights(*(torch.zeros(shape) for shape in BranchWeights.shapes(h, r, c))).fold(heads, dtype)
    rows, keep = torch.arange(n), torch.tensor([True, False, True])
    with recording() as launches:
        streak = torch.zeros(n, 2, dtype=torch.int64) if with_streak else None
        exit_head(hidden, mask, list(weights), heads, 0.5, criterion, 1.0, 2 if with_streak else 1, streak)
        index, _ = compact_plan(keep, mask, trim)
        compact_gather(hidden, mask, rows, index, 2, s)
    names = ("cls_query", "cls_attention", "exit_tail", "compact_plan", "compact_gather")
    return {name: spec_of(launch) for name, launch in zip(names, launches, strict=True)}


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
