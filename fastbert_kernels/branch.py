"""The FastBERT branch classifier (the paper's student/teacher head)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .exit_rule import ExitRule
from .ops.reference import branch_logits
from .ops.reference import exit_decision as reference_exit_decision
from .ops.types import BranchWeights, ExitHeadOutput, FoldedWeights


class BranchLinear(nn.Linear):
    """An ``nn.Linear`` of a branch. Its own type so that whole-model int8 quantisation
    (``torch.ao.quantization.quantize_dynamic``, which swaps modules whose type is exactly
    ``nn.Linear``) quantises the encoder and leaves the students in float: the fused exit head
    takes float weights, and a student costs a few percent of a layer, so int8 would save little
    there and cost exit decisions."""


class BranchClassifier(nn.Module):
    """tanh(Linear(H->R)) per token, a 2-head self-attention read at the CLS token, tanh(Linear(R->R)),
    Linear(R->C). See :func:`fastbert_kernels.ops.reference.branch_logits` for the formula.

    Forward (differentiable, used for training): hidden ``[N, S, H]``, mask ``[N, S]`` -> logits ``[N, C]``.
    Inference goes through the fused op :func:`fastbert_kernels.ops.exit_head` with the folded
    weights, which the branch keeps (:meth:`folded_weights`) and refolds when a parameter changes.
    """

    def __init__(self, hidden_size: int, num_labels: int, branch_size: int = 128, num_heads: int = 2) -> None:
        super().__init__()
        if branch_size % num_heads:
            raise ValueError(f"branch_size {branch_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.input_proj = BranchLinear(hidden_size, branch_size)
        self.qkv = BranchLinear(branch_size, 3 * branch_size)
        self.attn_out = BranchLinear(branch_size, branch_size)
        self.pool = BranchLinear(branch_size, branch_size)
        self.classifier = BranchLinear(branch_size, num_labels)
        # dtype -> (the parameters' identity, storage and version counters, their folding)
        self._folded: dict[torch.dtype, tuple[tuple, FoldedWeights]] = {}

    def reset_parameters(self, std: float) -> None:
        """BERT's initialisation: weights N(0, std), biases zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def weights(self) -> BranchWeights:
        # Straight from the submodules' parameter dicts: Module.__getattr__ costs about a
        # microsecond a lookup, and this runs for every branch layer of every call.
        modules = self._modules
        try:
            return BranchWeights(
                *(
                    modules[module]._parameters[name]
                    for module in ("input_proj", "qkv", "attn_out", "pool", "classifier")
                    for name in ("weight", "bias")
                )
            )
        except KeyError:
            kinds = sorted({type(modules[m]).__name__ for m in ("input_proj", "qkv", "attn_out", "pool", "classifier")})
            raise TypeError(
                f"a FastBERT branch needs float Linear layers, but its layers are {', '.join(kinds)}; quantise "
                "the encoder only (quantize_dynamic(model, {torch.nn.Linear}) leaves the branches alone)"
            ) from None

    def folded_weights(self, dtype: torch.dtype) -> FoldedWeights:
        """The weights folded for the kernels (:meth:`BranchWeights.fold`), ``w_in`` in ``dtype``.

        Folded once and kept. A parameter's version counter moves with every in-place change (an
        optimiser step, ``load_state_dict``), its storage with ``.to()``, its identity when it is
        replaced: any of them refolds. Concurrent callers at worst fold twice; an entry is
        replaced whole, never mutated."""
        weights = self.weights()
        state = tuple((id(t), t.data_ptr(), t._version) for t in weights)
        entry = self._folded.get(dtype)
        if entry is None or entry[0] != state:
            entry = (state, weights.fold(self.num_heads, dtype))
            self._folded[dtype] = entry
        return entry[1]

    def exit_decision(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        rule: ExitRule,
        streak: torch.Tensor | None = None,
    ) -> ExitHeadOutput:
        """logits ``[N, C]``, ``rule``'s uncertainty ``[N]``, exits ``[N]`` and the patience state
        ``[N, 2]`` for one layer's rows (see :func:`fastbert_kernels.ops.exit_head`; the rule's
        student set is the caller's: this student runs).

        The fused op when no gradient is wanted; this module's differentiable forward when one is
        (an attribution method on an eval-mode model), so gradients are never silently cut."""
        speed, criterion, temperature, patience = rule.speed, rule.criterion, rule.temperature, rule.patience
        if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self.parameters())):
            return reference_exit_decision(self(hidden, mask), speed, criterion, temperature, patience, streak)
        # The adaptive forward's inputs are valid by construction: the op without Python checks.
        return ops.exit_head_unchecked(
            hidden,
            mask,
            self.folded_weights(hidden.dtype),
            self.num_heads,
            speed,
            criterion,
            temperature,
            patience,
            streak,
        )

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return branch_logits(hidden, mask, self.weights(), self.num_heads)

    def __getstate__(self) -> dict:
        # The folding is derived state: a copy or pickle refolds from its own parameters.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_folded": {}}
