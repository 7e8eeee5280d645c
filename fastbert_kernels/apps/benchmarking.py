"""The benchmark harness: accuracy, exits, FLOPs and wall-clock of a patched model against the
unpatched Hugging Face model, measured in the same process and run.

The baseline is the model's own class ``forward`` (``type(model).forward``): exactly the unpatched
Hugging Face forward on the same weights, with no copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..architectures import architecture_for
from ..batching import make_batches
from ..encoder import embed, layer_context, run_layers
from ..exit_rule import ExitRule
from ..modeling import teacher_logits
from ..profile import flops_speedup
from ..state import fastbert_config, students

Batch = dict[str, torch.Tensor]
# The unpatched model is timed again after every this many methods, so that a drift in machine
# load during a long run shows up in the baseline too (the fastest baseline is the reference).
BASELINE_EVERY = 4


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(result, seconds) of ``fn``; on CUDA timed with events after a synchronisation."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(device)
        return result, start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - begin


@torch.no_grad()
def hf_predict(model, batches: list[Batch]) -> torch.Tensor:
    """Logits of the unpatched Hugging Face forward (the class's own method)."""
    forward = type(model).forward
    return torch.cat([forward(model, **b).logits.float() for b in batches])


@contextlib.contextmanager
def exit_rule(model, rule: ExitRule) -> Iterator[None]:
    """Within the block the model decides by ``rule``; its config's own rule is restored after."""
    config = fastbert_config(model)
    saved = config.exit_rule
    config.exit_rule = rule
    try:
        yield
    finally:
        config.exit_rule = saved


@torch.no_grad()
def fastbert_predict(model, batches: list[Batch], rule: ExitRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and exit layers ``[N]`` of the patched model under ``rule``."""
    logits, layers = [], []
    with exit_rule(model, rule):
        for b in batches:
            out = model(**b)
            logits.append(out.logits)
            layers.append(out.exit_layer)
    return torch.cat(logits), torch.cat(layers)


@torch.no_grad()
def static_depth_predict(model, batches: list[Batch], depth: int) -> torch.Tensor:
    """The first ``depth`` layers and the classifier after them (a student, or the teacher at L):
    what a statically smaller distilled model trades."""
    arch = architecture_for(model)
    layers = arch.layers(model)
    outputs = []
    for b in batches:
        inputs = embed(model, arch, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"))
        context = layer_context(model, arch, inputs.hidden, inputs.mask, inputs.padded)
        hidden = run_layers(model, arch, layers[:depth], inputs.hidden, context)
        if depth == len(layers):
            outputs.append(teacher_logits(model, arch, hidden, inputs.mask).float())
        else:
            outputs.append(students(model)[depth - 1](hidden, inputs.mask).float())
    return torch.cat(outputs)


@dataclasses.dataclass
class BenchRow:
    """One method at one batch size. Speed-ups are against the unpatched model in the same run."""

    method: str  # "huggingface", "fastbert" (the model's exit rule), "calibrated" (a given rule) or "static"
    setting: float  # speed for fastbert and calibrated, depth for static, 0 for huggingface
    batch_size: int
    samples: int
    accuracy: float
    mean_exit_layer: float
    flops_speedup: float
    ideal_speedup: float
    seconds: float
    baseline_seconds: float
    rule: str = ""  # the exit rule of a fastbert or calibrated row (ExitRule.describe())

    @property
    def wallclock_speedup(self) -> float:
        return self.baseline_seconds / self.seconds

    @property
    def efficiency(self) -> float:
        return self.wallclock_speedup / self.ideal_speedup

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "wallclock_speedup": self.wallclock_speedup, "efficiency": self.efficiency}


def benchmark(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    speeds: Sequence[float],
    batch_size: int,
    max_length: int = 128,
    static_depths: Sequence[int] = (),
    repeats: int = 3,
    progress: bool = True,
    rules: Sequence[ExitRule] = (),
) -> list[BenchRow]:
    """Times the unpatched model, the patched model at each speed (its own exit rule) and under
    each of ``rules`` (calibrated ones, say), and the static-depth baselines on the same tokenised
    batches. Each method runs ``repeats`` times, interleaved with the unpatched
    model, and the minimum of each is kept (the least-disturbed run), so that drifts in machine
    load hit both sides of every ratio."""
    device = next(model.parameters()).device
    model.eval()
    batches = make_batches(tokenizer, texts, batch_size, max_length, device)
    label_tensor = torch.tensor(list(labels))
    num_layers = model.config.num_hidden_layers
    lengths = torch.cat([b["attention_mask"].sum(1).cpu() for b in batches])
    padded = torch.cat([torch.full((b["input_ids"].shape[0],), b["input_ids"].shape[1]) for b in batches])

    # (method, speed or depth, the rule it runs, what to time)
    methods: list[tuple[str, float, ExitRule | None, Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = []
    full_depth = torch.full((len(texts),), num_layers)
    methods.append(("huggingface", 0.0, None, lambda: (hf_predict(model, batches), full_depth)))
    own = fastbert_config(model).exit_rule
    for speed in speeds:
        rule = own.replace(speed=speed)
        methods.append(("fastbert", speed, rule, lambda r=rule: fastbert_predict(model, batches, r)))
    for rule in rules:
        methods.append(("calibrated", rule.speed, rule, lambda r=rule: fastbert_predict(model, batches, r)))
    for depth in static_depths:
        methods.append(
            (
                "static",
                float(depth),
                None,
                lambda d=depth: (static_depth_predict(model, batches, d), torch.full((len(texts),), d)),
            )
        )

    fastbert_predict(model, batches[:1], own.replace(speed=max(speeds, default=0.0)))  # warm-up: allocator, kernels
    hf_predict(model, batches[:1])
    best: dict[int, float] = {}
    baseline: list[float] = []
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(total=repeats * len(methods), desc=f"timing at batch {batch_size}", disable=not progress)
    for _ in range(repeats):
        for index, (_, _, _, run) in enumerate(methods):
            if index % BASELINE_EVERY == 0:  # the baseline, interleaved through the run
                baseline.append(timed(lambda: hf_predict(model, batches), device)[1])
            result, seconds = timed(run, device)
            results[index] = result
            best[index] = min(best.get(index, float("inf")), seconds)
            bar.update(1)
    bar.close()
    base = min([*baseline, best[0]])
    rows = []
    for index, (method, setting, rule, _) in enumerate(methods):
        logits, exit_layers = results[index]
        exit_layers = exit_layers.cpu()
        mean_layer = float(exit_layers.float().mean())
        if method == "static":  # k layers and one branch: counted as layer work only
            speedups = (num_layers / mean_layer, num_layers / mean_layer)
        else:  # students run only at speed > 0 (the rule's); the unpatched model runs none
            ran = rule or ExitRule(speed=0.0)
            # FLOPs speed-up: the paper's accounting at the real lengths. Ideal: the work this
            # implementation does (fused branch) at the padded length each batch runs at.
            speedups = (
                flops_speedup(model, exit_layers, lengths, ran),
                flops_speedup(model, exit_layers, padded, ran, fused=True),
            )
        rows.append(
            BenchRow(
                method=method,
                setting=setting,
                batch_size=batch_size,
                samples=len(texts),
                accuracy=float((logits.argmax(-1).cpu() == label_tensor).float().mean()),
                mean_exit_layer=mean_layer,
                flops_speedup=speedups[0],
                ideal_speedup=speedups[1],
                seconds=best[index],
                baseline_seconds=base,
                rule="" if rule is None else rule.describe(),
            )
        )
    return rows
