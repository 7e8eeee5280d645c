"""The demo and end-to-end benchmark: fine-tune the packaged all-MiniLM-L6-v2 on a real data set,
distil its students, then time a sweep of speeds (and static-depth baselines) against the unpatched
model and calibrate a speed on the validation split. Checkpoints are cached by content.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from ..batching import make_batches
from ..calibration import Calibration, ExitProfile, calibrate, exit_profile
from .benchmarking import BenchRow, benchmark
from .data import load_dataset, packaged_model_dir
from .environment import environment

DEFAULT_SPEEDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# The batch the demo evaluates and times at (besides batch 1), and the one it trains with.
BATCH_SIZE = 64
TRAIN_BATCH_SIZE = 32
# Calibration target: the fastest exit rule within this accuracy drop of the teacher, on validation.
MAX_ACCURACY_DROP = 0.01


def _cache_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _teacher_settings(args: argparse.Namespace, dataset) -> dict:
    return dict(
        lr=args.lr,
        data=dataset.name,
        content=dataset.fingerprint(),
        epochs=args.epochs,
        max_train=args.max_train,
        max_length=args.max_length,
        seed=args.seed,
        teacher=args.teacher,
    )


def distill_settings(args: argparse.Namespace) -> dict:
    """The distillation recipe the demo's command line asks for (part of the students' cache key)."""
    settings = dict(lr=args.distill_lr, epochs=args.distill_epochs, label_weight=args.distill_label_weight)
    # Added only when set, so that the cached students of recipes without clipping keep their key.
    if args.distill_max_grad_norm:
        settings["max_grad_norm"] = args.distill_max_grad_norm
    return settings


def prepare_teacher(args: argparse.Namespace, dataset, tokenizer) -> tuple[object, dict]:
    """The fine-tuned teacher, patched (fresh students), from the cache when it is there. The
    cache key holds the teacher's settings only, so that distillation recipes share one teacher."""
    from transformers import AutoModelForSequenceClassification

    import fastbert_kernels as fbk

    teacher_dir = Path(args.cache_dir) / f"{dataset.name}-teacher-{_cache_key(**_teacher_settings(args, dataset))}"
    timings = {}
    torch.manual_seed(args.seed)
    if (teacher_dir / "config.json").is_file():
        print(f"using cached fine-tuned teacher {teacher_dir}")
        model = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir), local_files_only=True)
        return fbk.patch(model, teacher=args.teacher), timings
    model = AutoModelForSequenceClassification.from_pretrained(
        str(packaged_model_dir()),
        num_labels=dataset.num_labels,
        local_files_only=True,
        id2label=dict(enumerate(dataset.label_names)),
        label2id={n: i for i, n in enumerate(dataset.label_names)},
    )
    if args.teacher == "branch":
        fbk.patch(model, teacher="branch")
    train = dataset.train.head(args.max_train)
    begin = time.perf_counter()
    fbk.fine_tune(
        model,
        train.texts,
        train.labels,
        tokenizer,
        epochs=args.epochs,
        batch_size=TRAIN_BATCH_SIZE,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
    )
    timings["fine_tune_s"] = time.perf_counter() - begin
    if args.teacher == "model":
        model.save_pretrained(teacher_dir)
        fbk.patch(model, teacher="model")
    return model, timings


def prepare_model(args: argparse.Namespace, dataset):
    """Fine-tuned teacher and distilled students, from the cache when they are there."""
    from transformers import AutoTokenizer

    import fastbert_kernels as fbk

    settings = dict(_teacher_settings(args, dataset), distill=distill_settings(args))
    fast_dir = Path(args.cache_dir) / f"{dataset.name}-fastbert-{_cache_key(**settings)}"
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    if (fast_dir / "fastbert_config.json").is_file():
        print(f"using cached distilled model {fast_dir}")
        return fbk.from_pretrained(fast_dir), tokenizer, {}
    model, timings = prepare_teacher(args, dataset, tokenizer)
    train = dataset.train.head(args.max_train)
    begin = time.perf_counter()
    # Self-distillation needs no labels: the training texts serve as unlabelled in-domain text. With
    # a label weight, the labels the teacher was fine-tuned with add a cross-entropy term.
    recipe = distill_settings(args)
    fbk.distill(
        model,
        train.texts,
        tokenizer,
        labels=train.labels if recipe["label_weight"] > 0 else None,
        label_weight=recipe["label_weight"],
        epochs=recipe["epochs"],
        batch_size=TRAIN_BATCH_SIZE,
        lr=recipe["lr"],
        max_grad_norm=recipe.get("max_grad_norm"),
        max_length=args.max_length,
        seed=args.seed,
    )
    timings["distill_s"] = time.perf_counter() - begin
    model.eval()
    model.save_pretrained(fast_dir)
    tokenizer.save_pretrained(fast_dir)
    return model, tokenizer, timings


def _write_results(rows, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [r.as_dict() for r in rows]
    with path.open("w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _finish_plot(fig, ax, title: str, path: Path) -> None:
    """Title, grid and legend, then written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch_size, marker in ((BATCH_SIZE, "o"), (1, "s")):
        fast = [r for r in rows if r.method == "fastbert" and r.batch_size == batch_size]
        if fast:
            ax.plot(
                [r.wallclock_speedup for r in fast],
                [100 * r.accuracy for r in fast],
                marker=marker,
                label=f"FastBERT, batch {batch_size}, {fast[0].samples} test texts, speed 0 ... {fast[-1].setting:g}",
            )
    static = [r for r in rows if r.method == "static" and r.batch_size == BATCH_SIZE]
    if static:
        ax.plot(
            [r.wallclock_speedup for r in static],
            [100 * r.accuracy for r in static],
            "^--",
            label=f"first k layers + student k, batch {BATCH_SIZE}",
        )
        for r in static:
            ax.annotate(f"k={int(r.setting)}", (r.wallclock_speedup, 100 * r.accuracy), fontsize=8)
    hf = [r for r in rows if r.method == "huggingface" and r.batch_size == BATCH_SIZE]
    if hf:
        ax.plot([1.0], [100 * hf[0].accuracy], "k*", markersize=12, label="unpatched Hugging Face (sdpa)")
    ax.set_xlabel("wall-clock speed-up over the unpatched model (same process)")
    ax.set_ylabel("test accuracy (%)")
    _finish_plot(fig, ax, title, path)


def _print_table(rows: list[BenchRow]) -> None:
    by = {(r.method, r.setting, r.rule, r.batch_size): r for r in rows}
    print(
        f"\n{'method':<12}{'setting':>8}  {'rule':<28}{'accuracy':>10}{'exit layer':>12}{'FLOPs x':>9}"
        f"{'wall x b1':>11}{'wall x b64':>12}{'ideal x b64':>13}{'eff. b64':>10}"
    )
    for r in rows:
        if r.batch_size != BATCH_SIZE:
            continue
        single = by.get((r.method, r.setting, r.rule, 1))
        wall1 = f"{single.wallclock_speedup:.2f}" if single else "-"
        print(
            f"{r.method:<12}{r.setting:>8.4g}  {r.rule:<28}{100 * r.accuracy:>9.2f}%{r.mean_exit_layer:>12.2f}"
            f"{r.flops_speedup:>9.2f}{wall1:>11}{r.wallclock_speedup:>12.2f}{r.ideal_speedup:>13.2f}{r.efficiency:>10.2f}"
        )


def student_accuracy(profile: ExitProfile, labels: torch.Tensor) -> list[float]:
    """Each classifier's accuracy on its own (students, then the teacher)."""
    return (profile.prediction == labels[:, None]).float().mean(0).tolist()


def _plot_calibration(calibration: Calibration, path: Path, title: str, budget_drop: float) -> None:
    """Each criterion's curve (at its best temperature and patience): validation accuracy against
    the ideal speed-up, with the 1-point budget and the chosen setting marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for criterion, best in calibration.best.items():
        if best is None:
            continue
        curve = calibration.curves[best.rule.replace(speed=0.0)]
        ax.plot(
            [s.speedup for s in curve],
            [100 * s.accuracy for s in curve],
            label=f"{criterion}, T={best.rule.temperature:g}, patience {best.rule.patience}",
        )
        ax.plot([best.speedup], [100 * best.accuracy], "o", color=ax.lines[-1].get_color())
    budget = 100 * (calibration.teacher_accuracy - budget_drop)
    ax.axhline(budget, color="k", linestyle=":", label=f"teacher - {100 * budget_drop:g} point")
    ax.set_xlabel("ideal speed-up (FLOPs at real lengths)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(max(0.0, budget - 25), 100 * calibration.teacher_accuracy + 3)
    _finish_plot(fig, ax, title, path)


def evaluate(args: argparse.Namespace, model, tokenizer, dataset, out_dir: Path, meta: dict) -> list[BenchRow]:
    """Calibrates the exit rule on validation (certified and label-free; the point-estimate pick
    per criterion beside it), then times the speed sweep, those rules and the static baselines on
    test against the unpatched model."""
    device = next(model.parameters()).device
    validation = dataset.validation.head(args.max_test)
    profile = exit_profile(model, make_batches(tokenizer, validation.texts, BATCH_SIZE, args.max_length, device))
    labels = torch.tensor(validation.labels)
    accuracies = student_accuracy(profile, labels)
    print(
        "validation accuracy of each classifier alone (layers 1..L, the last is the teacher): "
        + " / ".join(f"{100 * a:.1f}%" for a in accuracies)
    )
    calibration = calibrate(
        model,
        profile,
        labels=labels,
        max_accuracy_drop=args.max_accuracy_drop,
        certified=False,
        student_sets="all",
        apply=False,
    )
    print(
        f"\ncalibrated on validation, uncertified (the fastest rule whose point estimate is within "
        f"{100 * args.max_accuracy_drop:g} point of the teacher):"
    )
    print(calibration.table())
    # The rule the demo keeps: label-free and certified, on the held-out validation texts (neither
    # train nor test). Should nothing certify, the point-estimate pick stands in, and says so.
    kept = calibration
    try:
        kept = calibrate(model, profile, max_disagreement=args.max_accuracy_drop, apply=False)
        print(f"\ncertified, label-free: {kept.rule.describe()}\n{kept.certificate}")
    except ValueError as err:
        print(f"\ncertified, label-free: {err}; keeping the uncertified pick")
    rules = list(dict.fromkeys([kept.rule] + [best.rule for best in calibration.best.values() if best is not None]))

    test = dataset.test.head(args.max_test)
    depths = list(range(1, model.config.num_hidden_layers))
    common = dict(max_length=args.max_length, rules=rules)
    rows = benchmark(
        model,
        tokenizer,
        test.texts,
        test.labels,
        args.speeds,
        batch_size=BATCH_SIZE,
        static_depths=depths,
        repeats=args.repeats,
        **common,
    )
    single = test.head(args.batch1_samples)
    rows += benchmark(
        model,
        tokenizer,
        single.texts,
        single.labels,
        args.speeds,
        batch_size=1,
        repeats=max(1, args.repeats - 1),
        **common,
    )
    _print_table(rows)
    kept.apply(model)
    chosen = kept.chosen
    on_test = next(
        r for r in rows if r.method == "calibrated" and r.batch_size == BATCH_SIZE and r.rule == chosen.rule.describe()
    )
    print(
        f"\nkept: {chosen.rule.describe()}; "
        f"on test {100 * on_test.accuracy:.2f}% (unpatched {100 * rows[0].accuracy:.2f}%), "
        f"{on_test.wallclock_speedup:.2f}x wall-clock at batch {BATCH_SIZE} (ideal {on_test.ideal_speedup:.2f}x)"
    )
    summary = {
        "chosen": chosen.as_dict(),
        "certificate": None if kept.certificate is None else kept.certificate.as_dict(),
        "teacher_accuracy": calibration.teacher_accuracy,
        "best_per_criterion": {c: (b.as_dict() if b else None) for c, b in calibration.best.items()},
        "classifier_accuracy": accuracies,
    }
    meta = {**meta, "calibration": json.dumps(summary)}
    _write_results(rows, out_dir / "results.csv", meta)
    _plot(rows, out_dir / "speed_accuracy.png", f"{dataset.name}: all-MiniLM-L6-v2 + FastBERT on {meta['device']}")
    _plot_calibration(
        calibration, out_dir / "calibration.png", f"{dataset.name}: exit criteria on validation", args.max_accuracy_drop
    )
    print(f"\nwrote {out_dir / 'results.csv'}, {out_dir / 'speed_accuracy.png'} and {out_dir / 'calibration.png'}")
    return rows


def cmd_demo(args: argparse.Namespace) -> int:

    begin = time.perf_counter()
    try:
        dataset = load_dataset(args.data, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{dataset.name}: {len(dataset.train)} train / {len(dataset.validation)} validation / "
        f"{len(dataset.test)} test, {dataset.num_labels} classes"
    )
    model, tokenizer, timings = prepare_model(args, dataset)
    env = environment()
    meta = {
        "command": " ".join(["python -m fastbert_kernels", *sys.argv[1:]]),
        "device": env["cuda_device"] if torch.cuda.is_available() else f"CPU, {env['cpu_threads']} threads",
        "versions": json.dumps({k: env[k] for k in ("fastbert_kernels", "torch", "transformers", "triton")}),
        "backend": json.dumps(env["backends"]),
        **{k: f"{v:.0f}" for k, v in timings.items()},
    }
    out_dir = Path(args.out) / dataset.name
    evaluate(args, model, tokenizer, dataset, out_dir, meta)
    print(f"total time {time.perf_counter() - begin:.0f} s")
    return 0
