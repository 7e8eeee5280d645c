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

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .config import check_speed
from .encoder import model_device
from .state import check_students_trained, fastbert_config, is_patched

MANIFEST_FILE = "manifest.json"


class CorpusFormatError(ValueError):
    """A corpus file that cannot be read as its format says, with the line that breaks it."""


def _decoded_lines(path: Path):
    """``(line number, text)`` of every line of ``path``, split at ``\n`` only (``str.splitlines``
    also breaks at U+2028, \x0b, \x1c, \x85 and others, which shifts every row after such a
    character); a ``\r`` before the ``\n`` is dropped, as is the empty piece after a final ``\n``."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusFormatError(
                    f"{path}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start})"
                ) from err


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusFormatError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "text" not in row:
            raise CorpusFormatError(f"{path}, line {number}: a JSON Lines corpus needs an object with a 'text' field")
        if not isinstance(row["text"], str):
            raise CorpusFormatError(f"{path}, line {number}: 'text' must be a string, got {type(row['text']).__name__}")
        texts.append(row["text"])
    return texts


def _read_csv(path: Path) -> list[str]:
    """The ``text`` column of a CSV file (the standard library's reader: no pandas needed)."""
    import csv

    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise CorpusFormatError(f"{path} has no 'text' column (columns: {reader.fieldnames or []})")
            texts = []
            for row in reader:
                text = row["text"]
                if text is None:
                    raise CorpusFormatError(f"{path}, line {reader.line_num}: the row has no 'text' value")
                texts.append(text)
            return texts
    except UnicodeDecodeError as err:
        raise CorpusFormatError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise CorpusFormatError(f"{path}: not valid CSV ({err})") from err


def _read_txt(path: Path) -> list[str]:
    return [line for _, line in _decoded_lines(path)]


# One strict reader per format, by lower-case suffix; the known formats are this table's keys.
_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
CORPUS_FORMATS = tuple(_READERS)


def check_corpus_path(path: str | Path) -> Path:
    """``path`` as a Path, if it is a file of a known corpus format (:data:`CORPUS_FORMATS`); else
    the error :func:`read_texts` would raise, without reading the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file (pass a list of texts or a .txt/.jsonl/.csv file)")
    if path.suffix.lower() not in CORPUS_FORMATS:
        raise CorpusFormatError(
            f"{path}: unknown corpus format {path.suffix or '(no suffix)'!r}; known: {', '.join(CORPUS_FORMATS)}"
        )
    return path


def read_texts(source: Sequence[str] | str | Path) -> list[str]:
    """Texts from a sequence (list, pandas Series, numpy array) or a file, by its suffix (any case):
    ``.txt`` (one text a line, split at ``\n`` only), ``.jsonl`` (an object with a ``text``
    string a line) or ``.csv`` (a ``text`` column). Any other suffix is refused by name, and a
    malformed file names the line that breaks it."""
    if isinstance(source, (str, Path)):
        path = check_corpus_path(source)
        return _READERS[path.suffix.lower()](path)
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("the corpus must hold strings, got bytes (decode them, or pass a file path as a str)")
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


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names, dtypes, shapes, bytes), the
    students included: two jobs agree on it only if they answer alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def _job_manifest(model, tokenizer, texts: list[str], settings: dict) -> dict:
    """What a job's rows depend on: the corpus, the settings, the model and its exit rule, the
    tokenizer. A rerun resumes only when all of it is the same."""
    config = fastbert_config(model)
    return {
        "texts": len(texts),
        "corpus_sha256": _fingerprint(texts),
        **settings,
        "model_sha256": model_fingerprint(model),
        "exit_rule": config.exit_rule.as_dict(),
        "trim_sequence": config.trim_sequence,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
    }


def _prepare(shards: Path, manifest: dict) -> None:
    """Creates the shard folder, or checks that the one there belongs to this same job."""
    path = shards / MANIFEST_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            changed = sorted(k for k in {**found, **manifest} if found.get(k) != manifest.get(k))
            raise ValueError(
                f"{shards} holds shards of another job (different {', '.join(changed)}): remove it, or write "
                "to another output"
            )
        return
    shards.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(manifest, indent=1))
    partial.replace(path)


@contextlib.contextmanager
def _job_lock(output: Path) -> Iterator[None]:
    """One job per output at a time: ``<output>.lock`` holds the owner's pid. A second job on the
    same output is refused with a clear message while the first runs; a lock whose process is
    gone (killed) is taken over, so that resume after a kill works."""
    lock = output.with_name(output.name + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise RuntimeError(
                    f"another job (pid {owner}) is writing {output}; wait for it, or write to another output"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise RuntimeError(f"could not take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_output_is_not_an_input(output: Path, corpus) -> None:
    if isinstance(corpus, (str, Path)) and Path(corpus).resolve() == output.resolve():
        raise ValueError(f"the output {output} is the corpus itself: writing it would destroy the input")


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
    output = Path(output)
    _check_output_is_not_an_input(output, corpus)
    texts = read_texts(corpus)
    if not texts:
        raise ValueError("the corpus is empty")
    speed = check_speed(fastbert_config(model).exit_rule.speed if speed is None else speed)
    check_students_trained(model, speed)
    shards = output.with_name(output.name + ".shards")
    settings = {"speed": speed, "batch_size": batch_size, "max_length": max_length, "shard_size": shard_size}
    group = distributed.context(model_device(model))
    model.eval()
    with _job_lock(output) if group.is_main else contextlib.nullcontext():
        if group.is_main:
            _prepare(shards, _job_manifest(model, tokenizer, texts, settings))
        group.barrier()
        _classify_job(model, tokenizer, texts, shards, output, settings, group, workers, progress)
    return output


def _classify_job(model, tokenizer, texts, shards: Path, output: Path, settings: dict, group, workers, progress):
    """The shards of a prepared job, then (on the main process) the joined output."""
    shard_size = settings["shard_size"]
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
