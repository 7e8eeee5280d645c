"""Classifying a whole corpus with a patched model: sharded over processes, resumable, in input order.

The corpus is cut into fixed shards of ``shard_size`` texts; process ``r`` of ``N`` takes shards
``r, r + N, ...`` (the processes of a ``torchrun``/``accelerate launch`` group, or local worker
processes that :func:`classify_corpus` starts itself). Each shard is run at ``speed`` in
length-bucketed batches, and its rows are written, in input order, to a shard file that appears
atomically when complete. A rerun skips the shards already there, so an interrupted job resumes
without recomputing them; when every shard exists, they are joined into one JSON Lines file:

    {"index": 0, "label": "positive", "label_id": 1, "scores": [0.03, 0.97], "exit_layer": 2}

one line per input text, in input order, none lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .config import check_speed
from .encoder import model_device
from .modeling import fastbert_config, is_patched

MANIFEST_FILE = "manifest.json"


def read_texts(source: Sequence[str] | str | Path) -> list[str]:
    """Texts from a sequence (list, pandas Series, numpy array) or a file: ``.txt`` (one text a
    line), ``.jsonl`` (a ``text`` field a line) or ``.csv`` (a ``text`` column)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file (pass a list of texts or a .txt/.jsonl/.csv file)")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line)["text"] for line in handle if line.strip()]
        if path.suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            if "text" not in frame.columns:
                raise ValueError(f"{path} has no 'text' column")
            return frame["text"].tolist()
        return path.read_text(encoding="utf-8").splitlines()
    texts = source.tolist() if hasattr(source, "tolist") else list(source)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("the corpus must hold strings")
    return texts


def _fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _shard_path(shards: Path, index: int) -> Path:
    return shards / f"shard-{index:06d}.jsonl"


@torch.inference_mode()
def _classify_shard(model, tokenizer, texts: list[str], first: int, speed: float, batch_size: int, max_length: int):
    """Rows of one shard, in input order; batches are formed over texts sorted by token count."""
    device = model_device(model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    rows: list[dict | None] = [None] * len(texts)
    id2label = model.config.id2label
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = model(**{k: v.to(device) for k, v in batch.items()}, speed=speed)
        scores = torch.softmax(out.logits.float(), dim=-1).cpu()
        for i, score, layer in zip(chosen, scores, out.exit_layer.cpu().tolist(), strict=True):
            label_id = int(score.argmax())
            rows[i] = {
                "index": first + i,
                "label": id2label.get(label_id, str(label_id)),
                "label_id": label_id,
                "scores": score.tolist(),
                "exit_layer": layer,
            }
    return rows


def _run_shards(model, tokenizer, texts, shards: Path, rank: int, world: int, settings: dict, progress: bool) -> None:
    """Process ``rank`` of ``world``: its shards that are not on disk yet."""
    count = math.ceil(len(texts) / settings["shard_size"])
    mine = [k for k in range(rank, count, world) if not _shard_path(shards, k).is_file()]
    for k in tqdm(mine, desc="classifying shards", disable=not (progress and rank == 0), unit="shard"):
        first = k * settings["shard_size"]
        part = texts[first : first + settings["shard_size"]]
        rows = _classify_shard(
            model, tokenizer, part, first, settings["speed"], settings["batch_size"], settings["max_length"]
        )
        final = _shard_path(shards, k)
        partial = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        partial.replace(final)  # atomic: a killed process never leaves half a shard


def _worker(rank: int, world: int, model, tokenizer, texts, shards: Path, settings: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _run_shards(model, tokenizer, texts, shards, rank, world, settings, progress=rank == 0)


def _prepare(shards: Path, texts: list[str], settings: dict) -> None:
    """Creates the shard folder, or checks that the one there belongs to this same job."""
    manifest = {"texts": len(texts), "corpus_sha256": _fingerprint(texts), **settings}
    path = shards / MANIFEST_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            changed = sorted(k for k in manifest if found.get(k) != manifest[k])
            raise ValueError(f"{shards} holds shards of another job (different {changed}); remove it or change output")
        return
    shards.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def _join(shards: Path, output: Path, total: int, shard_size: int) -> None:
    partial = output.with_name(output.name + ".tmp")
    expected = 0
    with partial.open("w", encoding="utf-8") as out:
        for k in range(math.ceil(total / shard_size)):
            with _shard_path(shards, k).open(encoding="utf-8") as handle:
                for line in handle:
                    if json.loads(line)["index"] != expected:
                        raise RuntimeError(f"shard {k} is out of order at row {expected}; remove {shards}")
                    out.write(line)
                    expected += 1
    if expected != total:
        raise RuntimeError(f"the shards hold {expected} rows for {total} texts; remove {shards}")
    partial.replace(output)


def classify_corpus(
    model,
    corpus: Sequence[str] | str | Path,
    tokenizer,
    output: str | Path,
    *,
    speed: float | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    shard_size: int = 1024,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Classifies every text of ``corpus`` at ``speed`` (default: the model's default speed) and
    writes one JSON line per text, in input order, to ``output``; returns its path.

    Launched with ``torchrun``/``accelerate launch``, the group's processes share the shards (each
    loads the model itself). Otherwise ``workers > 1`` starts that many local processes (each with
    ``cores / workers`` threads). Finished shards live in ``<output>.shards/`` until the output is
    complete; a rerun of the same job resumes from them.
    """
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call fastbert_kernels.patch(model) first")
    if batch_size < 1 or shard_size < 1 or workers < 1:
        raise ValueError(
            f"batch_size, shard_size and workers must be positive, got {batch_size}, {shard_size}, {workers}"
        )
    texts = read_texts(corpus)
    if not texts:
        raise ValueError("the corpus is empty")
    speed = check_speed(fastbert_config(model).default_speed if speed is None else speed)
    output = Path(output)
    shards = output.with_name(output.name + ".shards")
    settings = {"speed": speed, "batch_size": batch_size, "max_length": max_length, "shard_size": shard_size}
    group = distributed.context(model_device(model))
    model.eval()
    if group.is_main:
        _prepare(shards, texts, settings)
    group.barrier()
    if group.distributed:
        _run_shards(model, tokenizer, texts, shards, group.rank, group.world, settings, progress)
        group.barrier()
    elif workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        torch.multiprocessing.start_processes(
            _worker,
            args=(workers, model, tokenizer, texts, shards, settings, threads),
            nprocs=workers,
            start_method="spawn",
        )
    else:
        _run_shards(model, tokenizer, texts, shards, 0, 1, settings, progress)
    if group.is_main:
        _join(shards, output, len(texts), shard_size)
        for path in shards.iterdir():
            path.unlink()
        shards.rmdir()
    group.barrier()
    return output
