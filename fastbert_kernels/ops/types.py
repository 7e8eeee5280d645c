"""Containers for the tensors the ops take, so that the argument order is written down once.

The order of :class:`FoldedWeights`' fields is the order of the exit-head op's ``weights`` list in
every language: C++ and CUDA expand one list of the same names (``csrc/include/fastbert/
folded_weights.h``), which a test compares with these fields through the extension's build info.
:data:`EXIT_CRITERIA` is the same for the exit criteria (``csrc/include/fastbert/exit_rule.h``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# The exit criteria, by the names the op takes; each maps a branch's p = softmax(logits / T) to an
# uncertainty u in [0, 1], and a row is confident when u < speed:
#   entropy   u = -sum_c p_c log p_c / log C   (FastBERT's, the default)
#   max_prob  u = 1 - p_top1                   (softmax response)
#   margin    u = 1 - (p_top1 - p_top2)
EXIT_CRITERIA: tuple[str, ...] = ("entropy", "max_prob", "margin")


def check_exit_rule(criterion: str, temperature: float, patience: int) -> None:
    """A ``ValueError``/``TypeError`` that names the problem unless ``criterion`` is one of
    :data:`EXIT_CRITERIA`, ``temperature`` a positive finite number and ``patience`` an int >= 1."""
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; known: {', '.join(EXIT_CRITERIA)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if isinstance(patience, bool) or not isinstance(patience, int):
        raise TypeError(f"patience must be an int, got {type(patience).__name__}")
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_hidden_and_mask(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    """A ``ValueError``/``TypeError`` that names the problem unless ``hidden`` is ``[N, S, H]`` of a
    float dtype the kernels take and ``mask`` int64 ``[N, S]`` on the same device."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, S, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [N, S] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.int64:
        raise TypeError(f"mask must be int64, got {mask.dtype}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def check_streak(streak: torch.Tensor | None, rows: int, device: torch.device) -> None:
    """A ``ValueError`` that names the problem unless ``streak`` is None or int64 ``[rows, 2]`` on ``device``."""
    if streak is None:
        return
    if streak.shape != (rows, 2) or streak.dtype != torch.int64:
        raise ValueError(f"streak must be int64 [N, 2] = [{rows}, 2], got {streak.dtype} {tuple(streak.shape)}")
    if streak.device != device:
        raise ValueError(f"streak is on {streak.device} but hidden is on {device}")


def check_folded_weights(hidden: torch.Tensor, weights: FoldedWeights, num_heads: int) -> int:
    """What the C++ binding checks of the folded weights (``fastbert/checks.h``), for the kernels
    that have no C++ in front of them (Triton): every shape against ``hidden [N, S, H]``, R and
    ``num_heads``; ``w_in`` in hidden's dtype, the rest float32; all contiguous and on hidden's
    device. Raises ``ValueError``/``TypeError`` naming the tensor; returns R."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if weights.w_in.dim() != 2 or weights.w_cls.dim() != 2:
        raise ValueError(f"w_in and w_cls must be 2-D, got {tuple(weights.w_in.shape)}, {tuple(weights.w_cls.shape)}")
    r, c, h = weights.w_in.shape[0], weights.w_cls.shape[0], hidden.shape[-1]
    if c < 2:
        raise ValueError(f"the branch needs at least 2 classes, got {c}")
    qk = num_heads * r
    expected = FoldedWeights((r, h), (r,), (qk, r), (qk,), (r, qk), (r,), (r, r), (r,), (c, r), (c,))
    for name, tensor, shape in zip(FoldedWeights._fields, weights, expected, strict=True):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        dtype = hidden.dtype if name == "w_in" else torch.float32
        if tensor.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return r


class ExitHeadOutput(NamedTuple):
    """What the exit head returns for N rows.

    logits ``[N, C]`` float32 (never divided by the temperature); uncertainty ``[N]`` float32, the
    criterion's, of ``softmax(logits / T)``; exits ``[N]`` bool; streak ``[N, 2]`` int64, each
    row's patience state after this student: ``[argmax, how many students in a row up to this one
    were confident and agreed on it]`` (pass it to the next layer's call, compacted with the rows).
    """

    logits: torch.Tensor
    uncertainty: torch.Tensor
    exits: torch.Tensor
    streak: torch.Tensor


class BranchWeights(NamedTuple):
    """The paper's branch parameters, as ``nn.Linear`` stores them (``[out, in]``).

    w_in ``[R, H]``, b_in ``[R]``: token projection; w_qkv ``[3R, R]``, b_qkv ``[3R]``: Q, K, V stacked;
    w_out ``[R, R]``, b_out ``[R]``: attention output; w_pool ``[R, R]``, b_pool ``[R]``;
    w_cls ``[C, R]``, b_cls ``[C]``.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    w_pool: torch.Tensor
    b_pool: torch.Tensor
    w_cls: torch.Tensor
    b_cls: torch.Tensor

    @staticmethod
    def shapes(hidden_size: int, width: int, classes: int) -> BranchWeights:
        """The shape of each parameter for backbone width H, branch width R and C classes."""
        h, r, c = hidden_size, width, classes
        return BranchWeights((r, h), (r,), (3 * r, r), (3 * r,), (r, r), (r,), (r, r), (r,), (c, r), (c,))

    def float(self) -> BranchWeights:
        return BranchWeights(*(t.float() for t in self))

    @torch.no_grad()
    def fold(self, num_heads: int, dtype: torch.dtype | None = None) -> FoldedWeights:
        """Fold the attention so that the kernels never form K or V.

        With one query (the CLS token) per row, for head j (rows ``j*h:(j+1)*h`` of W_q, W_k, W_v):
            q_j . k_{s,j} / sqrt(h) = z_s . (A_j z_0 + c_j) + const,   A_j = W_k,j^T W_q,j / sqrt(h),
                                                                       c_j = W_k,j^T b_q,j / sqrt(h)
        and the constant (b_k,j . q_j) drops out of the softmax, so b_k is not needed at all. Since
        the attention weights sum to one,
            W_o concat_j(sum_s a_s v_{s,j}) + b_o = sum_j M_j zbar_j + (W_o b_v + b_o),
            M_j = W_o[:, j] W_v,j,   zbar_j = sum_s a_{s,j} z_s.
        Per token this leaves the H -> R projection and two R-wide dot products/axpys per head.
        ``w_in`` is cast to ``dtype`` (the hidden states', for the vendor GEMM); the rest is float32,
        also under autocast (whose bf16 matmuls would round it, and the kernels refuse it).
        """
        with torch.autocast(self.w_in.device.type, enabled=False):
            return self._fold(num_heads, dtype)

    def _fold(self, num_heads: int, dtype: torch.dtype | None) -> FoldedWeights:
        w = self.float()
        r = w.b_in.shape[0]
        head = r // num_heads
        scale = 1.0 / math.sqrt(head)
        wq, wk, wv = w.w_qkv.split(r)
        bq, _, bv = w.b_qkv.split(r)
        w_qk = torch.cat([wk[j * head : (j + 1) * head].T @ wq[j * head : (j + 1) * head] for j in range(num_heads)])
        b_qk = torch.cat([wk[j * head : (j + 1) * head].T @ bq[j * head : (j + 1) * head] for j in range(num_heads)])
        w_ov = torch.cat(
            [w.w_out[:, j * head : (j + 1) * head] @ wv[j * head : (j + 1) * head] for j in range(num_heads)], dim=1
        )
        b_ov = w.w_out @ bv + w.b_out
        return FoldedWeights(
            w_in=self.w_in.to(dtype or self.w_in.dtype).contiguous(),
            b_in=w.b_in.contiguous(),
            w_qk=(w_qk * scale).contiguous(),
            b_qk=(b_qk * scale).contiguous(),
            w_ov=w_ov.contiguous(),
            b_ov=b_ov.contiguous(),
            w_pool=w.w_pool.contiguous(),
            b_pool=w.b_pool.contiguous(),
            w_cls=w.w_cls.contiguous(),
            b_cls=w.b_cls.contiguous(),
        )


class FoldedWeights(NamedTuple):
    """What the compiled kernels take (see :meth:`BranchWeights.fold`); float32 except ``w_in``.

    w_in ``[R, H]`` (the hidden states' dtype, for the vendor GEMM), b_in ``[R]``,
    w_qk ``[heads*R, R]``, b_qk ``[heads*R]``, w_ov ``[R, heads*R]``, b_ov ``[R]``,
    w_pool ``[R, R]``, b_pool ``[R]``, w_cls ``[C, R]``, b_cls ``[C]``.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_qk: torch.Tensor
    b_qk: torch.Tensor
    w_ov: torch.Tensor
    b_ov: torch.Tensor
    w_pool: torch.Tensor
    b_pool: torch.Tensor
    w_cls: torch.Tensor
    b_cls: torch.Tensor


class Compacted(NamedTuple):
    """What :func:`fastbert_kernels.ops.compact` returns.

    hidden ``[M, S', H]``, mask ``[M, S']`` int64, rows ``[M]`` int64: the kept rows, in order.
    padded: whether some kept row has masked columns within ``S'`` (so the layers still need an
    attention mask).
    changed: False when every row was kept and nothing was trimmed; the tensors are then the
    inputs themselves, and a caller may keep whatever it derived from them (the layer mask).
    kept: ``[M]`` int64, the kept rows' positions in the input (None when ``changed`` is False).
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    padded: bool
    changed: bool
    kept: torch.Tensor | None = None

    def carry(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept rows of another per-row tensor ``[N, ...]`` (the patience state), in order."""
        return tensor if self.kept is None else tensor.index_select(0, self.kept)
