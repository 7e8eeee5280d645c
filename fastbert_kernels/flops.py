"""FLOPs of a BERT layer and of a FastBERT branch, counted as 2 x multiply-adds (as the paper does).

These give the paper-style FLOPs speed-up and the *ideal* wall-clock speed-up that the exits imply,
against which the implementation's efficiency is measured. Wall-clock stays the headline figure.
"""

from __future__ import annotations


def layer_flops(hidden: int, intermediate: int, seq: int) -> float:
    """One transformer layer on one sequence: QKV + output projections, attention, feed-forward.
    BERT-base at 128 tokens gives 1.81e9 (the paper: 1809.9M)."""
    projections = 4 * seq * hidden * hidden
    attention = 2 * seq * seq * hidden
    feed_forward = 2 * seq * hidden * intermediate
    return 2.0 * (projections + attention + feed_forward)


def branch_flops(hidden: int, seq: int, classes: int, width: int = 128) -> float:
    """The paper's branch on one sequence, as the paper counts it (a full self-attention: Q, K, V
    for every token and S x S scores; 46.1M for BERT-base at 128 tokens). The fused kernels do
    less (one query, no K or V); this keeps FLOPs comparable with the paper's table."""
    per_token = hidden * width + 3 * width * width  # input projection; Q, K, V
    attention = 2 * seq * seq * width  # scores and weighted sum, every query
    per_sample = 2 * width * width + width * classes  # output, pooler (CLS); classifier
    return 2.0 * (seq * per_token + attention + per_sample)


def fused_branch_flops(hidden: int, seq: int, classes: int, width: int = 128, heads: int = 2) -> float:
    """What the fused exit head computes for one sequence (folded attention, CLS query only): the
    projection and, per head, a score and a weighted sum per token; then the folded query and
    output maps, the pooler and the classifier. The ideal speed-up uses this: the work this
    implementation does, not the paper's accounting."""
    per_token = hidden * width + heads * 2 * width
    per_sample = 2 * heads * width * width + width * width + width * classes
    return 2.0 * (seq * per_token + per_sample)


def model_flops(num_layers: int, hidden: int, intermediate: int, seq: int, classes: int) -> float:
    """The unpatched model's encoder layers plus its pooler and classifier (embeddings excluded)."""
    return num_layers * layer_flops(hidden, intermediate, seq) + 2.0 * (hidden * hidden + hidden * classes)


def adaptive_flops(
    exit_layer: int,
    num_layers: int,
    hidden: int,
    intermediate: int,
    seq: int,
    classes: int,
    width: int = 128,
    with_branches: bool = True,
    fused: bool = False,
    heads: int = 2,
) -> float:
    """FLOPs of one sample that leaves after ``exit_layer``: the layers it ran, a branch after each of
    them but the last (none at speed 0, where no branch runs), and the teacher head if it reached the
    end. Branches are counted as the paper counts them, or (``fused``) as the fused kernel runs them."""
    students_run = min(exit_layer, num_layers - 1) if with_branches else 0
    branch = (
        fused_branch_flops(hidden, seq, classes, width, heads) if fused else branch_flops(hidden, seq, classes, width)
    )
    flops = exit_layer * layer_flops(hidden, intermediate, seq) + students_run * branch
    if exit_layer == num_layers:
        flops += 2.0 * (hidden * hidden + hidden * classes)
    return flops
