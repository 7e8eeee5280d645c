"""Command line: ``python -m fastbert_kernels {demo,bench,env}``.

* ``demo``: fine-tune the packaged all-MiniLM-L6-v2 on Rotten Tomatoes (or BANKING77, or a CSV),
  distil the students, evaluate a sweep of speeds against the unpatched model; checkpoints cached.
* ``bench``: the same evaluation with more timing repeats, results appended under benchmarks/results.
* ``env``: what was built, what is available, and which backend each device uses.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_SPEEDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def environment() -> dict:
    """Versions, build and backend facts, for the env report and every results file."""
    import transformers

    from . import __version__
    from .ops import compiled, report
    from .ops.triton_backend import IMPORT_ERROR as triton_error

    facts = {
        "fastbert_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": "missing" if triton_error else __import__("triton").__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "extension_build": compiled.BUILD_INFO or compiled.LOAD_ERROR,
    }
    facts["backends"] = report()
    return facts


def cmd_env(_: argparse.Namespace) -> int:
    facts = environment()
    backends = facts.pop("backends")
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    print("\nbackend    available  used for   detail")
    for name, row in backends.items():
        if name == "error":
            continue
        print(f"{name:<10} {row['available']:<10} {row.get('used_for', '-'):<10} {row['detail']}")
    for device, message in backends.get("error", {}).items():
        print(f"error on {device}: {message}")
    return 0


def _cache_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def prepare_model(args: argparse.Namespace, dataset):
    """Fine-tuned teacher and distilled students, from the cache when they are there."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastbert_kernels as fbk

    from .data import packaged_model_dir

    base = packaged_model_dir()
    settings = dict(
        lr=args.lr,
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
            batch_size=32,
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
        batch_size=32,
        lr=10 * args.lr,
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
    for batch_size, marker in ((64, "o"), (1, "s")):
        fast = [r for r in rows if r.method == "fastbert" and r.batch_size == batch_size]
        if fast:
            ax.plot(
                [r.wallclock_speedup for r in fast],
                [100 * r.accuracy for r in fast],
                marker=marker,
                label=f"FastBERT, batch {batch_size}, {fast[0].samples} test texts, speed 0 ... {fast[-1].setting:g}",
            )
    static = [r for r in rows if r.method == "static" and r.batch_size == 64]
    if static:
        ax.plot(
            [r.wallclock_speedup for r in static],
            [100 * r.accuracy for r in static],
            "^--",
            label="first k layers + student k, batch 64",
        )
        for r in static:
            ax.annotate(f"k={int(r.setting)}", (r.wallclock_speedup, 100 * r.accuracy), fontsize=8)
    hf = [r for r in rows if r.method == "huggingface" and r.batch_size == 64]
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
        if r.batch_size != 64:
            continue
        single = by.get((r.method, r.setting, 1))
        wall1 = f"{single.wallclock_speedup:.2f}" if single else "-"
        print(
            f"{r.method:<12}{r.setting:>8g}{100 * r.accuracy:>9.2f}%{r.mean_exit_layer:>12.2f}{r.flops_speedup:>9.2f}"
            f"{wall1:>11}{r.wallclock_speedup:>12.2f}{r.ideal_speedup:>13.2f}{r.efficiency:>10.2f}"
        )


def evaluate(args: argparse.Namespace, model, tokenizer, dataset, out_dir: Path, meta: dict) -> list:
    from .evaluation import benchmark, choose_speed, exit_profile, make_batches

    device = next(model.parameters()).device
    test = dataset.test.head(args.max_test)
    depths = list(range(1, model.config.num_hidden_layers))
    rows = benchmark(
        model,
        tokenizer,
        test.texts,
        test.labels,
        args.speeds,
        batch_size=64,
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
    validation_batches = make_batches(tokenizer, validation.texts, 64, args.max_length, device)
    profile = exit_profile(model, validation_batches)
    labels = torch.tensor(validation.labels)
    speed, stats = choose_speed(profile, labels, model, max_accuracy_drop=0.01)
    print(
        f"\ncalibrated on validation: speed {speed:.3f} keeps accuracy within 1 point of the teacher "
        f"({100 * stats['accuracy']:.2f}% vs {100 * stats['teacher_accuracy']:.2f}%), "
        f"ideal speed-up {stats['speedup']:.2f}x"
    )
    test_profile = exit_profile(model, make_batches(tokenizer, test.texts, 64, args.max_length, device))
    test_labels = torch.tensor(test.labels)
    calibrated = {
        "speed": speed,
        "validation": stats,
        "test_accuracy": float((test_profile.predictions(speed) == test_labels).float().mean()),
    }
    temperatures = {}
    if dataset.num_labels > 2:
        # Many classes keep the normalised entropy near 1; measure what sharpening the students does.
        for temperature in (1.0, 0.5, 0.25):
            prof = profile if temperature == 1.0 else exit_profile(model, validation_batches, temperature)
            try:
                s, st = choose_speed(prof, labels, model, max_accuracy_drop=0.01)
                temperatures[temperature] = {"speed": s, **st}
            except ValueError as err:
                temperatures[temperature] = {"error": str(err)}
            print(f"temperature {temperature}: {temperatures[temperature]}")
    meta = {**meta, "calibrated": json.dumps(calibrated), "temperatures": json.dumps(temperatures)}
    _write_results(rows, out_dir / "results.csv", meta)
    _plot(rows, out_dir / "speed_accuracy.png", f"{dataset.name}: all-MiniLM-L6-v2 + FastBERT on {meta['device']}")
    print(f"\nwrote {out_dir / 'results.csv'} and {out_dir / 'speed_accuracy.png'}")
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import load_dataset

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


def _load_for_cli(checkpoint: str):
    """A patched model and its tokenizer from a FastBERT checkpoint, or a plain fine-tuned
    classifier checkpoint (patched here, with fresh students)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastbert_kernels as fbk

    from .config import CONFIG_FILE

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if (Path(checkpoint) / CONFIG_FILE).is_file():
        return fbk.from_pretrained(checkpoint), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, local_files_only=True)
    return fbk.patch(model), tokenizer


def cmd_distill(args: argparse.Namespace) -> int:
    """Self-distillation of a checkpoint's students on a text file; works under torchrun."""
    import fastbert_kernels as fbk

    from . import distributed
    from .corpus import read_texts

    model, tokenizer = _load_for_cli(args.checkpoint)
    history = fbk.distill(
        model,
        read_texts(args.texts),
        tokenizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        checkpoint_dir=args.resume_dir,
    )
    if distributed.context().is_main:
        model.eval()
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"{history.steps} steps, final loss {history.loss[-1]:.4f}; saved to {args.out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Classifies a corpus file with a FastBERT checkpoint; works under torchrun."""
    from . import distributed
    from .corpus import classify_corpus

    model, tokenizer = _load_for_cli(args.checkpoint)
    out = classify_corpus(
        model,
        args.corpus,
        tokenizer,
        args.out,
        speed=args.speed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        shard_size=args.shard_size,
        workers=args.workers,
    )
    if distributed.context().is_main:
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastbert_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="build, backends and devices").set_defaults(func=cmd_env)
    for name, help_text, repeats, out in (
        ("demo", "fine-tune, distil, evaluate on real data", 2, "runs"),
        ("bench", "end-to-end speed/accuracy benchmark (uses the demo's cached checkpoints)", 3, "benchmarks/results"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data", default="rotten_tomatoes", help="rotten_tomatoes, banking77 or a text,label CSV")
        p.add_argument("--teacher", choices=["model", "branch"], default="model")
        p.add_argument("--epochs", type=int, default=1, help="teacher fine-tuning epochs")
        p.add_argument("--lr", type=float, default=2e-5, help="fine-tuning learning rate (distillation: 10x)")
        p.add_argument("--distill-epochs", type=int, default=1)
        p.add_argument("--max-train", type=int, default=None, help="use only the first N training texts")
        p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test texts")
        p.add_argument("--batch1-samples", type=int, default=200, help="test texts timed at batch 1")
        p.add_argument("--max-length", type=int, default=64)
        p.add_argument("--speeds", type=float, nargs="+", default=DEFAULT_SPEEDS)
        p.add_argument("--repeats", type=int, default=repeats, help="timing repeats (minimum kept)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--cache-dir", default=".cache/fastbert_demo")
        p.add_argument("--out", default=out)
        p.set_defaults(func=cmd_demo)
    d = sub.add_parser("distill", help="distil a checkpoint's students on a text file (torchrun-ready)")
    d.add_argument("checkpoint", help="a FastBERT checkpoint, or a fine-tuned ...ForSequenceClassification one")
    d.add_argument("--texts", required=True, help="unlabelled texts: .txt (one a line), .jsonl or .csv (text)")
    d.add_argument("--out", required=True, help="where to save the distilled FastBERT checkpoint")
    d.add_argument("--epochs", type=int, default=1)
    d.add_argument("--batch-size", type=int, default=32, help="global batch (split over the processes)")
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--max-length", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--resume-dir", default=None, help="checkpoint the run here and resume from it")
    d.set_defaults(func=cmd_distill)
    c = sub.add_parser("classify", help="classify a corpus into JSON Lines, resumable (torchrun-ready)")
    c.add_argument("checkpoint", help="a FastBERT checkpoint (with its tokenizer)")
    c.add_argument("corpus", help=".txt (one text a line), .jsonl or .csv (text column)")
    c.add_argument("--out", required=True, help="the .jsonl to write")
    c.add_argument("--speed", type=float, default=None, help="default: the checkpoint's default speed")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--max-length", type=int, default=128)
    c.add_argument("--shard-size", type=int, default=1024)
    c.add_argument("--workers", type=int, default=1, help="local processes when not launched by torchrun")
    c.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "speeds"):
        from .config import check_speed

        args.speeds = [check_speed(s) for s in args.speeds]
    return args.func(args)
