"""Containers for the tensors the ops take, so that the argument order is written down once.

The order of :class:`FoldedWeights`' fields is the order of the exit-head op's ``weights`` list in
every language: C++ and CUDA expand one list of the same names (``csrc/include/fastbert/
folded_weights.h``), which a test compares with these fields through the extension's build info."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


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
        ``w_in`` is cast to ``dtype`` (the hidden states', for the vendor GEMM); the rest is float32.
        """
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
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    padded: bool
    changed: bool
