"""Corpus classification throughput, one process against several, on this machine.

    python benchmarks/bench_corpus.py [--texts 2048] [--speed 0.0] [--no-ray]

Builds a FastBERT checkpoint from the packaged all-MiniLM-L6-v2 (fresh students and head: this
measures the machinery and the parallel scaling, not accuracy; at speed 0 every text runs the full
depth), then classifies Rotten Tomatoes snippets with ``classify_corpus``: one process with all
cores, local worker processes with one core each, ``torchrun`` processes with one core each, and
(with the ray extra) ``--engine ray`` with 1 actor of all cores and 2 actors of one core each, on a
local Ray cluster. Each setting also runs on 8 texts: that run's time is its start-up cost
(imports, loading the checkpoint, starting Ray), and the steady rate is
``(texts - 8) / (seconds - start-up seconds)``. Prints texts per second and writes
``benchmarks/results/corpus_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(directory: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastbert_kernels as fbk
    from fastbert_kernels.apps.data import packaged_model_dir

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(packaged_model_dir()), num_labels=2)
    fbk.patch(model).eval()
    # Throughput only: the random students stand for distilled ones (the command line refuses untrained).
    fbk.fastbert_config(model).students_trained = True
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(packaged_model_dir())).save_pretrained(directory)


def timed(command: list[str], env: dict) -> float:
    begin = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--speed", type=float, default=0.0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data settings")
    args = parser.parse_args(argv)
    from fastbert_kernels.apps.data import load_rotten_tomatoes

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "ckpt")
        texts = (load_rotten_tomatoes().train.texts * 2)[: args.texts]
        for name, part in (("corpus.txt", texts), ("small.txt", texts[:8])):
            (tmp / name).write_text("\n".join(t.replace("\n", " ") for t in part) + "\n")
        corpus = tmp / "CORPUS"
        common = ["-m", "fastbert_kernels", "classify", str(tmp / "ckpt"), str(corpus), "--speed", str(args.speed)]
        base_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        one_core = {**base_env, "OMP_NUM_THREADS": "1"}
        n = args.processes
        runs = {
            f"1 process, {cores} threads": ([sys.executable, *common, "--out", str(tmp / "a.jsonl")], base_env),
            f"{n} local workers, 1 thread each": (
                [sys.executable, *common, "--out", str(tmp / "b.jsonl"), "--workers", str(n)],
                one_core,
            ),
            f"torchrun {n} processes, 1 thread each": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={n}",
                    *common,
                    "--out",
                    str(tmp / "c.jsonl"),
                ],
                one_core,
            ),
        }
        if not args.no_ray:
            ray = [sys.executable, *common, "--engine", "ray"]
            runs[f"ray, 1 actor, {cores} threads"] = (
                [*ray, "--out", str(tmp / "d.jsonl"), "--actors", "1", "--threads-per-actor", str(cores)],
                base_env,
            )
            # Two actors on a 2-CPU cluster must leave a CPU share to Ray's read tasks.
            runs[f"ray, {n} actors, 1 thread each"] = (
                [
                    *ray,
                    "--out",
                    str(tmp / "e.jsonl"),
                    "--actors",
                    str(n),
                    "--cpus-per-actor",
                    str(round(0.9 / n, 2)),
                    "--threads-per-actor",
                    "1",
                ],
                one_core,
            )
        # Wall-clock of the whole job, and of the same job on 8 texts: its start-up cost.
        results = []
        for label, (command, env) in runs.items():
            full = [str(tmp / "corpus.txt") if part == str(corpus) else part for part in command]
            small = [str(tmp / "small.txt") if part == str(corpus) else part for part in command]
            small = [part.replace(".jsonl", "-small.jsonl") for part in small]
            startup = timed(small, env)
            seconds = timed(full, env)
            steady = (args.texts - 8) / max(1e-9, seconds - startup)
            results.append({"setting": label, "texts": args.texts, "seconds": seconds,
                            "texts_per_s": args.texts / seconds, "startup_seconds": startup,
                            "steady_texts_per_s": steady})  # fmt: skip
            print(f"{label:40s} {seconds:7.1f} s  {args.texts / seconds:7.1f} texts/s  start-up {startup:5.1f} s"
                  f"  steady {steady:7.1f} texts/s", flush=True)  # fmt: skip
    meta = {"cores": cores, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "speed": args.speed}
    out = ROOT / "benchmarks" / "results" / "corpus_throughput.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
