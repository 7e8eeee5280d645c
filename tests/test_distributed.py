"""torch.distributed on this machine (gloo, 2 CPU processes): distillation and corpus classification
give what one process gives, and classification resumes after a kill without losing a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_model, word_tokenizer
from safetensors.torch import load_file
from transformers import BertTokenizerFast

import fastbert_kernels as fbk

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "scripts" / "distill_worker.py"
# One thread a process: two processes share this machine's two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny patched BERT with its tokenizer, and a corpus of random word sequences."""
    directory = tmp_path_factory.mktemp("checkpoint")
    model = fbk.patch(tiny_model("bert"))
    # Its random students stand for distilled ones (the command line refuses untrained students).
    fbk.fastbert_config(model).students_trained = True
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        length = int(torch.randint(1, 20, (1,), generator=generator))
        words = torch.randint(0, VOCAB - 5, (length,), generator=generator).tolist()
        lines.append(" ".join(f"w{w}" for w in words))
    (directory / "corpus.txt").write_text("\n".join(lines) + "\n")
    return directory


def _run(command: list[str], nproc: int = 1, timeout: int = 300) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launcher, *command], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def _students(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(directory / f"students-{rank}.safetensors"))


def test_distributed_distillation_equals_one_process(checkpoint, tmp_path):
    corpus = checkpoint / "corpus.txt"
    small = tmp_path / "texts.txt"
    small.write_text("\n".join(corpus.read_text().splitlines()[:37]) + "\n")  # uneven: 5 global batches
    _run([str(WORKER), str(checkpoint), str(small), str(tmp_path / "one")], nproc=1)
    _run([str(WORKER), str(checkpoint), str(small), str(tmp_path / "two")], nproc=2)
    one = _students(tmp_path / "one", 0)
    for rank in (0, 1):
        two = _students(tmp_path / "two", rank)
        assert two.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    # The backbone and the teacher are untouched on every rank, and the same as alone.
    frozen = {(tmp_path / d / f"frozen-{r}.txt").read_text() for d, r in (("one", 0), ("two", 0), ("two", 1))}
    assert len(frozen) == 1
    losses_one = [float(x) for x in (tmp_path / "one" / "loss-0.txt").read_text().split()]
    losses_two = [float(x) for x in (tmp_path / "two" / "loss-1.txt").read_text().split()]
    assert losses_one == pytest.approx(losses_two, rel=1e-4)  # the global loss, on every rank
    assert losses_one[-1] < losses_one[0]


def test_distributed_distillation_resumes_at_another_world_size(checkpoint, tmp_path):
    corpus = checkpoint / "corpus.txt"
    small = tmp_path / "texts.txt"
    small.write_text("\n".join(corpus.read_text().splitlines()[:32]) + "\n")
    _run([str(WORKER), str(checkpoint), str(small), str(tmp_path / "whole")], nproc=1)
    resume = tmp_path / "resume"
    _run([str(WORKER), str(checkpoint), str(small), str(tmp_path / "first"), str(resume), "3"], nproc=2)
    _run([str(WORKER), str(checkpoint), str(small), str(tmp_path / "rest"), str(resume)], nproc=1)
    whole, resumed = _students(tmp_path / "whole", 0), _students(tmp_path / "rest", 0)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=2e-5, rtol=1e-4, msg=key)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _classify(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "fastbert_kernels", "classify", str(checkpoint), str(checkpoint / "corpus.txt"),
            "--out", str(out), "--speed", "0.5", "--shard-size", "16", "--batch-size", "8", *extra]  # fmt: skip


def test_corpus_classification_is_the_same_on_one_or_two_processes(checkpoint, tmp_path):
    _run(_classify(checkpoint, tmp_path / "one.jsonl"), nproc=1)
    _run(_classify(checkpoint, tmp_path / "two.jsonl"), nproc=2)
    one, two = _rows(tmp_path / "one.jsonl"), _rows(tmp_path / "two.jsonl")
    assert [r["index"] for r in one] == list(range(400))  # input order, none lost or duplicated
    assert one == two
    assert not (tmp_path / "two.jsonl.shards").exists()
    # Local worker processes, without a launcher, give the same rows too.
    subprocess.run(
        [sys.executable, *_classify(checkpoint, tmp_path / "workers.jsonl", "--workers", "2")],
        env=ENV, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert _rows(tmp_path / "workers.jsonl") == one
    # The rows are the model's own answers at that speed.
    model = fbk.from_pretrained(checkpoint)
    tokenizer = BertTokenizerFast.from_pretrained(checkpoint)
    texts = (checkpoint / "corpus.txt").read_text().splitlines()[:5]
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt"), speed=0.5)
    assert [r["exit_layer"] for r in one[:5]] == expected.exit_layer.tolist()
    assert [r["label_id"] for r in one[:5]] == expected.logits.argmax(-1).tolist()


def test_corpus_classification_resumes_after_a_kill(checkpoint, tmp_path):
    def command(out: Path) -> list[str]:
        args = [sys.executable, *_classify(checkpoint, out)]
        args[args.index("--shard-size") + 1] = "2"  # 200 shards, so the kill lands mid-job
        return args

    subprocess.run(command(tmp_path / "reference.jsonl"), env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed.jsonl"
    process = subprocess.Popen(command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed.jsonl.shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("shard-*.jsonl"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(shards.glob("shard-*.jsonl"))
    assert 3 <= len(done) < 200 and not out.exists(), "the kill should land mid-job"
    before = {p.name: p.read_bytes() for p in done}
    subprocess.run(command(out), env=ENV, check=True, capture_output=True, timeout=300)
    assert _rows(out) == _rows(tmp_path / "reference.jsonl")
    assert set(before) <= {p.name for p in done}  # finished shards were kept, not recomputed
