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

from ..calibration import choose_speed, exit_profile
from .benchmarking import benchmark, make_batches
from .data import load_dataset, packaged_model_dir
from .environment import environment

DEFAULT_SPEEDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# The batch the demo evaluates and times at (besides batch 1), and the one it trains with.
BATCH_SIZE = 64
TRAIN_BATCH_SIZE = 32
# Calibration target: the largest speed within this accuracy drop of the teacher, on validation.
MAX_ACCURACY_DROP = 0.01
# Temperatures the many-class study simulates (1.0: the plain entropy).
STUDY_TEMPERATURES = (1.0, 0.5, 0.25)


def _cache_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def prepare_model(args: argparse.Namespace, dataset):
    """Fine-tuned teacher and distilled students, from the cache when they are there."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastbert_kernels as fbk

    base = packaged_model_dir()
    settings = dict(
        lr=args.lr,
        distill_lr=args.distill_lr,
        data=dataset.name,
        content=dataset.fingerprint(),
        epochs=args.epochs,
        distill_epochs=args.distill_epochs,
        max_train=args.max_train,
        max_length=args.max_length,
        seed=args.seed,
        teacher=args.teacher,
    )
    root = Path(args.cache_dir) / f"{dataset.name}-{_cache_key(**settings)}"
    teacher_dir, fast_dir = root / "teacher", root / "fastbert"
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    train = dataset.train.head(args.max_train)
    timings = {}
    if (fast_dir / "fastbert_config.json").is_file():
        print(f"using cached distilled model {fast_dir}")
        return fbk.from_pretrained(fast_dir), tokenizer, timings
    torch.manual_seed(args.seed)
    if (teacher_dir / "config.json").is_file():
        print(f"using cached fine-tuned teacher {teacher_dir}")
        model = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir), local_files_only=True)
        fbk.patch(model, teacher=args.teacher)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=dataset.num_labels,
            local_files_only=True,
            id2label=dict(enumerate(dataset.label_names)),
            label2id={n: i for i, n in enumerate(dataset.label_names)},
        )
        if args.teacher == "branch":
            fbk.patch(model, teacher="branch")
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
    begin = time.perf_counter()
    # Self-distillation needs no labels: the training texts serve as unlabelled in-domain text.
    fbk.distill(
        model,
        train.texts,
        tokenizer,
        epochs=args.distill_epochs,
        batch_size=TRAIN_BATCH_SIZE,
        lr=args.distill_lr,
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(rows) -> None:
    by = {(r.method, r.setting, r.batch_size): r for r in rows}
    print(
        f"\n{'method':<12}{'setting':>8}{'accuracy':>10}{'exit layer':>12}{'FLOPs x':>9}"
        f"{'wall x b1':>11}{'wall x b64':>12}{'ideal x b64':>13}{'eff. b64':>10}"
    )
    for r in rows:
        if r.batch_size != BATCH_SIZE:
            continue
        single = by.get((r.method, r.setting, 1))
        wall1 = f"{single.wallclock_speedup:.2f}" if single else "-"
        print(
            f"{r.method:<12}{r.setting:>8g}{100 * r.accuracy:>9.2f}%{r.mean_exit_layer:>12.2f}{r.flops_speedup:>9.2f}"
            f"{wall1:>11}{r.wallclock_speedup:>12.2f}{r.ideal_speedup:>13.2f}{r.efficiency:>10.2f}"
        )


def evaluate(args: argparse.Namespace, model, tokenizer, dataset, out_dir: Path, meta: dict) -> list:

    device = next(model.parameters()).device
    test = dataset.test.head(args.max_test)
    depths = list(range(1, model.config.num_hidden_layers))
    rows = benchmark(
        model,
        tokenizer,
        test.texts,
        test.labels,
        args.speeds,
        batch_size=BATCH_SIZE,
        max_length=args.max_length,
        static_depths=depths,
        repeats=args.repeats,
    )
    single = test.head(args.batch1_samples)
    rows += benchmark(
        model,
        tokenizer,
        single.texts,
        single.labels,
        args.speeds,
        batch_size=1,
        max_length=args.max_length,
        repeats=max(1, args.repeats - 1),
    )
    _print_table(rows)
    # Calibration on the validation split: the largest speed within 1 point of the teacher.
    validation = dataset.validation.head(args.max_test)
    validation_batches = make_batches(tokenizer, validation.texts, BATCH_SIZE, args.max_length, device)
    profile = exit_profile(model, validation_batches)
    labels = torch.tensor(validation.labels)
    speed, stats = choose_speed(profile, labels, model, max_accuracy_drop=MAX_ACCURACY_DROP)
    print(
        f"\ncalibrated on validation: speed {speed:.3f} keeps accuracy within 1 point of the teacher "
        f"({100 * stats['accuracy']:.2f}% vs {100 * stats['teacher_accuracy']:.2f}%), "
        f"ideal speed-up {stats['speedup']:.2f}x"
    )
    test_profile = exit_profile(model, make_batches(tokenizer, test.texts, BATCH_SIZE, args.max_length, device))
    test_labels = torch.tensor(test.labels)
    calibrated = {
        "speed": speed,
        "validation": stats,
        "test_accuracy": float((test_profile.predictions(speed) == test_labels).float().mean()),
    }
    temperatures = temperature_study(model, profile, validation_batches, labels) if dataset.num_labels > 2 else {}
    meta = {**meta, "calibrated": json.dumps(calibrated), "temperatures": json.dumps(temperatures)}
    _write_results(rows, out_dir / "results.csv", meta)
    _plot(rows, out_dir / "speed_accuracy.png", f"{dataset.name}: all-MiniLM-L6-v2 + FastBERT on {meta['device']}")
    print(f"\nwrote {out_dir / 'results.csv'} and {out_dir / 'speed_accuracy.png'}")
    return rows


def temperature_study(model, profile, batches, labels) -> dict:
    """Many classes keep the normalised entropy near 1: what the calibrated speed would be if the
    students' logits were sharpened by a temperature before the exit decision (simulated)."""
    results = {}
    for temperature in STUDY_TEMPERATURES:
        prof = profile if temperature == 1.0 else exit_profile(model, batches, temperature)
        try:
            speed, stats = choose_speed(prof, labels, model, max_accuracy_drop=MAX_ACCURACY_DROP)
            results[temperature] = {"speed": speed, **stats}
        except ValueError as err:
            results[temperature] = {"error": str(err)}
        print(f"temperature {temperature}: {results[temperature]}")
    return results


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
