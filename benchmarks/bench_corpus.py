"""Corpus classification throughput, one process against several, on this machine.

    python benchmarks/bench_corpus.py [--texts 2048] [--speed 0.0]

Builds a FastBERT checkpoint from the packaged all-MiniLM-L6-v2 (fresh students and head: this
measures the machinery and the parallel scaling, not accuracy; at speed 0 every text runs the full
depth), then classifies Rotten Tomatoes snippets with ``classify_corpus``: one process with all
cores, local worker processes with one core each, and ``torchrun`` processes with one core each.
Prints texts per second and writes ``benchmarks/results/corpus_throughput.json``.
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
    args = parser.parse_args(argv)
    from fastbert_kernels.apps.data import load_rotten_tomatoes

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "ckpt")
        corpus = tmp / "corpus.txt"
        texts = (load_rotten_tomatoes().train.texts * 2)[: args.texts]
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
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
        # Wall-clock of the whole job: process start-up (imports, loading the checkpoint) included.
        results = []
        for label, (command, env) in runs.items():
            seconds = timed(command, env)
            results.append(
                {"setting": label, "texts": args.texts, "seconds": seconds, "texts_per_s": args.texts / seconds}
            )
            print(f"{label:40s} {seconds:7.1f} s  {args.texts / seconds:7.1f} texts/s", flush=True)
    meta = {"cores": cores, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "speed": args.speed}
    out = ROOT / "benchmarks" / "results" / "corpus_throughput.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
