"""How each supported Hugging Face model type is walked: one table, no per-model copies.

Every supported ``...ForSequenceClassification`` has the same shape: a base model (embeddings, a
list of encoder layers) under one attribute, and a classification head that reads the CLS token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn


def _bert_head(model: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    # BertForSequenceClassification: pooler (dense + tanh on the CLS token), dropout, linear.
    return model.classifier(model.dropout(model.bert.pooler(sequence)))


def _roberta_head(model: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    # RobertaClassificationHead reads sequence[:, 0] itself.
    return model.classifier(sequence)


def _absolute_positions(config) -> int:
    return int(config.max_position_embeddings)


def _roberta_positions(config) -> int:
    # RoBERTa numbers positions from padding_idx + 1, so padding_idx + 1 slots are never used.
    return int(config.max_position_embeddings) - int(config.pad_token_id) - 1


@dataclasses.dataclass(frozen=True)
class Architecture:
    """base: attribute holding the encoder model; head: (model, sequence [B,S,H]) -> logits;
    max_length: longest sequence the position embeddings allow."""

    base: str
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    max_length: Callable[[object], int]

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).encoder.layer


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", _bert_head, _absolute_positions),
    "roberta": Architecture("roberta", _roberta_head, _roberta_positions),
    "xlm-roberta": Architecture("roberta", _roberta_head, _roberta_positions),
}


def architecture_for(model: nn.Module) -> Architecture:
    """The table entry for ``model``, or a ``TypeError``/``ValueError`` that says what is unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TypeError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; supported model types: "
            f"{sorted(ARCHITECTURES)} with a ...ForSequenceClassification head"
        )
    arch = ARCHITECTURES[model_type]
    # Token classification, multiple choice and the like have a `classifier` too, but their
    # outputs are not one label per sequence: refuse them here, not with an odd error at forward.
    is_sequence_classifier = any(cls.__name__.endswith("ForSequenceClassification") for cls in type(model).__mro__)
    if not is_sequence_classifier or not hasattr(model, arch.base) or not hasattr(model, "classifier"):
        raise TypeError(
            f"{type(model).__name__} is a {model_type} model without a sequence-classification head; "
            f"load it with AutoModelForSequenceClassification"
        )
    if getattr(config, "is_decoder", False):
        raise ValueError("FastBERT needs a bidirectional encoder; this config has is_decoder=True")
    if config.num_labels < 2 or config.problem_type in ("regression", "multi_label_classification"):
        raise ValueError(
            f"FastBERT exits on the entropy of a softmax over classes: it needs single-label classification "
            f"with num_labels >= 2 (got num_labels={config.num_labels}, problem_type={config.problem_type!r})"
        )
    return arch
