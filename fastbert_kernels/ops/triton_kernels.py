"""Triton kernels of the exit head and of compaction (CUDA tensors; CPU under TRITON_INTERPRET=1).

Exit head, after the vendor GEMM ``a = x W_in^T`` (``[N, S, R]``, hidden's dtype):
  1. ``_cls_query_kernel``     q'_j = W_qk,j tanh(a_0 + b_in) + b_qk,j           grid (N, QK / BLOCK_O)
  2. ``_cls_attention_kernel`` zbar_j = softmax_s(z_s . q'_j) z_s, online over S   grid (N, heads)
  3. ``_exit_tail_kernel``     out = W_ov zbar + b_ov; logits = W_cls tanh(W_pool out + b_pool) + b_cls;
                               online softmax and top-2, the criterion's uncertainty,
                               patience, exit decision                           grid (N / BLOCK_N)
                               (tiled over R and C: any branch width, any class count)
Compaction: ``_compact_plan_kernel`` (one program: ordered prefix sum of the keep flags, longest
kept row, fewest real tokens), then ``_compact_gather_kernel`` (one program per kept row and
chunk: plain copies).

Every load is cast to float32 before arithmetic: the interpreter's bf16 arithmetic and tl.exp/
tl.log need it, and the kernels accumulate in float32 anyway. ``tl.dot`` runs with
``input_precision="ieee"`` so that float32 products are not rounded to tf32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .types import EXIT_CRITERIA

# The criteria as the kernel's CRITERION constexpr: positions in EXIT_CRITERIA, the names' one list.
ENTROPY = tl.constexpr(EXIT_CRITERIA.index("entropy"))
MAX_PROB = tl.constexpr(EXIT_CRITERIA.index("max_prob"))
MARGIN = tl.constexpr(EXIT_CRITERIA.index("margin"))


@triton.jit
def _tanh(x):
    # tanh from exp, in float32; sign-split so the exponent never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _cls_query_kernel(
    a_ptr,
    b_in_ptr,
    w_qk_ptr,
    b_qk_ptr,
    q_ptr,
    S,
    R,
    QK,
    ROW_STRIDE,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    k = tl.arange(0, BLOCK_R)
    k_ok = k < R
    a0 = tl.load(a_ptr + row * S * R + k, mask=k_ok, other=0.0).to(tl.float32)
    b_in = tl.load(b_in_ptr + k, mask=k_ok, other=0.0)
    z0 = tl.where(k_ok, _tanh(a0 + b_in), 0.0)
    o = block * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < QK
    w = tl.load(w_qk_ptr + o[:, None] * R + k[None, :], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
    q = tl.sum(w * z0[None, :], axis=1) + tl.load(b_qk_ptr + o, mask=o_ok, other=0.0)
    tl.store(q_ptr + row * ROW_STRIDE + o, q, mask=o_ok)


@triton.jit
def _cls_attention_kernel(
    a_ptr,
    mask_ptr,
    b_in_ptr,
    q_ptr,
    zbar_ptr,
    S,
    R,
    ROW_STRIDE,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    k = tl.arange(0, BLOCK_R)
    k_ok = k < R
    b_in = tl.load(b_in_ptr + k, mask=k_ok, other=0.0)
    q = tl.load(q_ptr + row * ROW_STRIDE + head * R + k, mask=k_ok, other=0.0)
    running_max = tl.full([], float("-inf"), tl.float32)
    denominator = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < S
        valid = tl.load(mask_ptr + row * S + s, mask=s_ok, other=0) != 0
        a = tl.load(a_ptr + (row * S + s)[:, None] * R + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0).to(
            tl.float32
        )
        z = tl.where(k_ok[None, :], _tanh(a + b_in[None, :]), 0.0)
        score = tl.where(valid, tl.sum(z * q[None, :], axis=1), float("-inf"))
        new_max = tl.maximum(running_max, tl.max(score, axis=0))
        # A block with no valid token keeps new_max = -inf; shift by 0 then, so no inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_scale = tl.exp(running_max - shift)
        p = tl.exp(score - shift)
        denominator = denominator * old_scale + tl.sum(p, axis=0)
        acc = acc * old_scale + tl.sum(p[:, None] * z, axis=0)
        running_max = new_max
    tl.store(zbar_ptr + row * ROW_STRIDE + head * R + k, acc / denominator, mask=k_ok)


@triton.jit
def _linear_tile(
    x_ptr,
    x_stride,
    w_ptr,
    rows,
    rows_ok,
    j,
    j_ok,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``x[rows, :K] @ W[j, :K]^T`` as a ``[BLOCK_N, BLOCK_J]`` float32 tile, K-chunked: the weight
    tile is ``[BLOCK_K, BLOCK_J]`` whatever R and C are, so shared memory stays bounded."""
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        kk_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * x_stride + kk[None, :], mask=rows_ok[:, None] & kk_ok[None, :], other=0.0)
        w = tl.load(w_ptr + j[None, :] * K + kk[:, None], mask=j_ok[None, :] & kk_ok[:, None], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    return acc


@triton.jit
def _exit_tail_kernel(
    zbar_ptr,
    w_ov_ptr,
    b_ov_ptr,
    w_pool_ptr,
    b_pool_ptr,
    w_cls_ptr,
    b_cls_ptr,
    scratch_ptr,
    streak_in_ptr,
    logits_ptr,
    uncertainty_ptr,
    exits_ptr,
    streak_out_ptr,
    N,
    R,
    QK,
    C,
    ROW_STRIDE,
    log_classes,
    speed,
    inv_temperature,
    patience,
    CRITERION: tl.constexpr,
    HAS_STREAK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    rows64 = rows.to(tl.int64)
    # Every stage is tiled over its output columns (BLOCK_J) and its inputs (BLOCK_K), so the
    # kernel works for any branch width and class count; out and pooled go through this
    # program's own rows of a global scratch [N, 2R] (L2-resident), with a block barrier between
    # stages so that every thread sees the whole row.
    # scratch[:, :R] = out, scratch[:, R:2R] = pooled (rows ROW_STRIDE apart, as zbar's).
    for j_start in range(0, R, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        j_ok = j < R
        acc = _linear_tile(zbar_ptr, ROW_STRIDE, w_ov_ptr, rows64, rows_ok, j, j_ok, QK, BLOCK_N, BLOCK_J, BLOCK_K)
        acc += tl.load(b_ov_ptr + j, mask=j_ok, other=0.0)[None, :]
        tl.store(scratch_ptr + rows64[:, None] * ROW_STRIDE + j[None, :], acc, mask=rows_ok[:, None] & j_ok[None, :])
    tl.debug_barrier()
    for j_start in range(0, R, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        j_ok = j < R
        acc = _linear_tile(scratch_ptr, ROW_STRIDE, w_pool_ptr, rows64, rows_ok, j, j_ok, R, BLOCK_N, BLOCK_J, BLOCK_K)
        pooled = _tanh(acc + tl.load(b_pool_ptr + j, mask=j_ok, other=0.0)[None, :])
        tl.store(
            scratch_ptr + R + rows64[:, None] * ROW_STRIDE + j[None, :], pooled, mask=rows_ok[:, None] & j_ok[None, :]
        )
    tl.debug_barrier()
    # logits = pooled W_cls^T + b_cls, tile by tile over the classes. The decision works on
    # x = logits / T, with online statistics: for e_c = exp(x_c - m), S = sum e_c and
    # A = sum e_c (x_c - m), so that p_top1 = 1 / S and H = log S - A / S; a new running max m'
    # rescales S and A by exp(m - m') (A also gains (m - m') S).
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c_start in range(0, C, BLOCK_J):
        c = c_start + tl.arange(0, BLOCK_J)
        c_ok = c < C
        logits = _linear_tile(
            scratch_ptr + R, ROW_STRIDE, w_cls_ptr, rows64, rows_ok, c, c_ok, R, BLOCK_N, BLOCK_J, BLOCK_K
        )
        logits += tl.load(b_cls_ptr + c, mask=c_ok, other=0.0)[None, :]
        tl.store(logits_ptr + rows64[:, None] * C + c[None, :], logits, mask=rows_ok[:, None] & c_ok[None, :])
        masked = tl.where(c_ok[None, :], logits * inv_temperature, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(masked, axis=1))
        # First tile: total = 0, so the (-inf) shift must not reach the arithmetic (0 * inf).
        shift = tl.where(total > 0, running_max - new_max, 0.0)
        scale = tl.exp(shift)
        centred = tl.where(c_ok[None, :], masked - new_max[:, None], 0.0)
        e = tl.where(c_ok[None, :], tl.exp(centred), 0.0)
        weighted = scale * (weighted + shift * total) + tl.sum(e * centred, axis=1)
        total = scale * total + tl.sum(e, axis=1)
        running_max = new_max
    # The first argmax and the runner-up, from the logits this program just stored (L2-resident):
    # a second, light pass, so that the GEMM loop above carries no more state (it spilled on sm_80
    # when it did). With m = max x: argmax = the first c with x_c = m; the runner-up is m when m
    # occurs twice, else the largest x_c < m.
    tl.debug_barrier()
    # C is only the identity of the min-reduction below: a finite row always meets its maximum
    # (x is recomputed from the same stored float32), and a non-finite row records 0 at the end.
    argmax = tl.full([BLOCK_N], C, tl.int32)
    ties = tl.zeros([BLOCK_N], dtype=tl.int32)
    nonfinite = tl.zeros([BLOCK_N], dtype=tl.int32)
    below = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for c_start in range(0, C, BLOCK_J):
        c = c_start + tl.arange(0, BLOCK_J)
        c_ok = c < C
        stored = tl.load(logits_ptr + rows64[:, None] * C + c[None, :], mask=rows_ok[:, None] & c_ok[None, :])
        x = tl.where(c_ok[None, :], stored * inv_temperature, float("-inf"))
        top = (x == running_max[:, None]) & c_ok[None, :]
        argmax = tl.minimum(argmax, tl.min(tl.where(top, c[None, :], C), axis=1))
        ties += tl.sum(top.to(tl.int32), axis=1)
        below = tl.maximum(below, tl.max(tl.where(top, float("-inf"), x), axis=1))
        # NaN != NaN, and |inf| is the only value above the largest float.
        bad = ((stored != stored) | (tl.abs(stored) > 3.4028234663852886e38)) & c_ok[None, :]
        nonfinite += tl.sum(bad.to(tl.int32), axis=1)
    second = tl.where(ties > 1, running_max, below)
    if CRITERION == MAX_PROB:
        uncertainty = 1.0 - 1.0 / total
    elif CRITERION == MARGIN:
        uncertainty = 1.0 - (1.0 - tl.exp(second - running_max)) / total
    else:
        uncertainty = (tl.log(total) - weighted / total) / log_classes
    # A row with a non-finite logit is never confident: u = NaN, recorded argmax 0 (as in
    # fastbert/exit_head_math.h). tl.maximum/tl.minimum drop NaN, so the clamp must not see it.
    finite = nonfinite == 0
    uncertainty = tl.where(finite, tl.minimum(tl.maximum(uncertainty, 0.0), 1.0), float("nan"))
    # Patience: how many students in a row were confident and agreed (fastbert/exit_rule.h).
    argmax64 = tl.where(finite, argmax, 0).to(tl.int64)
    streak = tl.full([BLOCK_N], 1, tl.int64)
    if HAS_STREAK:
        previous_argmax = tl.load(streak_in_ptr + 2 * rows64, mask=rows_ok, other=-1)
        previous_streak = tl.load(streak_in_ptr + 2 * rows64 + 1, mask=rows_ok, other=0)
        streak = tl.where(previous_argmax == argmax64, previous_streak + 1, streak)
    streak = tl.where(uncertainty < speed, streak, 0)
    tl.store(uncertainty_ptr + rows64, uncertainty, mask=rows_ok)
    tl.store(exits_ptr + rows64, (streak >= patience).to(tl.int8), mask=rows_ok)
    tl.store(streak_out_ptr + 2 * rows64, argmax64, mask=rows_ok)
    tl.store(streak_out_ptr + 2 * rows64 + 1, streak, mask=rows_ok)


@triton.jit
def _compact_plan_kernel(
    keep_ptr,
    mask_ptr,
    index_ptr,
    stats_ptr,
    N,
    S,
    TRIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # stats = [kept rows, kept length, fewest real tokens in a kept row]: the host reads all three
    # in its one sync of the layer; the last tells whether the survivors still carry padding.
    zero = tl.zeros([], dtype=tl.int64)
    # S may arrive as a compile-time constant (Triton specialises an integer argument equal to 1),
    # so it is widened by arithmetic rather than by a method call.
    seq = zero + S
    count = zero
    longest = zero
    fewest = seq
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < N
        keep = tl.load(keep_ptr + n, mask=n_ok, other=0).to(tl.int64)
        position = count + tl.cumsum(keep, axis=0) - 1
        tl.store(index_ptr + position, n.to(tl.int64), mask=n_ok & (keep != 0))
        count += tl.sum(keep, axis=0)
        length = tl.zeros([BLOCK_N], dtype=tl.int64)
        tokens = tl.zeros([BLOCK_N], dtype=tl.int64)
        for s_start in range(0, S, BLOCK_S):
            s = s_start + tl.arange(0, BLOCK_S)
            m = tl.load(
                mask_ptr + n[:, None].to(tl.int64) * S + s[None, :], mask=n_ok[:, None] & (s < S)[None, :], other=0
            )
            used = tl.where(m != 0, s[None, :].to(tl.int64) + 1, 0)
            length = tl.maximum(length, tl.max(used, axis=1))
            tokens += tl.sum((m != 0).to(tl.int64), axis=1)
        longest = tl.maximum(longest, tl.max(tl.where(keep != 0, length, 0), axis=0))
        fewest = tl.minimum(fewest, tl.min(tl.where(keep != 0, tokens, seq), axis=0))
    tl.store(stats_ptr, count)
    if TRIM:
        tl.store(stats_ptr + 1, longest)
    else:
        tl.store(stats_ptr + 1, seq)
    tl.store(stats_ptr + 2, fewest)


@triton.jit
def _compact_gather_kernel(
    hidden_ptr,
    mask_ptr,
    rows_ptr,
    index_ptr,
    hidden_out_ptr,
    mask_out_ptr,
    rows_out_ptr,
    S,
    H,
    LENGTH,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    i = tl.load(index_ptr + k)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    row_elements = LENGTH * H
    ok = offsets < row_elements
    values = tl.load(hidden_ptr + i * S * H + offsets, mask=ok)
    tl.store(hidden_out_ptr + k * row_elements + offsets, values, mask=ok)
    if chunk == 0:
        for start in range(0, LENGTH, BLOCK):
            t = start + tl.arange(0, BLOCK)
            t_ok = t < LENGTH
            tl.store(mask_out_ptr + k * LENGTH + t, tl.load(mask_ptr + i * S + t, mask=t_ok), mask=t_ok)
        tl.store(rows_out_ptr + k, tl.load(rows_ptr + i))
