"""Command line: ``python -m fastbert_kernels {demo,bench,env,distill,calibrate,classify,serve}``.

* ``demo``: fine-tune the packaged all-MiniLM-L6-v2 on Rotten Tomatoes (or BANKING77, or a CSV),
  distil the students, evaluate a sweep of speeds against the unpatched model (:mod:`.demo`).
* ``bench``: the same evaluation with more timing repeats, results under benchmarks/results.
* ``env``: what was built, what is available, and which backend each device uses.
* ``distill``, ``classify``: the library's distillation and corpus classification on files
  (``classify --engine ray``: Ray Data, :mod:`fastbert_kernels.integrations.ray`).
* ``calibrate``: a certified, label-free exit rule from held-out texts, saved with the checkpoint.
* ``serve``: a checkpoint over HTTP through the depth-pooled serving engine
  (:mod:`fastbert_kernels.server`; ``--replicas N``: on Ray Serve).
"""

from __future__ import annotations

import argparse
import sys

from ..serialization import load_checkpoint
from ..training import DISTILL_DEFAULTS
from .demo import DEFAULT_SPEEDS, MAX_ACCURACY_DROP, cmd_demo
from .environment import environment


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


def cmd_distill(args: argparse.Namespace) -> int:
    """Self-distillation of a checkpoint's students on a text file; works under torchrun."""
    import fastbert_kernels as fbk

    from .. import distributed
    from ..corpus import check_corpus_path, read_texts

    check_corpus_path(args.texts)
    model, tokenizer = load_checkpoint(args.checkpoint)
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
    from .. import distributed
    from ..corpus import check_corpus_path, classify_corpus
    from ..state import check_students_trained, fastbert_config

    if args.engine == "ray":
        return _classify_with_ray(args)
    check_corpus_path(args.corpus)  # before the model loads: a wrong path fails in a second
    model, tokenizer = load_checkpoint(args.checkpoint)
    speed = fastbert_config(model).exit_rule.speed if args.speed is None else args.speed
    check_students_trained(model, speed, refuse=True)
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


def _classify_with_ray(args: argparse.Namespace) -> int:
    """``classify --engine ray``: Ray Data over a local cluster, or the one at ``--address``."""
    try:
        from ..integrations.ray import classify_with_ray
    except ImportError as err:
        raise SystemExit(f"--engine ray needs the ray extra: pip install 'fastbert_kernels[ray]' ({err})") from None
    out = classify_with_ray(
        args.checkpoint,
        str(args.corpus),
        str(args.out),
        speed=args.speed,
        address=args.address,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    print(f"wrote {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Certifies an exit rule on held-out unlabelled texts and saves the checkpoint with it."""
    import fastbert_kernels as fbk

    from ..corpus import check_corpus_path, read_texts

    check_corpus_path(args.texts)
    from ..state import check_students_trained

    model, tokenizer = load_checkpoint(args.checkpoint)
    check_students_trained(model, 1.0, refuse=True)  # untrained students certify nothing useful
    calibration = fbk.calibrate(
        model,
        read_texts(args.texts),
        tokenizer,
        max_disagreement=args.max_disagreement,
        delta=args.delta,
        max_length=args.max_length,
    )
    print(f"certified: {calibration.rule.describe()}\n{calibration.certificate}")
    fbk.save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"saved to {args.out} (the rule is the checkpoint's default)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves a FastBERT checkpoint over HTTP (the serve extra), draining on SIGTERM; with
    ``--replicas``, on Ray Serve (the ray extra)."""
    if args.replicas is not None:
        return _serve_replicas(args)
    try:
        from ..server import serve
    except ImportError as err:
        raise SystemExit(f"serve needs the serve extra: pip install 'fastbert_kernels[serve]' ({err})") from None
    return serve(
        args.checkpoint,
        args.host,
        args.port,
        max_batch=args.max_batch,
        max_batch_tokens=args.max_batch_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        max_input_length=args.max_input_length,
        max_body_bytes=args.max_body_bytes,
        max_wait=args.max_wait_ms / 1e3,
        auto_truncate=args.auto_truncate,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )


def _serve_replicas(args: argparse.Namespace) -> int:
    try:
        from ..integrations.ray import serve_replicas
    except ImportError as err:
        raise SystemExit(f"--replicas needs the ray extra: pip install 'fastbert_kernels[ray]' ({err})") from None
    engine_options = {
        "max_batch": args.max_batch,
        "max_batch_tokens": args.max_batch_tokens,
        "max_in_flight": args.max_concurrent_requests,
        "max_length": args.max_input_length,
        "max_wait": args.max_wait_ms / 1e3,
    }
    settings = {
        "max_body_bytes": args.max_body_bytes,
        "max_client_batch_size": args.max_client_batch_size,
        "auto_truncate": args.auto_truncate,
    }
    return serve_replicas(
        args.checkpoint, args.host, args.port, args.replicas, engine_options=engine_options, settings=settings
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
    return value


def _speed(text: str) -> float:
    """argparse type: a speed in [0, 1] (a usage error, exit code 2, otherwise)."""
    from ..config import check_speed

    try:
        return check_speed(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="python -m fastbert_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastbert_kernels {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="build, backends and devices").set_defaults(func=cmd_env)
    for name, help_text, repeats, out in (
        ("demo", "fine-tune, distil, evaluate on real data", 2, "runs"),
        ("bench", "end-to-end speed/accuracy benchmark (uses the demo's cached checkpoints)", 3, "benchmarks/results"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data", default="rotten_tomatoes", help="rotten_tomatoes, banking77 or a text,label CSV")
        p.add_argument("--teacher", choices=["model", "branch"], default="model")
        p.add_argument("--epochs", type=_positive_int, default=1, help="teacher fine-tuning epochs")
        p.add_argument("--lr", type=float, default=2e-5, help="fine-tuning learning rate")
        p.add_argument("--distill-lr", type=float, default=DISTILL_DEFAULTS.lr, help="distillation learning rate")
        p.add_argument("--distill-epochs", type=_positive_int, default=DISTILL_DEFAULTS.epochs)
        p.add_argument(
            "--distill-label-weight",
            type=float,
            default=0.0,
            help="weight of the students' cross-entropy against the training labels (0: label-free)",
        )
        p.add_argument(
            "--max-accuracy-drop",
            type=float,
            default=MAX_ACCURACY_DROP,
            help="calibration target: the fastest exit rule within this accuracy drop of the teacher on validation",
        )
        p.add_argument(
            "--distill-max-grad-norm",
            type=float,
            default=DISTILL_DEFAULTS.max_grad_norm or 0.0,
            help="clip the students' gradient norm to this in distillation (0: never)",
        )
        p.add_argument("--max-train", type=int, default=None, help="use only the first N training texts")
        p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test texts")
        p.add_argument("--batch1-samples", type=int, default=200, help="test texts timed at batch 1")
        p.add_argument("--max-length", type=_positive_int, default=64)
        p.add_argument("--speeds", type=_speed, nargs="+", default=DEFAULT_SPEEDS)
        p.add_argument("--repeats", type=_positive_int, default=repeats, help="timing repeats (minimum kept)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--cache-dir", default=".cache/fastbert_demo")
        p.add_argument("--out", default=out)
        p.set_defaults(func=cmd_demo)
    d = sub.add_parser("distill", help="distil a checkpoint's students on a text file (torchrun-ready)")
    d.add_argument("checkpoint", help="a FastBERT checkpoint, or a fine-tuned ...ForSequenceClassification one")
    d.add_argument("--texts", required=True, help="unlabelled texts: .txt (one a line), .jsonl, .csv, .parquet")
    d.add_argument("--out", required=True, help="where to save the distilled FastBERT checkpoint")
    d.add_argument("--epochs", type=_positive_int, default=DISTILL_DEFAULTS.epochs)
    d.add_argument("--batch-size", type=_positive_int, default=32, help="global batch (split over the processes)")
    d.add_argument("--lr", type=float, default=DISTILL_DEFAULTS.lr)
    d.add_argument("--max-length", type=_positive_int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--resume-dir", default=None, help="checkpoint the run here and resume from it")
    d.set_defaults(func=cmd_distill)
    c = sub.add_parser("classify", help="classify a corpus into JSON Lines or Parquet, resumable (or on Ray)")
    c.add_argument("checkpoint", help="a FastBERT checkpoint (with its tokenizer)")
    c.add_argument("corpus", help=".txt (one text a line), .jsonl, .csv or .parquet (a text column)")
    c.add_argument("--out", required=True, help="the .jsonl or .parquet to write (with --engine ray: a folder)")
    c.add_argument("--engine", choices=["process", "ray"], default="process",
                   help="process: this process (streaming, resumable; torchrun or --workers to share); "
                        "ray: Ray Data actors (the ray extra)")  # fmt: skip
    c.add_argument("--address", default=None, help="--engine ray: the cluster to join (default: start one here)")
    c.add_argument("--actors", type=_positive_int, default=1, help="--engine ray: actors, each with the model")
    c.add_argument("--cpus-per-actor", type=float, default=1.0, help="--engine ray: CPUs each actor takes")
    c.add_argument("--gpus-per-actor", type=float, default=0.0, help="--engine ray: GPUs each actor takes")
    c.add_argument("--threads-per-actor", type=_positive_int, default=None,
                   help="--engine ray: torch threads in each actor (default: its CPUs, as Ray sets)")  # fmt: skip
    c.add_argument("--speed", type=_speed, default=None, help="default: the checkpoint's default speed")
    c.add_argument("--batch-size", type=_positive_int, default=64)
    c.add_argument("--max-length", type=_positive_int, default=128)
    c.add_argument("--shard-size", type=_positive_int, default=1024)
    c.add_argument("--workers", type=_positive_int, default=1, help="local processes when not launched by torchrun")
    c.set_defaults(func=cmd_classify)
    k = sub.add_parser("calibrate", help="certify an exit rule on held-out unlabelled texts (label-free)")
    k.add_argument("checkpoint", help="a distilled FastBERT checkpoint (with its tokenizer)")
    k.add_argument("--texts", required=True, help="held-out texts, never distilled on: .txt, .jsonl, .csv or .parquet")
    k.add_argument("--out", required=True, help="where to save the checkpoint with the certified rule")
    k.add_argument("--max-disagreement", type=_fraction, default=0.01, help="epsilon: answers that may differ")
    k.add_argument("--delta", type=_fraction, default=0.05, help="the certificate fails with at most this chance")
    k.add_argument("--max-length", type=_positive_int, default=128)
    k.set_defaults(func=cmd_calibrate)
    v = sub.add_parser("serve", help="serve a checkpoint over HTTP with the depth-pooled engine")
    v.add_argument("checkpoint", help="a FastBERT checkpoint (with its tokenizer)")
    v.add_argument("--host", default="127.0.0.1", help="the interface to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    v.add_argument("--max-batch", type=_positive_int, default=64, help="the most rows a layer call runs")
    v.add_argument("--max-batch-tokens", type=_positive_int, default=16_384,
                   help="the most tokens (rows x padded length) a layer call runs")  # fmt: skip
    v.add_argument("--max-concurrent-requests", type=_positive_int, default=512,
                   help="texts the engine holds at once; past it, 429")  # fmt: skip
    v.add_argument("--max-client-batch-size", type=_positive_int, default=32, help="texts per request; past it, 413")
    v.add_argument("--max-input-length", type=_positive_int, default=None,
                   help="tokens per text (default: the model's position limit)")  # fmt: skip
    v.add_argument("--auto-truncate", action="store_true",
                   help="cut texts over --max-input-length instead of answering 413 (a request may say)")  # fmt: skip
    v.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, help="larger request bodies get 413")
    v.add_argument("--max-wait-ms", type=_positive_float, default=100.0,
                   help="a request older than this has its depth served first (the engine's aging bound)")  # fmt: skip
    v.add_argument("--drain-timeout", type=_positive_float, default=20.0,
                   help="seconds to finish accepted requests after SIGTERM; then they get 503")  # fmt: skip
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    v.add_argument("--replicas", type=_positive_int, default=None,
                   help="run N replicas, each with its own engine, on Ray Serve (the ray extra)")  # fmt: skip
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command: exit code 0 on success, 2 for a usage error (argparse's), 1 for a failure,
    reported in one line on stderr (with ``--debug``, the traceback instead)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
