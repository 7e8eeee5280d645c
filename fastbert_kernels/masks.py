"""Attention masks for the layers, built by transformers' own helpers for the configured attention
backend (sdpa: bool ``[B,1,S,S]`` or None; eager: additive float). A bool mask under eager is
silently wrong, so none is built by hand; they are rebuilt after every compaction.

``padded`` is whether any token of ``mask`` is masked, when the caller already knows it (the input
check and compaction compute it): the helpers would otherwise find out with ``mask.all()``, a
device-to-host sync on a GPU. Without padding their answer is the mask of a batch with no padding
(for full attention: None, "no mask"), and with padding they materialise it, so both are asked for
directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask


def _takes_skip(helper: Callable) -> bool:
    # Older transformers 5 releases (5.0 has no such option) check the mask themselves: one sync more.
    return "allow_is_bidirectional_skip" in inspect.signature(helper).parameters


_SKIP = {
    helper: _takes_skip(helper) for helper in (create_bidirectional_mask, create_bidirectional_sliding_window_mask)
}


def _build(helper: Callable, config, hidden: torch.Tensor, mask: torch.Tensor, padded: bool | None):
    if padded is None:
        return helper(config=config, inputs_embeds=hidden, attention_mask=mask)
    if not padded:
        return helper(config=config, inputs_embeds=hidden, attention_mask=None)
    skip_check = {"allow_is_bidirectional_skip": False} if _SKIP[helper] else {}
    return helper(config=config, inputs_embeds=hidden, attention_mask=mask, **skip_check)


def bidirectional_mask(config, hidden: torch.Tensor, mask: torch.Tensor, padded: bool | None = None):
    """The full-attention mask for ``hidden [B, S, H]`` and ``mask [B, S]`` (1 = token)."""
    return _build(create_bidirectional_mask, config, hidden, mask, padded)


def sliding_window_mask(config, hidden: torch.Tensor, mask: torch.Tensor, padded: bool | None = None):
    """The sliding-window (local) attention mask, for models that alternate it with full attention."""
    return _build(create_bidirectional_sliding_window_mask, config, hidden, mask, padded)
