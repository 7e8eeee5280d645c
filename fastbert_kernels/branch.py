"""The FastBERT branch classifier (the paper's student/teacher head)."""

from __future__ import annotations

import torch
from torch import nn

from .ops.reference import branch_logits
from .ops.types import BranchWeights


class BranchClassifier(nn.Module):
    """tanh(Linear(H->R)) per token, a 2-head self-attention read at the CLS token, tanh(Linear(R->R)),
    Linear(R->C). See :func:`fastbert_kernels.ops.reference.branch_logits` for the formula.

    Forward (differentiable, used for training): hidden ``[N, S, H]``, mask ``[N, S]`` -> logits ``[N, C]``.
    Inference goes through the fused op :func:`fastbert_kernels.ops.exit_head` with :meth:`weights`.
    """

    def __init__(self, hidden_size: int, num_labels: int, branch_size: int = 128, num_heads: int = 2) -> None:
        super().__init__()
        if branch_size % num_heads:
            raise ValueError(f"branch_size {branch_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.input_proj = nn.Linear(hidden_size, branch_size)
        self.qkv = nn.Linear(branch_size, 3 * branch_size)
        self.attn_out = nn.Linear(branch_size, branch_size)
        self.pool = nn.Linear(branch_size, branch_size)
        self.classifier = nn.Linear(branch_size, num_labels)

    def reset_parameters(self, std: float) -> None:
        """BERT's initialisation: weights N(0, std), biases zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def weights(self) -> BranchWeights:
        return BranchWeights(
            self.input_proj.weight,
            self.input_proj.bias,
            self.qkv.weight,
            self.qkv.bias,
            self.attn_out.weight,
            self.attn_out.bias,
            self.pool.weight,
            self.pool.bias,
            self.classifier.weight,
            self.classifier.bias,
        )

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return branch_logits(hidden, mask, self.weights(), self.num_heads)
