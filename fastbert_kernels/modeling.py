"""Patching a Hugging Face classifier in place with FastBERT's batched adaptive forward.

The adaptive forward, per layer i = 1..L-1 (only while rows survive):

    hidden = layer_i(hidden, mask)                       # the surviving rows only
    if rule.evaluates(i): (else on to the next layer)
    logits, u, exits = exit_head(hidden, mask, branch_i, rule)
    out[rows[exits]] = logits[exits]; exit_layer = i     # written straight to input positions
    hidden, mask, rows = compact(hidden, mask, rows, ~exits, trim)

then the teacher answers for whoever is left after layer L. ``rows`` maps each surviving row to
its input position, so every input row gets exactly one output row, in input order.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from transformers.utils import ModelOutput

from . import ops
from .architectures import Architecture, architecture_for
from .branch import BranchClassifier
from .checkpoint import save_pretrained_with_branches
from .config import FastBertConfig
from .encoder import EncoderInputs, embed, layer_context, model_device, run_layers
from .exit_rule import ExitRule, check_speed
from .ops.reference import uncertainty, update_streak
from .ops.sync_counter import host_read
from .state import (
    BRANCHES_ATTR,
    CONFIG_ATTR,
    branch_modules,
    check_students_trained,
    fastbert_config,
    is_patched,
    students,
)

__all__ = [
    "FastBertOutput",
    "adaptive_forward",
    "branch_modules",
    "classification_loss",
    "fastbert_config",
    "is_patched",
    "patch",
    "students",
    "teacher_logits",
    "unpatch",
]

# Outputs beyond the logits, which Trainer leaves out of its predictions by default.
_EXTRA_OUTPUTS = ("exit_layer", "uncertainty")


@dataclasses.dataclass
class FastBertOutput(ModelOutput):
    """Output of a patched model.

    Attributes:
        loss: cross-entropy of ``logits`` against ``labels`` when labels were given.
        logits: ``[B, C]`` float32, in input order: the exiting student's or the teacher's.
        exit_layer: ``[B]`` int64, 1-based layer after which the sample left; L means the teacher.
        uncertainty: ``[B]`` float32, the answering classifier's uncertainty as the exit rule
            measures it (the exit rule's criterion of its logits / temperature).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None


def teacher_logits(model: nn.Module, arch: Architecture, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on the last layer's output ``[N, S, H]`` -> ``[N, C]``."""
    if fastbert_config(model).teacher == "branch":
        return branch_modules(model)[-1](hidden, mask)
    return arch.head(model, hidden, mask)


def adaptive_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    speed: float | torch.Tensor | None = None,
    return_dict: bool | None = None,
    **kwargs,
) -> FastBertOutput | tuple:
    """Batched FastBERT inference; the patched model's ``forward``, under the model's
    ``fastbert_config.exit_rule`` with ``speed`` (default: the rule's own) in place of its speed;
    speed 0, or a rule with no students, computes no branch and equals the unpatched model.
    ``speed`` may also be a float tensor ``[B]``: one threshold per row (latency tiers in one
    batch), carried through compaction with the rows. Shapes: inputs ``[B, S]``; outputs as in
    :class:`FastBertOutput`."""
    config = fastbert_config(self)
    per_row = None
    if isinstance(speed, torch.Tensor) and speed.dim() == 1:
        # The largest speed is the one number that decides between the paths below.
        per_row, speed = check_row_speeds(speed, input_ids if input_ids is not None else inputs_embeds, self)
    rule = config.exit_rule
    speed = rule.speed if speed is None else check_speed(speed)
    if speed > 0 and not config.students_trained:  # the flag first: no cost on the hot path once trained
        check_students_trained(self, speed)
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, False):
            raise NotImplementedError(f"{flag} is not available from the adaptive forward (samples leave early)")
    kwargs.pop("use_cache", None)
    # Trainer passes this to models whose forward takes **kwargs (gradient accumulation).
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    if speed > 0 and self.training:
        # Under no_grad too: dropout would change the exits from call to call.
        raise RuntimeError(
            "early exit is for inference: call model.eval(), or train with speed=0 "
            "(fastbert_kernels.fine_tune / distill do this for you)"
        )
    if speed > 0 and _is_exporting():
        raise NotImplementedError(
            "torch.export supports a patched model at speed=0 only (early exit has data-dependent shapes)"
        )
    arch = architecture_for(self)
    layers = arch.layers(self)
    rule.check_for(len(layers))
    inputs = embed(self, arch, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
    if speed == 0.0 or rule.students == ():
        out_logits, out_layer, out_uncertainty = _full_depth(self, arch, layers, inputs, rule)
    else:
        if speed != rule.speed:
            rule = rule.replace(speed=speed)
        out_logits, out_layer, out_uncertainty = _adaptive(self, arch, layers, inputs, rule, per_row)
    loss = None if labels is None else classification_loss(out_logits, labels, num_items_in_batch)
    output = FastBertOutput(loss=loss, logits=out_logits, exit_layer=out_layer, uncertainty=out_uncertainty)
    use_dict = self.config.return_dict if return_dict is None else return_dict
    return output if use_dict else output.to_tuple()


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.7
    return bool(is_exporting and is_exporting())


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Hugging Face's single-label loss: cross-entropy of ``logits [B, C]`` against class indices
    ``labels [B]`` (-100 ignored); a mean, or a sum over ``num_items_in_batch`` when Trainer gives it.

    FastBERT exits on a softmax over classes, so float (multi-label or soft) targets are refused
    rather than given a loss Hugging Face would not compute for them."""
    if labels.is_floating_point() or labels.dim() != 1:
        raise ValueError(
            f"a FastBERT classifier is single-label: labels must be integer class indices [B], got "
            f"{labels.dtype} {tuple(labels.shape)} (multi-label and regression targets are not supported)"
        )
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(logits, labels.to(logits.device), ignore_index=-100, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def _full_depth(model, arch: Architecture, layers, inputs: EncoderInputs, rule: ExitRule):
    """Speed 0: exactly the unpatched computation (no branch, no compaction, no bookkeeping)."""
    hidden, mask = inputs.hidden, inputs.mask
    context = layer_context(model, arch, hidden, mask, inputs.padded)
    hidden = run_layers(model, arch, layers, hidden, context)
    logits = teacher_logits(model, arch, hidden, mask)
    exit_layer = torch.full((hidden.shape[0],), len(layers), dtype=torch.int64, device=hidden.device)
    return logits.to(torch.float32), exit_layer, uncertainty(logits, rule.criterion, rule.temperature)


def check_row_speeds(speed: torch.Tensor, inputs: torch.Tensor | None, model: nn.Module) -> tuple[torch.Tensor, float]:
    """A per-row ``speed [B]`` as float32 on the model's device and its largest value, or an error
    that says what is wrong."""
    device = model_device(model)
    rows = None if inputs is None else inputs.shape[0]
    if not speed.is_floating_point():
        raise TypeError(f"a per-row speed must be a float tensor [B], got {speed.dtype}")
    if rows is not None and speed.shape != (rows,):
        raise ValueError(f"a per-row speed must have shape [B] = [{rows}], got {tuple(speed.shape)}")
    if speed.device != device:
        raise ValueError(f"speed is on {speed.device} but the model is on {device}")
    speed = speed.float()
    # Validity and the largest speed in one host read (NaN fails both comparisons).
    valid, largest = host_read(torch.stack([((speed >= 0) & (speed <= 1)).all().float(), speed.max()]))
    if not valid:
        raise ValueError("every per-row speed must be in [0, 1]")
    return speed, largest


def _adaptive(
    model, arch: Architecture, layers, inputs: EncoderInputs, rule: ExitRule, per_row: torch.Tensor | None = None
):
    """Layers with exits under ``rule``; returns logits ``[B, C]``, exit layer ``[B]`` and
    uncertainty ``[B]``. A student outside ``rule.students`` is not run, and the rows' patience
    streaks pass it unchanged (patience counts evaluated students).
    With ``per_row`` ``[B]``, row r is confident when its uncertainty is below ``per_row[r]``
    (looked up through the original-row map). With patience > 1 each row's streak state is
    compacted with it.

    Host syncs: one per forward (the input check) and one per layer that runs a branch (inside
    compaction, for the survivors' count, length and padding); the mask is rebuilt from what
    compaction reports, without transformers' own padding check."""
    config = fastbert_config(model)
    criterion, temperature, patience = rule.criterion, rule.temperature, rule.patience
    hidden, mask = inputs.hidden, inputs.mask
    num_layers, batch, device = len(layers), hidden.shape[0], hidden.device
    num_labels = model.config.num_labels
    rows = torch.arange(batch, device=device)
    # One float32 buffer per sample: [logits (C) | uncertainty | exit layer], so that each layer's
    # exits are written with one gather-where-scatter and no host sync (exit layers are small
    # integers, exact in float32).
    answers = torch.zeros(batch, num_labels + 2, dtype=torch.float32, device=device)
    answers[:, -1] = num_layers
    student_branches = branch_modules(model)
    # The survivors' count is data-dependent: eager stops as soon as nobody is left; a compiled
    # graph cannot branch on it and runs the remaining layers on an empty batch instead.
    eager = not torch.compiler.is_compiling()
    context = layer_context(model, arch, hidden, mask, inputs.padded)
    streak = None  # the rows' patience state, from the second student on (patience > 1 only)
    for index, layer in enumerate(layers):
        hidden = arch.run(model, index, layer, hidden, context)
        if index == num_layers - 1:
            break
        if not rule.evaluates(index + 1):
            continue
        logits, row_uncertainty, exits, new_streak = student_branches[index].exit_decision(hidden, mask, rule, streak)
        if per_row is not None:
            # new_streak[:, 0] is the op's prediction (0 for a non-finite row), whatever the speed.
            exits, new_streak = update_streak(new_streak[:, 0], row_uncertainty, per_row[rows], patience, streak)
        kept = ops.compact_unchecked(hidden, mask, rows, ~exits, config.trim_sequence)
        if patience > 1:
            streak = kept.carry(new_streak)
        # The compaction's host read says whether anyone left: only then are answers written (at
        # batch 1 and low speeds most layers have no exit, and skip these small ops entirely).
        if kept.rows.shape[0] < rows.shape[0] or not eager:
            layer_column = torch.full_like(row_uncertainty[:, None], index + 1)
            found = torch.cat([logits, row_uncertainty[:, None], layer_column], dim=1)
            answers[rows] = torch.where(exits[:, None], found, answers[rows])
        hidden, mask, rows = kept.hidden, kept.mask, kept.rows
        if eager and rows.shape[0] == 0:
            break
        if kept.changed:  # otherwise nobody left, nothing was trimmed, and the layer context still holds
            context = layer_context(model, arch, hidden, mask, kept.padded)
    if not eager or rows.shape[0]:
        final = teacher_logits(model, arch, hidden, mask)
        answers[rows, :num_labels] = final.to(torch.float32)
        answers[rows, num_labels] = uncertainty(final, criterion, temperature)
    return answers[:, :num_labels], answers[:, -1].to(torch.int64), answers[:, num_labels].contiguous()


def patch(model: nn.Module, config: FastBertConfig | None = None, **options) -> nn.Module:
    """Adds FastBERT branches to a ``...ForSequenceClassification`` model, in place, and returns it.

    Args:
        model: a supported Hugging Face classifier (``bert``, ``roberta``, ``xlm-roberta``).
        config: a :class:`FastBertConfig`; or pass its fields as keyword options, e.g.
            ``patch(model, teacher="branch", exit_rule=fbk.ExitRule(speed=0.3))``.
    The model's own weights are untouched; :func:`unpatch` removes everything this adds.
    New branches are initialised as BERT initialises its weights; distil them before use.
    """
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched; call fastbert_kernels.unpatch(model) first")
    if config is not None and options:
        raise TypeError("pass either a FastBertConfig or keyword options, not both")
    config = config or FastBertConfig.from_options(**options)
    arch = architecture_for(model)
    num_layers = len(arch.layers(model))
    config.exit_rule.check_for(num_layers)
    if num_layers < 2 and config.teacher == "model":
        raise ValueError("a 1-layer model has no room for students; use teacher='branch' or a deeper model")
    reference = next(model.parameters())
    count = num_layers - 1 if config.teacher == "model" else num_layers
    new_branches = nn.ModuleList(
        BranchClassifier(model.config.hidden_size, model.config.num_labels, config.branch_size, config.branch_heads)
        for _ in range(count)
    )
    for branch in new_branches:
        branch.reset_parameters(getattr(model.config, "initializer_range", 0.02))
    new_branches.to(device=reference.device, dtype=reference.dtype)
    new_branches.train(model.training)
    model.add_module(BRANCHES_ATTR, new_branches)
    setattr(model, CONFIG_ATTR, config)
    # Instance attributes shadow the class's methods; deleting them restores the originals. They
    # are partials of module-level functions, not bound methods, so that the patched model pickles
    # (a bound method pickles as getattr(model, name), which the class does not have).
    model.forward = functools.partial(adaptive_forward, model)
    model.save_pretrained = functools.partial(save_pretrained_with_branches, model)
    # Trainer's predictions then hold the logits alone, as for the unpatched model; pass
    # ignore_keys=[] to evaluate/predict to get (logits, exit_layer, uncertainty).
    ignored = list(getattr(model.config, "keys_to_ignore_at_inference", None) or [])
    model.config.keys_to_ignore_at_inference = ignored + [k for k in _EXTRA_OUTPUTS if k not in ignored]
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Removes what :func:`patch` added; the model then behaves exactly as before patching."""
    branch_modules(model)  # raises when unpatched
    delattr(model, BRANCHES_ATTR)
    delattr(model, CONFIG_ATTR)
    for name in ("forward", "save_pretrained"):
        model.__dict__.pop(name, None)
    kept = [k for k in model.config.keys_to_ignore_at_inference if k not in _EXTRA_OUTPUTS]
    if kept == list(getattr(type(model.config), "keys_to_ignore_at_inference", None) or []):
        model.config.__dict__.pop("keys_to_ignore_at_inference", None)  # the class's own value again
    else:
        model.config.keys_to_ignore_at_inference = kept
    return model
