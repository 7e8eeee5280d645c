"""Peak resident memory of ``classify_corpus`` against corpus size: flat, since the corpus is read
and the output written one shard at a time.

    python benchmarks/bench_corpus_memory.py [--sizes 10000 100000 400000]

Each size runs in a fresh process: Rotten Tomatoes snippets repeated to the size, written to a
``.txt`` file, classified with the packaged all-MiniLM-L6-v2 tokenizer and a 2-layer model of
hidden size 64 built from its config (memory here is about the corpus, not the model, and a small
model keeps 400,000 texts to minutes), to JSON Lines and to Parquet. Prints and writes
``benchmarks/results/corpus_memory.json``: per size, the peak RSS (``ru_maxrss``) and seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = """
import resource, sys, time
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
import fastbert_kernels as fbk
from fastbert_kernels.apps.data import packaged_model_dir
torch.manual_seed(0)
config = AutoConfig.from_pretrained(str(packaged_model_dir()), num_labels=2, num_hidden_layers=2, hidden_size=64,
                                    num_attention_heads=2, intermediate_size=128)
model = fbk.patch(AutoModelForSequenceClassification.from_config(config)).eval()
fbk.fastbert_config(model).students_trained = True  # memory only: random students stand in
tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_dir()))
begin = time.perf_counter()
fbk.classify_corpus(model, sys.argv[1], tokenizer, sys.argv[2], speed=0.5, batch_size=256, max_length=64,
                    shard_size=2048, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - begin)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 400_000])
    args = parser.parse_args(argv)
    from fastbert_kernels.apps.data import load_rotten_tomatoes

    snippets = [text.replace("\n", " ") for text in load_rotten_tomatoes().train.texts]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            corpus = Path(tmp) / f"corpus{size}.txt"
            with corpus.open("w") as handle:
                for i in range(size):
                    handle.write(snippets[i % len(snippets)] + "\n")
            for suffix in (".jsonl", ".parquet"):
                out = Path(tmp) / f"out{size}{suffix}"
                done = subprocess.run([sys.executable, "-c", JOB, str(corpus), str(out)], capture_output=True,
                                      text=True, check=True)  # fmt: skip
                peak, seconds = (float(v) for v in done.stdout.split()[-2:])
                results.append({"texts": size, "output": suffix, "peak_rss_mib": peak, "seconds": seconds,
                                "corpus_mib": corpus.stat().st_size / 2**20})  # fmt: skip
                print(results[-1], flush=True)
                out.unlink()
    path = ROOT / "benchmarks" / "results" / "corpus_memory.json"
    path.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
