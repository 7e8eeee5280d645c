"""Speed calibration: what every exit threshold would do on a validation set, from one pass.

:func:`exit_profile` runs every classifier on every sample once; since each sample's exit depends
on its own uncertainties only, the exits, accuracy and ideal speed-up at any speed then follow
exactly (:class:`ExitProfile`), and :func:`choose_speed` picks the speed for a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import flops
from .architectures import architecture_for
from .encoder import all_layer_states, embed
from .modeling import teacher_logits
from .ops.reference import normalized_entropy
from .state import fastbert_config, students

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class ExitProfile:
    """Every classifier's prediction and uncertainty for every sample, from one full pass:
    ``uncertainty [N, L]`` and ``prediction [N, L]`` (column L-1 is the teacher), ``lengths [N]``
    real tokens, ``padded [N]`` the padded length of the batch each sample ran in.

    Because exits are decided per sample, the exit layer at any speed follows exactly:
    the first layer whose student has ``u < speed``, else L (see :meth:`exit_layers`).
    """

    uncertainty: torch.Tensor
    prediction: torch.Tensor
    lengths: torch.Tensor
    padded: torch.Tensor

    def exit_layers(self, speed: float) -> torch.Tensor:
        num_layers = self.prediction.shape[1]
        below = self.uncertainty[:, :-1] < speed
        first = torch.where(
            below.any(1), below.float().argmax(1) + 1, torch.full_like(below[:, 0], num_layers, dtype=torch.int64)
        )
        return first.long()

    def predictions(self, speed: float) -> torch.Tensor:
        layer = self.exit_layers(speed)
        return self.prediction.gather(1, (layer - 1)[:, None]).squeeze(1)


@torch.no_grad()
def exit_profile(model, batches: list[Batch], temperature: float = 1.0) -> ExitProfile:
    """One full pass with every branch evaluated (reference math). ``temperature`` divides the
    students' logits before the entropy, to measure what sharpening does with many classes."""
    arch = architecture_for(model)
    us, preds, lengths, padded = [], [], [], []
    for b in batches:
        inputs = embed(model, arch, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"))
        states = all_layer_states(model, arch, inputs)
        logits = [s(states[i], inputs.mask).float() / temperature for i, s in enumerate(students(model))]
        logits.append(teacher_logits(model, arch, states[-1], inputs.mask).float())
        us.append(torch.stack([normalized_entropy(x) for x in logits], 1).cpu())
        preds.append(torch.stack([x.argmax(-1) for x in logits], 1).cpu())
        lengths.append(inputs.mask.sum(1).cpu())
        padded.append(torch.full((inputs.mask.shape[0],), inputs.mask.shape[1]))
    return ExitProfile(torch.cat(us), torch.cat(preds), torch.cat(lengths), torch.cat(padded))


def flops_speedup(
    model, exit_layers: torch.Tensor, seq_lengths: torch.Tensor, with_branches: bool = True, fused: bool = False
) -> float:
    """Full model FLOPs / adaptive FLOPs, each sample at ``seq_lengths`` tokens; branches counted as
    the paper does, or (``fused``) as the fused kernel runs them; ``with_branches=False`` for speed
    0, where no branch runs."""
    c = model.config
    settings = fastbert_config(model)
    full = adapt = 0.0
    for layer, seq in zip(exit_layers.tolist(), seq_lengths.tolist(), strict=True):
        full += flops.model_flops(c.num_hidden_layers, c.hidden_size, c.intermediate_size, seq, c.num_labels)
        adapt += flops.adaptive_flops(
            layer,
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            seq,
            c.num_labels,
            settings.branch_size,
            with_branches,
            fused,
            settings.branch_heads,
        )
    return full / adapt


def choose_speed(
    profile: ExitProfile,
    labels: torch.Tensor,
    model,
    max_accuracy_drop: float | None = None,
    min_speedup: float | None = None,
    speeds: Sequence[float] | None = None,
) -> tuple[float, dict[str, float]]:
    """Picks ``speed`` on a validation set, from its :class:`ExitProfile`:

    * ``max_accuracy_drop=d``: the largest speed whose accuracy is at least teacher accuracy - d;
    * ``min_speedup=s``: the smallest speed whose ideal speed-up (layer and branch work, FLOPs at the
      real lengths) reaches s.
    Returns the speed and its accuracy / speed-up. Raises if no speed meets the target.
    """
    if (max_accuracy_drop is None) == (min_speedup is None):
        raise ValueError("give exactly one of max_accuracy_drop or min_speedup")
    speeds = sorted(speeds if speeds is not None else [i / 200 for i in range(201)])
    labels = labels.cpu()
    teacher_accuracy = float((profile.prediction[:, -1] == labels).float().mean())
    table = []
    for speed in speeds:
        accuracy = float((profile.predictions(speed) == labels).float().mean())
        table.append((speed, accuracy, flops_speedup(model, profile.exit_layers(speed), profile.lengths)))
    if max_accuracy_drop is not None:
        ok = [row for row in table if row[1] >= teacher_accuracy - max_accuracy_drop]
        chosen = max(ok, key=lambda row: row[0])
    else:
        ok = [row for row in table if row[2] >= min_speedup]
        if not ok:
            best = max(row[2] for row in table)
            raise ValueError(f"no speed reaches a {min_speedup}x speed-up on this data (best {best:.2f}x)")
        chosen = min(ok, key=lambda row: row[0])
    return chosen[0], {"accuracy": chosen[1], "speedup": chosen[2], "teacher_accuracy": teacher_accuracy}
