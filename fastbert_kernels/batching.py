"""Tokenising texts into batches, once and in order (calibration and the benchmark harness)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Batch = dict[str, torch.Tensor]


def make_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device) -> list[Batch]:
    """``texts`` tokenised in consecutive batches of ``batch_size`` (padded to each batch's longest,
    truncated to ``max_length``), in input order, on ``device``."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({k: v.to(device) for k, v in encoded.items()})
    return batches
