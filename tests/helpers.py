"""Builders for tests: tiny random Hugging Face classifiers, batches with mixed padding, rigged branches."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import fastbert_kernels as fbk
from fastbert_kernels.ops.types import BranchWeights

VOCAB = 97
MAX_POSITIONS = 64


def tiny_model(
    kind: str = "bert", attn: str = "sdpa", num_labels: int = 3, layers: int = 4, hidden: int = 32, device="cpu"
):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        num_labels=num_labels,
        attn_implementation=attn,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=MAX_POSITIONS, **common))
    elif kind == "roberta":
        config = RobertaConfig(max_position_embeddings=MAX_POSITIONS + 2, pad_token_id=1, **common)
        model = RobertaForSequenceClassification(config)
    else:
        raise ValueError(kind)
    # A sharper teacher than the 0.02 initialisation gives, so its distribution says something.
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    return model.to(device).eval()


def random_batch(
    batch: int, length: int, pad_id: int = 0, min_length: int = 1, device="cpu"
) -> dict[str, torch.Tensor]:
    """Token ids with a random real length per row (right padding), attention mask 1 for real tokens."""
    ids = torch.randint(2, VOCAB, (batch, length))
    lengths = torch.randint(min_length, length + 1, (batch,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def spread_branches(model, scale: float = 2.0) -> None:
    """Random, confident-ish students, so that exits are spread over the layers."""
    with torch.no_grad():
        for branch in fbk.students(model):
            for p in branch.parameters():
                p.normal_(0, scale / p.shape[-1] ** 0.5)


def rig_student(model, layer: int, confident: bool) -> None:
    """Student after ``layer`` (1-based): confident (u ~ 0) or uniform (u = 1) whatever the input."""
    branch = fbk.students(model)[layer - 1]
    with torch.no_grad():
        branch.classifier.weight.zero_()
        branch.classifier.bias.zero_()
        if confident:
            branch.classifier.bias[0] = 50.0


def random_branch_weights(h: int, r: int, c: int, dtype=torch.float32) -> BranchWeights:
    def linear(out_features: int, in_features: int):
        bound = 1.5 / in_features**0.5
        return (torch.randn(out_features, in_features) * bound).to(dtype), (torch.randn(out_features) * 0.1).to(dtype)

    w_in, b_in = linear(r, h)
    w_qkv, b_qkv = linear(3 * r, r)
    w_out, b_out = linear(r, r)
    w_pool, b_pool = linear(r, r)
    w_cls, b_cls = linear(c, r)
    return BranchWeights(w_in, b_in, w_qkv, b_qkv, w_out, b_out, w_pool, b_pool, w_cls * 3, b_cls)
