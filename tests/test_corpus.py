"""Corpus classification at scale on one machine: a streaming read and write (memory bounded
by one shard), Parquet in and out, resume of a Parquet job, and the rows equal to the model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import spread_branches, tiny_model, word_tokenizer

import fastbert_kernels as fbk
from fastbert_kernels import corpus

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _model():
    model = fbk.patch(tiny_model("bert", layers=4))
    spread_branches(model)
    return model.eval()


def _texts(count: int, seed: int) -> list[str]:
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (count,), generator=rng).tolist()
    return [" ".join(f"w{int(w)}" for w in torch.randint(0, 60, (n,), generator=rng)) for n in lengths]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_equal_the_model_on_each_text(_seed, tmp_path):
    model, tokenizer = _model(), word_tokenizer()
    texts = _texts(50, _seed)
    rows = _jsonl(fbk.classify_corpus(model, texts, tokenizer, tmp_path / "o.jsonl", speed=0.5, shard_size=16))
    assert [row["index"] for row in rows] == list(range(50))
    for text, row in zip(texts, rows, strict=True):
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt"), speed=0.5)
        assert row["exit_layer"] == int(alone.exit_layer)
        assert row["uncertainty"] == pytest.approx(float(alone.uncertainty), abs=1e-5)
        torch.testing.assert_close(torch.tensor(row["scores"]), torch.softmax(alone.logits[0], -1), atol=1e-5, rtol=0)


def test_parquet_in_and_out_equal_jsonl(_seed, tmp_path):
    model, tokenizer = _model(), word_tokenizer()
    texts = _texts(70, _seed)
    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts, "other": list(range(70))}), source, row_group_size=16)
    assert corpus.read_texts(source) == texts
    as_jsonl = _jsonl(fbk.classify_corpus(model, texts, tokenizer, tmp_path / "a.jsonl", speed=0.5, shard_size=8))
    out = fbk.classify_corpus(model, source, tokenizer, tmp_path / "b.parquet", speed=0.5, shard_size=8)
    table = pq.read_table(out)
    assert table.num_rows == 70 and pq.ParquetFile(out).num_row_groups == 9  # one row group a shard
    for row, expected in zip(table.to_pylist(), as_jsonl, strict=True):
        assert row["index"] == expected["index"] and row["label"] == expected["label"]
        assert row["exit_layer"] == expected["exit_layer"]
        assert row["scores"] == pytest.approx(expected["scores"], abs=1e-6)


def test_a_killed_parquet_job_resumes_to_the_same_file(_seed, tmp_path, monkeypatch):
    model, tokenizer = _model(), word_tokenizer()
    texts = _texts(40, _seed)
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    whole = pq.read_table(
        fbk.classify_corpus(model, source, tokenizer, tmp_path / "a.parquet", speed=0.5, shard_size=8)
    )
    real, calls = corpus._classify_shard, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, after two shards are on disk
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus, "_classify_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        fbk.classify_corpus(model, source, tokenizer, tmp_path / "b.parquet", speed=0.5, shard_size=8, progress=False)
    monkeypatch.setattr(corpus, "_classify_shard", real)
    assert len(list((tmp_path / "b.parquet.shards").glob("shard-*.jsonl"))) == 2
    resumed = fbk.classify_corpus(model, source, tokenizer, tmp_path / "b.parquet", speed=0.5, shard_size=8)
    assert pq.read_table(resumed).equals(whole)


@pytest.mark.parametrize(
    "table,message",
    [
        ({"body": ["w1"]}, "has no 'text' column"),
        ({"text": ["w1", None]}, "row 1: the 'text' value is null"),
        ({"text": [1, 2]}, "must hold strings"),
    ],
)
def test_malformed_parquet_is_named(tmp_path, table, message):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(corpus.CorpusFormatError, match=message):
        corpus.read_texts(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(corpus.CorpusFormatError, match="not a valid Parquet file"):
        corpus.read_texts(tmp_path / "junk.parquet")


_PEAK = """
import resource, sys
sys.path.insert(0, sys.argv[3])
import torch
import fastbert_kernels as fbk
from helpers import spread_branches, tiny_model, word_tokenizer
torch.manual_seed(0)
model = fbk.patch(tiny_model("bert", layers=2)); spread_branches(model)
fbk.classify_corpus(model.eval(), sys.argv[1], word_tokenizer(), sys.argv[2], speed=0.5,
                    batch_size=256, max_length=16, shard_size=2048, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def test_streaming_memory_stays_flat_with_corpus_size(tmp_path):
    """Peak resident memory of a job over 200,000 texts is within 40 MiB of one over 10,000: the
    corpus is read, and the output written, one shard at a time."""
    peaks = {}
    for count in (10_000, 200_000):
        source = tmp_path / f"c{count}.txt"
        source.write_text("".join(f"w{i % 50} w{(i * 7) % 50}\n" for i in range(count)))
        out = tmp_path / f"o{count}.jsonl"
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, str(source), str(out), str(Path(__file__).parent)],
            capture_output=True, text=True, timeout=900, check=True,
        )  # fmt: skip
        peaks[count] = int(done.stdout.split()[-1]) / 1024
        with out.open() as handle:
            assert sum(1 for _ in handle) == count
    print(f"peak resident memory, MiB: {peaks}")
    assert peaks[200_000] - peaks[10_000] < 40, peaks
