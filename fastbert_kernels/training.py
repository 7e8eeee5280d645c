"""Training: fine-tuning the teacher, and self-distillation of the students.

Self-distillation (README, "The algorithm"): backbone and teacher frozen; every student i learns the teacher's
distribution on unlabelled text,  loss = sum_i KL(p_teacher || p_student_i)  (the authors' code's
direction). The learning-rate schedule is linear warm-up then linear decay to zero over *this*
run's own step count (the authors' code reused the fine-tuning step count, so the rate hit zero early).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import distributed
from .architectures import architecture_for
from .encoder import EncoderInputs, all_layer_states, embed, model_device
from .modeling import teacher_logits
from .state import DISTILLED_TEXTS_ATTR, branch_modules, fastbert_config, is_patched, students

Batch = dict[str, torch.Tensor]
CHECKPOINT_FILE = "distill_state.pt"
# What a batch may hand to the model's forward (tokenizers add others for some models).
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """The optimiser loop's settings, shared by :func:`distill` and :func:`fine_tune` (each has its
    own defaults: :data:`DISTILL_DEFAULTS`, :data:`FINE_TUNE_DEFAULTS`).

    AdamW at ``lr`` with linear warm-up over ``warmup_ratio`` of the steps and linear decay;
    ``max_grad_norm``: clip the gradients' global norm to this before each step (None: never);
    ``batch_size`` is the global batch (split over the processes of a distributed run);
    ``checkpoint_dir``: save the run's state every ``checkpoint_every`` steps and resume from it;
    ``max_steps``: stop after this many steps in total (for interrupting on purpose)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    seed: int = 0
    progress: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 50
    max_steps: int | None = None


# Distillation of freshly initialised students: 3 epochs at 3e-3 with the gradient norm clipped to
# 1, no weight decay. The authors' 10x the fine-tuning rate (2e-4, 1 epoch) left 77-class students
# at 3-16% (README, "Distillation recipes"); 1e-2, or 3e-3 without clipping, let some students
# diverge.
DISTILL_DEFAULTS = TrainingOptions()
# Fine-tuning: the usual BERT recipe.
FINE_TUNE_DEFAULTS = TrainingOptions(epochs=2, lr=2e-5, weight_decay=0.01, max_grad_norm=None)


def _options(defaults: TrainingOptions, options: TrainingOptions | None, overrides: dict) -> TrainingOptions:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainingOptions)})
    if unknown:
        raise TypeError(f"unknown training options {unknown}; see fastbert_kernels.TrainingOptions")
    return dataclasses.replace(options or defaults, **overrides)


@dataclasses.dataclass
class TrainHistory:
    """Per optimiser step: the loss and the learning rate used."""

    loss: list[float] = dataclasses.field(default_factory=list)
    lr: list[float] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.loss)


def _text_batches(
    texts: Sequence[str], labels: Sequence[int] | None, tokenizer, batch_size: int, max_length: int, order: list[int]
) -> Iterator[Batch]:
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = dict(
            tokenizer(
                [texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        if labels is not None:
            batch["labels"] = torch.tensor([labels[i] for i in chosen], dtype=torch.int64)
        yield batch


def _as_text_list(data):
    """A pandas Series, numpy array or other one-dimensional collection of strings as a list of str;
    anything else (a list, a DataLoader, an iterable of batches) unchanged."""
    if hasattr(data, "tolist") and getattr(data, "ndim", None) == 1:
        values = data.tolist()
        if values and all(isinstance(v, str) for v in values):
            return values
    return data


class BatchSource:
    """Batches for one epoch at a time: from texts (tokenised here, shuffled with a seeded order) or
    from an iterable of tokenised batches such as a DataLoader (used as it comes)."""

    def __init__(
        self,
        data: Sequence[str] | Iterable[Batch],
        tokenizer=None,
        labels: Sequence[int] | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if isinstance(data, str):
            raise TypeError("data is one string; pass a list of texts (a string would train on its characters)")
        data = _as_text_list(data)
        self.is_text = isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], str)
        if isinstance(data, Sequence) and len(data) == 0:
            raise ValueError("no training data: the sequence is empty")
        if self.is_text and tokenizer is None:
            raise ValueError("texts need a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
        if labels is not None and self.is_text and len(labels) != len(data):
            raise ValueError(f"{len(data)} texts but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.tokenizer, self.labels = data, tokenizer, labels
        self.batch_size, self.max_length, self.shuffle, self.seed = batch_size, max_length, shuffle, seed

    def __len__(self) -> int:
        if self.is_text:
            return math.ceil(len(self.data) / self.batch_size)
        if not hasattr(self.data, "__len__"):
            raise TypeError("the batch iterable has no len(); pass a DataLoader or a list of batches")
        return len(self.data)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if not self.is_text:
            yield from self.data
            return
        order = list(range(len(self.data)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        yield from _text_batches(self.data, self.labels, self.tokenizer, self.batch_size, self.max_length, order)


def _encode(model: nn.Module, batch: Batch) -> EncoderInputs:
    device = model_device(model)
    arch = architecture_for(model)
    get = lambda key: batch[key].to(device) if batch.get(key) is not None else None  # noqa: E731
    return embed(model, arch, get("input_ids"), get("attention_mask"), get("token_type_ids"))


def _student_losses(model: nn.Module, batch: Batch, label_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """Per student ``[L-1]``, summed over the batch: KL(p_teacher || p_student_i), plus
    ``label_weight`` x the cross-entropy against ``batch["labels"]`` when the weight is positive;
    and the batch size. The backbone and the teacher run without gradients: only the students
    learn from this."""
    arch = architecture_for(model)
    with torch.no_grad():
        inputs = _encode(model, batch)
        states = all_layer_states(model, arch, inputs)
        log_teacher = torch.log_softmax(teacher_logits(model, arch, states[-1], inputs.mask).float(), dim=-1)
    labels = None
    if label_weight > 0:
        if batch.get("labels") is None:
            raise ValueError("label_weight > 0 needs labels: pass labels=... or batches with a 'labels' key")
        labels = batch["labels"].to(log_teacher.device)
    losses = []
    for i, student in enumerate(students(model)):
        log_student = torch.log_softmax(student(states[i], inputs.mask), dim=-1)
        loss = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
        if labels is not None:
            loss = loss + label_weight * F.nll_loss(log_student, labels, ignore_index=-100, reduction="sum")
        losses.append(loss)
    return torch.stack(losses), inputs.hidden.shape[0]


def _student_kls(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed KL(p_teacher || p_student_i) over the batch, per student ``[L-1]``, and the batch size."""
    return _student_losses(model, batch)


def _distillation_loss(model: nn.Module, batch: Batch, label_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """sum_i [KL(p_teacher || p_student_i) + label_weight CE(y, p_student_i)] summed over the
    batch's rows, and the row count (the training loop divides by the global batch's rows, so that
    every process agrees)."""
    losses, size = _student_losses(model, batch, label_weight)
    return losses.sum(), size


@torch.no_grad()
def student_kl(model: nn.Module, data, tokenizer=None, batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean KL(p_teacher || p_student_i) per student on ``data`` (texts or batches): ``[L-1]``."""
    was_training = model.training
    model.eval()
    try:
        source = BatchSource(data, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=False)
        total, count = None, 0
        for batch in source.epoch(0):
            kls, size = _student_kls(model, batch)
            total = kls if total is None else total + kls
            count += size
    finally:
        model.train(was_training)
    return total / count


def _local_rows(batch: Batch, rows: slice) -> Batch:
    return {key: value[rows] for key, value in batch.items()}


def _run(
    model: nn.Module,
    params: list[nn.Parameter],
    source: BatchSource,
    loss_fn,
    options: TrainingOptions,
    *,
    train_mode: bool,
    desc: str,
) -> TrainHistory:
    """One optimiser loop (AdamW, linear warm-up and decay over this run's own steps), resumable
    from ``checkpoint_dir``, alone or in a torch.distributed group.

    ``loss_fn(batch) -> (summed loss, rows)``. Distributed, every process walks the same global
    batches (the same seeded order) and computes its contiguous share of each one's rows; the
    gradients of ``params`` (only those: the frozen backbone and teacher are never reduced) and
    the loss are summed over the group in one all-reduce and divided by the global batch's rows.
    So N processes take the same steps as one process with the same global batch, to float
    rounding, and their optimisers stay in lockstep: the checkpoint, written by rank 0, resumes at
    any world size.
    """
    epochs, checkpoint_dir, max_steps = options.epochs, options.checkpoint_dir, options.max_steps
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    group = distributed.context(model_device(model))
    steps_per_epoch = len(source)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    warmup = round(options.warmup_ratio * total)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
    history, step = TrainHistory(), 0
    state_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if state_path is not None and state_path.is_file():
        # Plain tensors, numbers and lists only: loading never runs code from the directory.
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        if state["total"] != total or len(state["params"]) != len(params):
            raise ValueError(f"{state_path} belongs to a different run (steps or parameters differ); remove it")
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = TrainHistory(loss=list(state["history"]["loss"]), lr=list(state["history"]["lr"]))
        step = state["step"]

    def save() -> None:
        if not group.is_main:
            return
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "total": total,
            "step": step,
            "params": [p.detach().cpu().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": {"loss": history.loss, "lr": history.lr},
        }
        partial = state_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(state_path)  # atomic: a kill never leaves half a checkpoint

    was_training = model.training
    model.train(train_mode)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (options.progress and group.is_main), unit="step")
    try:
        for epoch in range(step // steps_per_epoch, epochs):
            for position, batch in enumerate(source.epoch(epoch)):
                if epoch * steps_per_epoch + position < step:
                    continue  # consumed before the checkpoint this run resumed from
                if max_steps is not None and step >= max_steps:
                    return history
                optimizer.zero_grad(set_to_none=False)
                rows = next(iter(batch.values())).shape[0]
                local = _local_rows(batch, group.rows(rows))
                local_loss = torch.zeros((), device=params[0].device)
                if next(iter(local.values())).shape[0] > 0:
                    summed, _ = loss_fn(local)
                    (summed / rows).backward()
                    local_loss = summed.detach() / rows
                _reduce(group, params, local_loss)
                history.lr.append(scheduler.get_last_lr()[0])
                if options.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                history.loss.append(float(local_loss))
                bar.update(1)
                bar.set_postfix(loss=f"{history.loss[-1]:.4f}")
                if state_path is not None and step % options.checkpoint_every == 0:
                    save()
    finally:
        bar.close()
        model.train(was_training)
        if state_path is not None and step > 0:
            save()
    return history


def _reduce(group: distributed.Context, params: list[nn.Parameter], loss: torch.Tensor) -> None:
    """Sums every process's gradients of ``params`` and its loss, in one all-reduce, in place."""
    if not group.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
    group.all_reduce_sum(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    loss.copy_(flat[-1])


def distill(
    model: nn.Module,
    data: Sequence[str] | Iterable[Batch],
    tokenizer=None,
    options: TrainingOptions | None = None,
    *,
    labels: Sequence[int] | None = None,
    label_weight: float = 0.0,
    **overrides,
) -> TrainHistory:
    """Self-distillation of every student from the teacher; backbone and teacher stay bit-identical.

    Args:
        model: a patched model (:func:`fastbert_kernels.patch`).
        data: unlabelled texts (with ``tokenizer``) or an iterable/DataLoader of tokenised batches
            (dicts with ``input_ids``, ``attention_mask``, optionally ``token_type_ids``).
        labels: the texts' labels, for ``label_weight`` (batches carry theirs in a ``labels`` key).
        label_weight: when positive, each student's loss adds this weight times its cross-entropy
            against the labels, for when the labels the teacher was fine-tuned with are at hand.
            Default 0: the paper's label-free distillation.
        options: a :class:`TrainingOptions` (default :data:`DISTILL_DEFAULTS`), or its fields as
            keyword arguments (``distill(model, texts, tokenizer, epochs=3, lr=1e-3)``). An
            interrupted run resumed from ``checkpoint_dir`` ends with the same students as an
            uninterrupted one.
    Returns:
        the per-step loss and learning rate.
    """
    options = _options(DISTILL_DEFAULTS, options, overrides)
    if not is_patched(model):
        raise ValueError("distill needs a patched model: call fastbert_kernels.patch(model) first")
    student_params = [p for s in students(model) for p in s.parameters()]
    if not student_params:
        raise ValueError("this model has no students to distil")
    if label_weight < 0:
        raise ValueError(f"label_weight must be >= 0, got {label_weight}")
    if labels is not None and label_weight == 0:
        raise ValueError("labels were given but label_weight is 0: pass label_weight > 0 to use them")
    source = BatchSource(
        data, tokenizer, labels, batch_size=options.batch_size, max_length=options.max_length, seed=options.seed
    )
    torch.manual_seed(options.seed)
    history = _run(
        model,
        student_params,
        source,
        lambda b: _distillation_loss(model, b, label_weight),
        options,
        train_mode=False,
        desc="distilling students",
    )
    fastbert_config(model).students_trained = True  # saved with the checkpoint
    if isinstance(data, Sequence) and data and isinstance(data[0], str):
        object.__setattr__(model, DISTILLED_TEXTS_ATTR, frozenset(hash(t) for t in data))
    return history


def fine_tune(
    model: nn.Module,
    texts: Sequence[str] | Iterable[Batch],
    labels: Sequence[int] | None = None,
    tokenizer=None,
    options: TrainingOptions | None = None,
    **overrides,
) -> TrainHistory:
    """Fine-tunes the backbone and the teacher on the loss the model itself returns (Hugging Face's
    cross-entropy; the paper's step 1).

    Works on an unpatched classifier, or a patched one (students untouched; with
    ``teacher='branch'`` the paper's teacher branch is trained in place of the model's head).
    Data: texts + labels (+ tokenizer), or batches that carry ``labels``. Options as for
    :func:`distill` (default :data:`FINE_TUNE_DEFAULTS`).
    """
    options = _options(FINE_TUNE_DEFAULTS, options, overrides)
    patched = is_patched(model)
    frozen = {id(p) for s in students(model) for p in s.parameters()} if patched else set()
    if patched and fastbert_config(model).teacher == "model":
        frozen |= {id(p) for p in branch_modules(model).parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen and p.requires_grad]
    source = BatchSource(
        texts, tokenizer, labels, batch_size=options.batch_size, max_length=options.max_length, seed=options.seed
    )
    device = model_device(model)
    # A patched model's forward trains at speed 0 (the unpatched computation, its own loss).
    extra = {"speed": 0.0} if patched else {}

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, int]:
        if "labels" not in batch:
            raise ValueError("fine-tuning needs labels: pass labels=... or batches with a 'labels' key")
        inputs = {k: v.to(device) for k, v in batch.items() if k in _MODEL_INPUTS and v is not None}
        rows = inputs["labels"].shape[0]
        # The model's mean loss times the rows: _run divides the group's sum by the global rows.
        return model(**inputs, **extra).loss * rows, rows

    torch.manual_seed(options.seed)
    return _run(model, params, source, loss_fn, options, train_mode=True, desc="fine-tuning teacher")
