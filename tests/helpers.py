"""Builders for tests: tiny random Hugging Face classifiers, batches with mixed padding, rigged branches."""

from __future__ import annotations

import contextlib
import threading

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import fastbert_kernels as fbk
from fastbert_kernels.ops.types import BranchWeights
from fastbert_kernels.profile import exit_profile

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
    elif kind in ("roberta", "camembert"):
        config_class, model_class = (
            (RobertaConfig, RobertaForSequenceClassification)
            if kind == "roberta"
            else (transformers.CamembertConfig, transformers.CamembertForSequenceClassification)
        )
        model = model_class(config_class(max_position_embeddings=MAX_POSITIONS + 2, pad_token_id=1, **common))
    else:
        model = _other_model(kind, common)
    # A sharper teacher than the 0.02 initialisation gives, so its distribution says something.
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    return model.to(device).eval()


# Tiny configurations of the other supported model types, each with what makes it different.
def _other_model(kind: str, common: dict):
    size, layers, heads = common["hidden_size"], common["num_hidden_layers"], common["num_attention_heads"]
    base = dict(vocab_size=VOCAB, num_labels=common["num_labels"], attn_implementation=common["attn_implementation"])
    if kind == "distilbert":
        config = transformers.DistilBertConfig(
            dim=size, n_layers=layers, n_heads=heads, hidden_dim=2 * size, max_position_embeddings=MAX_POSITIONS,
            dropout=0.1, attention_dropout=0.1, **base,
        )  # fmt: skip
        return transformers.DistilBertForSequenceClassification(config)
    if kind == "albert":
        # E < H (projected before layer 1), and 4 depths sharing 2 layer groups.
        config = transformers.AlbertConfig(
            embedding_size=16, hidden_size=size, num_hidden_layers=layers, num_hidden_groups=2, inner_group_num=1,
            num_attention_heads=heads, intermediate_size=2 * size, max_position_embeddings=MAX_POSITIONS,
            hidden_dropout_prob=0.1, **base,
        )  # fmt: skip
        return transformers.AlbertForSequenceClassification(config)
    if kind == "electra":
        config = transformers.ElectraConfig(
            embedding_size=16, hidden_size=size, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * size, max_position_embeddings=MAX_POSITIONS, hidden_dropout_prob=0.1, **base,
        )  # fmt: skip
        return transformers.ElectraForSequenceClassification(config)
    if kind == "deberta-v2":
        # Relative attention (content-to-position both ways, log buckets) and the convolution after layer 1.
        config = transformers.DebertaV2Config(
            hidden_size=size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * size,
            max_position_embeddings=MAX_POSITIONS, relative_attention=True, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, position_buckets=16, max_relative_positions=MAX_POSITIONS,
            norm_rel_ebd="layer_norm", share_att_key=True, conv_kernel_size=3, type_vocab_size=0,
            pooler_hidden_size=size, hidden_dropout_prob=0.1, **base,
        )  # fmt: skip
        return transformers.DebertaV2ForSequenceClassification(config)
    if kind == "modernbert":
        # Alternating global and sliding-window (8 tokens) attention, rotary positions, mean pooling.
        config = transformers.ModernBertConfig(
            hidden_size=size, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * size,
            max_position_embeddings=MAX_POSITIONS, local_attention=8, global_attn_every_n_layers=2,
            classifier_pooling="mean", pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
            sep_token_id=3, **base,
        )  # fmt: skip
        return transformers.ModernBertForSequenceClassification(config)
    raise ValueError(kind)


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
    """Random, confident-ish students, so that exits are spread over the layers (they stand for
    trained ones: the model is told so, and does not warn)."""
    with torch.no_grad():
        for branch in fbk.students(model):
            for p in branch.parameters():
                p.normal_(0, scale / p.shape[-1] ** 0.5)
    fbk.fastbert_config(model).students_trained = True


def rig_student(model, layer: int, confident: bool) -> None:
    """Student after ``layer`` (1-based): confident (u ~ 0) or uniform (u = 1) whatever the input."""
    branch = fbk.students(model)[layer - 1]
    fbk.fastbert_config(model).students_trained = True
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


def word_tokenizer():
    """A fast BERT tokenizer over the words w0, w1, ... (ids 5 on) with [CLS]/[SEP]: real tokenisation
    for pipelines, distillation from texts and saved checkpoints, without downloading a vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(VOCAB - 5))]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


@contextlib.contextmanager
def layers_wait_for(model, release: threading.Event, started: threading.Event | None = None):
    """Every encoder layer of ``model`` first sets ``started`` and waits for ``release`` (30 s at
    most), so the test controls when the engine's current call finishes; undone, and ``release``
    set, on exit."""
    layer_class = type(model.bert.encoder.layer[0])
    original = layer_class.forward

    def held(self, *args, **kwargs):
        if started is not None:
            started.set()
        release.wait(timeout=30)
        return original(self, *args, **kwargs)

    layer_class.forward = held
    try:
        yield
    finally:
        release.set()
        layer_class.forward = original


def speed_away_from_every_uncertainty(model, batches, rule: fbk.ExitRule, gap: float = 1e-3) -> float:
    """A speed in (0.05, 0.95) no student's uncertainty is within ``gap`` of, so that float
    differences between the runtimes cannot flip a decision."""
    profile = exit_profile(model, batches, criteria=[rule.criterion], temperatures=[rule.temperature])
    students = profile.uncertainties[(rule.criterion, rule.temperature)][:, :-1].flatten()
    for speed in torch.rand(200).mul(0.9).add(0.05).tolist():
        if (students - speed).abs().min() > gap:
            return speed
    raise AssertionError("no speed away from the uncertainties")
