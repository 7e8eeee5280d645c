"""How each supported Hugging Face model type is walked: one table, no per-model copies.

Every supported ``...ForSequenceClassification`` is an embedding step, a stack of encoder layers
and a classification head. What differs between model types is said in the vocabulary of
:class:`Architecture`, once per type:

* ``embed``: the embeddings (and any projection to the hidden size before layer 1);
* ``layers``: the module run at each depth (ALBERT runs its shared layer groups several times);
* ``context``: what every layer needs besides the hidden states, built from the current rows'
  mask (the attention mask for the configured backend; DeBERTa's relative positions; ModernBERT's
  rotary embeddings and its global and sliding-window masks). It is rebuilt after every
  compaction, so it always matches the surviving rows and the trimmed length;
* ``run``: one layer call;
* ``head``: the model's own classification head on the last layer's output (the teacher).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .masks import bidirectional_mask, sliding_window_mask

Embed = Callable[..., torch.Tensor]


def _unwrap(out) -> torch.Tensor:
    # transformers 5 layers return the tensor; some (DeBERTa) still return (hidden, attentions).
    return out[0] if isinstance(out, tuple) else out


# ---- embeddings ------------------------------------------------------------------------------


def _embed_standard(model, base, input_ids, token_type_ids, position_ids, inputs_embeds, mask) -> torch.Tensor:
    return base.embeddings(
        input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
    )


def _embed_distilbert(model, base, input_ids, token_type_ids, position_ids, inputs_embeds, mask) -> torch.Tensor:
    return base.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids)


def _embed_albert(model, base, *args) -> torch.Tensor:
    # ALBERT embeds in E dimensions and projects to H before the first layer.
    return base.encoder.embedding_hidden_mapping_in(_embed_standard(model, base, *args))


def _embed_electra(model, base, *args) -> torch.Tensor:
    hidden = _embed_standard(model, base, *args)
    return base.embeddings_project(hidden) if hasattr(base, "embeddings_project") else hidden


def _embed_deberta(model, base, input_ids, token_type_ids, position_ids, inputs_embeds, mask) -> torch.Tensor:
    # DeBERTa's embeddings zero the padded positions themselves, so they take the mask.
    return base.embeddings(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        mask=mask,
        inputs_embeds=inputs_embeds,
    )


def _embed_modernbert(model, base, input_ids, token_type_ids, position_ids, inputs_embeds, mask) -> torch.Tensor:
    return base.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)


# ---- layers ----------------------------------------------------------------------------------


def _encoder_layers(base) -> Sequence[nn.Module]:
    return base.encoder.layer


def _distilbert_layers(base) -> Sequence[nn.Module]:
    return base.transformer.layer


def _albert_layers(base) -> Sequence[nn.Module]:
    # num_hidden_layers depths share num_hidden_groups layer groups, as AlbertTransformer runs them.
    config = base.config
    per_group = config.num_hidden_layers / config.num_hidden_groups
    groups = base.encoder.albert_layer_groups
    return [groups[int(i / per_group)] for i in range(config.num_hidden_layers)]


def _modernbert_layers(base) -> Sequence[nn.Module]:
    return base.layers


# ---- per-layer context and one layer call ------------------------------------------------------


def _mask_context(model, hidden, mask, padded):
    return bidirectional_mask(model.config, hidden, mask, padded)


def _run_with_mask(model, index: int, layer: nn.Module, hidden: torch.Tensor, attention) -> torch.Tensor:
    return _unwrap(layer(hidden, attention))


@dataclasses.dataclass(frozen=True)
class _DebertaContext:
    attention: torch.Tensor
    relative_pos: torch.Tensor | None
    rel_embeddings: torch.Tensor | None
    mask: torch.Tensor


def _deberta_context(model, hidden, mask, padded) -> _DebertaContext:
    encoder = model.deberta.encoder
    # Relative positions depend only on the (trimmed) length: rebuilt for it, they stay exact.
    return _DebertaContext(
        attention=encoder.get_attention_mask(mask),
        relative_pos=encoder.get_rel_pos(hidden),
        rel_embeddings=encoder.get_rel_embedding(),
        mask=mask,
    )


def _deberta_run(model, index: int, layer: nn.Module, hidden: torch.Tensor, ctx: _DebertaContext) -> torch.Tensor:
    out = _unwrap(layer(hidden, ctx.attention, relative_pos=ctx.relative_pos, rel_embeddings=ctx.rel_embeddings))
    encoder = model.deberta.encoder
    if index == 0 and getattr(encoder, "conv", None) is not None:  # DeBERTa-v2's convolution after layer 1
        out = encoder.conv(hidden, out, ctx.mask)
    return out


@dataclasses.dataclass(frozen=True)
class _ModernBertContext:
    masks: dict[str, Any]
    position_embeddings: dict[str, Any]


def _modernbert_context(model, hidden, mask, padded) -> _ModernBertContext:
    base = model.model
    # Rows keep their tokens at positions 0..S'-1 through compaction, as ModernBERT numbers them.
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    masks = {
        "full_attention": bidirectional_mask(model.config, hidden, mask, padded),
        "sliding_attention": sliding_window_mask(model.config, hidden, mask, padded),
    }
    rotary = {kind: base.rotary_emb(hidden, positions, kind) for kind in set(model.config.layer_types)}
    return _ModernBertContext(masks, rotary)


def _modernbert_run(model, index: int, layer: nn.Module, hidden: torch.Tensor, ctx: _ModernBertContext):
    kind = layer.attention_type
    return _unwrap(layer(hidden, attention_mask=ctx.masks[kind], position_embeddings=ctx.position_embeddings[kind]))


# ---- heads -----------------------------------------------------------------------------------


def _bert_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # BertForSequenceClassification: pooler (dense + tanh on the CLS token), dropout, linear.
    return model.classifier(model.dropout(model.bert.pooler(sequence)))


def _classifier_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # RoBERTa's and ELECTRA's classification heads read sequence[:, 0] themselves.
    return model.classifier(sequence)


def _distilbert_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pooled = nn.functional.relu(model.pre_classifier(sequence[:, 0]))
    return model.classifier(model.dropout(pooled))


def _albert_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    base = model.albert
    pooled = base.pooler_activation(base.pooler(sequence[:, 0]))
    return model.classifier(model.dropout(pooled))


def _deberta_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(model.pooler(sequence)))


def _modernbert_head(model: nn.Module, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The final norm belongs to the model's last layer output, then CLS or mean pooling.
    sequence = model.model.final_norm(sequence)
    if model.config.classifier_pooling == "mean":
        weights = mask.to(sequence.dtype).unsqueeze(-1)
        pooled = (sequence * weights).sum(dim=1) / weights.sum(dim=1)
    else:
        pooled = sequence[:, 0]
    return model.classifier(model.drop(model.head(pooled)))


# ---- position limits -------------------------------------------------------------------------


def _absolute_positions(config) -> int:
    return int(config.max_position_embeddings)


def _roberta_positions(config) -> int:
    # RoBERTa numbers positions from padding_idx + 1, so padding_idx + 1 slots are never used.
    return int(config.max_position_embeddings) - int(config.pad_token_id) - 1


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one model type is walked (see the module docstring for the vocabulary).

    base: attribute holding the encoder model; head: ``(model, sequence [B,S,H], mask [B,S]) ->
    logits``; max_length: longest sequence the model allows; token_types: whether it takes
    ``token_type_ids``; positions: whether it takes ``position_ids``.
    """

    base: str
    head: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    max_length: Callable[[object], int] = _absolute_positions
    embed: Embed = _embed_standard
    layer_list: Callable[[nn.Module], Sequence[nn.Module]] = _encoder_layers
    context: Callable[..., Any] = _mask_context
    run: Callable[..., torch.Tensor] = _run_with_mask
    token_types: bool = True
    positions: bool = True

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.layer_list(self.base_model(model))


_ROBERTA = Architecture("roberta", _classifier_head, _roberta_positions)

ARCHITECTURES: types.MappingProxyType[str, Architecture] = types.MappingProxyType(
    {
        "bert": Architecture("bert", _bert_head),
        "roberta": _ROBERTA,
        "xlm-roberta": _ROBERTA,
        "camembert": _ROBERTA,
        "distilbert": Architecture(
            "distilbert", _distilbert_head, embed=_embed_distilbert, layer_list=_distilbert_layers, token_types=False
        ),
        "albert": Architecture("albert", _albert_head, embed=_embed_albert, layer_list=_albert_layers),
        "electra": Architecture("electra", _classifier_head, embed=_embed_electra),
        "deberta-v2": Architecture(
            "deberta", _deberta_head, embed=_embed_deberta, context=_deberta_context, run=_deberta_run
        ),
        "modernbert": Architecture(
            "model",
            _modernbert_head,
            embed=_embed_modernbert,
            layer_list=_modernbert_layers,
            context=_modernbert_context,
            run=_modernbert_run,
            token_types=False,
            positions=False,
        ),
    }
)


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
