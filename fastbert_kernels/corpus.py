"""Classifying a whole corpus with a patched model: streamed, resumable, in input order.

The corpus is read as a stream (``.txt``, ``.jsonl``, ``.csv``, or ``.parquet`` with pyarrow) and
cut into fixed shards of ``shard_size`` texts, so memory is bounded by one shard however large
the corpus is. Process ``r`` of ``N`` takes shards ``r, r + N, ...`` (the processes of a
``torchrun``/``accelerate launch`` group, or local worker processes that :func:`classify_corpus`
starts itself; on a cluster, :mod:`fastbert_kernels.integrations.ray` does the same job on Ray
Data). Each shard is run at ``speed`` in length-bucketed batches, and its rows are written, in
input order, to a shard file that appears atomically when complete. A rerun skips the shards
already there, so an interrupted job resumes without recomputing them; when every shard exists,
they are joined, streaming, into one JSON Lines (or Parquet) file:

    {"index": 0, "label": "positive", "label_id": 1, "scores": [0.03, 0.97], "exit_layer": 2,
     "uncertainty": 0.12}

one row per input text, in input order, none lost or duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
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


def _iter_jsonl(path: Path) -> Iterator[str]:
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
        yield row["text"]


def _iter_csv(path: Path) -> Iterator[str]:
    """The ``text`` column of a CSV file (the standard library's reader: no pandas needed)."""
    import csv

    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise CorpusFormatError(f"{path} has no 'text' column (columns: {reader.fieldnames or []})")
            for row in reader:
                text = row["text"]
                if text is None:
                    raise CorpusFormatError(f"{path}, line {reader.line_num}: the row has no 'text' value")
                yield text
    except UnicodeDecodeError as err:
        raise CorpusFormatError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise CorpusFormatError(f"{path}: not valid CSV ({err})") from err


def _iter_txt(path: Path) -> Iterator[str]:
    return (line for _, line in _decoded_lines(path))


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("Parquet corpora need pyarrow: pip install 'fastbert_kernels[parquet]'") from None
    return pyarrow


def _iter_parquet(path: Path) -> Iterator[str]:
    """The ``text`` column of a Parquet file, one record batch at a time."""
    pa = _pyarrow()
    try:
        handle = pa.parquet.ParquetFile(path)
    except pa.ArrowException as err:
        raise CorpusFormatError(f"{path}: not a valid Parquet file ({err})") from err
    with handle:
        names = handle.schema_arrow.names
        if "text" not in names:
            raise CorpusFormatError(f"{path} has no 'text' column (columns: {names})")
        kind = handle.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusFormatError(f"{path}: the 'text' column must hold strings, got {kind}")
        row = 0
        for batch in handle.iter_batches(batch_size=8192, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise CorpusFormatError(f"{path}, row {row}: the 'text' value is null")
                row += 1
                yield text


# One strict reader per format, by lower-case suffix; the known formats are this table's keys.
_READERS = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}
CORPUS_FORMATS = tuple(_READERS)
OUTPUT_FORMATS = (".jsonl", ".parquet")


def check_corpus_path(path: str | Path) -> Path:
    """``path`` as a Path, if it is a file of a known corpus format (:data:`CORPUS_FORMATS`); else
    the error :func:`read_texts` would raise, without reading the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file (pass a list of texts or a .txt/.jsonl/.csv/.parquet file)")
    if path.suffix.lower() not in CORPUS_FORMATS:
        raise CorpusFormatError(
            f"{path}: unknown corpus format {path.suffix or '(no suffix)'!r}; known: {', '.join(CORPUS_FORMATS)}"
        )
    return path


def iter_texts(source: Sequence[str] | str | Path) -> Iterator[str]:
    """The texts of a sequence (list, pandas Series, numpy array) or a file, one at a time, by the
    file's suffix (any case): ``.txt`` (one text a line, split at ``\n`` only), ``.jsonl`` (an
    object with a ``text`` string a line), ``.csv`` (a ``text`` column, the standard library's
    reader) or ``.parquet`` (a ``text`` column, with pyarrow). Any other suffix is refused by name,
    and a malformed file names the line (or row) that breaks it."""
    if isinstance(source, (str, Path)):
        path = check_corpus_path(source)
        return _READERS[path.suffix.lower()](path)
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("the corpus must hold strings, got bytes (decode them, or pass a file path as a str)")
    texts = source.tolist() if hasattr(source, "tolist") else source
    return _checked_strings(texts)


def _checked_strings(texts: Iterable) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError("the corpus must hold strings")
        yield text


def read_texts(source: Sequence[str] | str | Path) -> list[str]:
    """Every text of ``source`` (:func:`iter_texts`) in a list."""
    return list(iter_texts(source))


def _scan(source) -> tuple[int, str]:
    """The number of texts of ``source`` and their SHA-256, in one streaming pass (a malformed
    file fails here, before the model runs)."""
    digest, count = hashlib.sha256(), 0
    for text in iter_texts(source):
        digest.update(text.encode("utf-8") + b"\0")
        count += 1
    return count, digest.hexdigest()


def _shards_of(source, shard_size: int) -> Iterator[tuple[int, list[str]]]:
    """``(k, texts of shard k)`` for k = 0, 1, ..., read as a stream."""
    texts = iter_texts(source)
    for k in itertools.count():
        part = list(itertools.islice(texts, shard_size))
        if not part:
            return
        yield k, part


def _shard_path(shards: Path, index: int) -> Path:
    return shards / f"shard-{index:06d}.jsonl"


@torch.inference_mode()
def classify_texts(
    model,
    tokenizer,
    texts: list[str],
    *,
    speed: float,
    batch_size: int = 64,
    max_length: int = 128,
    first: int = 0,
    pairs: list[str] | None = None,
) -> list[dict]:
    """One row per text (``index`` from ``first``, ``label``, ``label_id``, ``scores``,
    ``exit_layer``, ``uncertainty``), in input order; batches are formed over texts sorted by
    token count. ``pairs``: the second text of each sentence pair."""
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
    device = model_device(model)
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    rows: list[dict | None] = [None] * len(texts)
    id2label = model.config.id2label
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in chosen],
            None if pairs is None else [pairs[i] for i in chosen],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out = model(**{k: v.to(device) for k, v in batch.items()}, speed=speed)
        scores = torch.softmax(out.logits.float(), dim=-1).cpu()
        answers = zip(chosen, scores, out.exit_layer.cpu().tolist(), out.uncertainty.cpu().tolist(), strict=True)
        for i, score, layer, uncertainty in answers:
            label_id = int(score.argmax())
            rows[i] = {
                "index": first + i,
                "label": id2label.get(label_id, str(label_id)),
                "label_id": label_id,
                "scores": score.tolist(),
                "exit_layer": layer,
                "uncertainty": uncertainty,
            }
    return rows


def _classify_shard(model, tokenizer, texts: list[str], first: int, speed: float, batch_size: int, max_length: int):
    """The rows of one shard (its first text is number ``first`` of the corpus)."""
    return classify_texts(
        model, tokenizer, texts, speed=speed, batch_size=batch_size, max_length=max_length, first=first
    )


def _run_shards(model, tokenizer, source, shards: Path, rank: int, world: int, settings: dict, progress: bool) -> None:
    """Process ``rank`` of ``world``: its shards that are not on disk yet, reading the corpus as
    a stream (one shard in memory at a time)."""
    count = math.ceil(settings["texts"] / settings["shard_size"])
    mine = {k for k in range(rank, count, world) if not _shard_path(shards, k).is_file()}
    if not mine:
        return
    bar = tqdm(total=len(mine), desc="classifying shards", disable=not (progress and rank == 0), unit="shard")
    for k, part in _shards_of(source, settings["shard_size"]):
        if k > max(mine):
            break
        if k not in mine:
            continue
        first = k * settings["shard_size"]
        rows = _classify_shard(
            model, tokenizer, part, first, settings["speed"], settings["batch_size"], settings["max_length"]
        )
        final = _shard_path(shards, k)
        partial = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        partial.replace(final)  # atomic: a killed process never leaves half a shard
        bar.update()
    bar.close()


def _worker(rank: int, world: int, model, tokenizer, source, shards: Path, settings: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _run_shards(model, tokenizer, source, shards, rank, world, settings, progress=rank == 0)


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


def _job_manifest(model, tokenizer, corpus_sha256: str, settings: dict) -> dict:
    """What a job's rows depend on: the corpus, the settings, the model and its exit rule, the
    tokenizer. A rerun resumes only when all of it is the same."""
    config = fastbert_config(model)
    return {
        "texts": settings["texts"],
        "corpus_sha256": corpus_sha256,
        **{key: value for key, value in settings.items() if key != "texts"},
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


def _shard_rows(shards: Path, total: int, shard_size: int) -> Iterator[tuple[list[str], list[dict]]]:
    """The lines of every shard in order, and their rows, checked: row ``i`` of the corpus is line ``i``."""
    expected = 0
    for k in range(math.ceil(total / shard_size)):
        with _shard_path(shards, k).open(encoding="utf-8") as handle:
            lines = handle.readlines()
        rows = [json.loads(line) for line in lines]
        for row in rows:
            if row["index"] != expected:
                raise RuntimeError(f"shard {k} is out of order at row {expected}; remove {shards}")
            expected += 1
        yield lines, rows
    if expected != total:
        raise RuntimeError(f"the shards hold {expected} rows for {total} texts; remove {shards}")


def _join(shards: Path, output: Path, total: int, shard_size: int) -> None:
    """Writes the shards, in order, to ``output`` (JSON Lines, or Parquet by its suffix), one shard
    in memory at a time; the file appears atomically when complete."""
    partial = output.with_name(output.name + ".tmp")
    if output.suffix.lower() == ".parquet":
        pa = _pyarrow()
        schema = pa.schema([("index", pa.int64()), ("label", pa.string()), ("label_id", pa.int64()),
                            ("scores", pa.list_(pa.float32())), ("exit_layer", pa.int64()),
                            ("uncertainty", pa.float32())])  # fmt: skip
        with pa.parquet.ParquetWriter(partial, schema) as writer:
            for _, rows in _shard_rows(shards, total, shard_size):
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))  # one row group a shard
    else:
        with partial.open("w", encoding="utf-8") as out:
            for lines, _ in _shard_rows(shards, total, shard_size):
                out.writelines(lines)
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
    """Classifies every text of ``corpus`` (a sequence, or a file :func:`iter_texts` reads) at
    ``speed`` (default: the model's default speed) and writes one row per text, in input order,
    to ``output``: JSON Lines, or Parquet when its suffix is ``.parquet``. Returns its path.
    Memory is bounded by one shard: the corpus is read, and the output written, as streams.

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
    if output.suffix.lower() == ".parquet":
        _pyarrow()  # before hours of work, not at the join
    source = corpus if isinstance(corpus, (str, Path)) else read_texts(corpus)  # a file stays a stream
    total, corpus_sha256 = _scan(source)
    if not total:
        raise ValueError("the corpus is empty")
    speed = check_speed(fastbert_config(model).exit_rule.speed if speed is None else speed)
    check_students_trained(model, speed)
    shards = output.with_name(output.name + ".shards")
    settings = {"speed": speed, "batch_size": batch_size, "max_length": max_length, "shard_size": shard_size,
                "texts": total}  # fmt: skip
    group = distributed.context(model_device(model))
    model.eval()
    with _job_lock(output) if group.is_main else contextlib.nullcontext():
        if group.is_main:
            _prepare(shards, _job_manifest(model, tokenizer, corpus_sha256, settings))
        group.barrier()
        _classify_job(model, tokenizer, source, shards, output, settings, group, workers, progress)
    return output


def _classify_job(model, tokenizer, source, shards: Path, output: Path, settings: dict, group, workers, progress):
    """The shards of a prepared job, then (on the main process) the joined output."""
    shard_size = settings["shard_size"]
    if group.distributed:
        _run_shards(model, tokenizer, source, shards, group.rank, group.world, settings, progress)
        group.barrier()
    elif workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        torch.multiprocessing.start_processes(
            _worker,
            args=(workers, model, tokenizer, source, shards, settings, threads),
            nprocs=workers,
            start_method="spawn",
        )
    else:
        _run_shards(model, tokenizer, source, shards, 0, 1, settings, progress)
    if group.is_main:
        _join(shards, output, settings["texts"], shard_size)
        for path in shards.iterdir():
            path.unlink()
        shards.rmdir()
    group.barrier()
