"""Ray Data for corpus-scale classification (the ``ray`` extra).

A pool of stateful actors, each loading the checkpoint once, classifies the batches of any Ray
Data source and hands them to any sink; the pattern of vLLM's offline inference examples::

    import ray
    from fastbert_kernels.integrations.ray import FastBertPredictor

    ds = ray.data.read_parquet("s3://bucket/corpus/")              # a "text" column
    ds = ds.map_batches(FastBertPredictor, fn_constructor_kwargs={"checkpoint": "ckpt/", "speed": 0.5},
                        batch_size=256, concurrency=4, num_gpus=1)    # one actor per GPU
    ds.write_parquet("s3://bucket/labels/")

or ``python -m fastbert_kernels classify CKPT INPUT --out OUTPUT --engine ray``
(:func:`classify_with_ray`). Each row gains ``label``, ``label_id``, ``score`` (the answer's
probability), ``scores``, ``exit_layer`` and ``uncertainty``; rows keep their order within a batch,
and :func:`classify_with_ray` keeps the dataset's order (``preserve_order``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..corpus import classify_texts
from ..state import fastbert_config

#: Columns the predictor adds to every batch.
OUTPUT_COLUMNS = ("label", "label_id", "score", "scores", "exit_layer", "uncertainty")


class FastBertPredictor:
    """A callable class for ``Dataset.map_batches``: one per actor, the checkpoint loaded once.

    Args:
        checkpoint: a directory written by :func:`fastbert_kernels.save_pretrained` (with its
            tokenizer); its exit rule is the default.
        speed: the exit threshold (default: the checkpoint's rule).
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when the actor has a GPU).
        text_column, pair_column: the batch's text column, and an optional second text of a pair.
        batch_size, max_length: the model's batches inside each Ray batch (bucketed by length).
        threads: torch's intra-op threads in this actor (default: what Ray set, the actor's CPUs).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        speed: float | None = None,
        device: str | None = None,
        text_column: str = "text",
        pair_column: str | None = None,
        batch_size: int = 64,
        max_length: int = 128,
        threads: int | None = None,
    ) -> None:
        import torch

        from ..serialization import load_checkpoint

        if threads is not None:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the actor's CPUs (at least 1)
        self.model, self.tokenizer = load_checkpoint(checkpoint)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device).eval()
        self.speed = fastbert_config(self.model).exit_rule.speed if speed is None else speed
        self.text_column, self.pair_column = text_column, pair_column
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, batch):
        """``batch``: a dict of numpy arrays or a pandas DataFrame; the same, with
        :data:`OUTPUT_COLUMNS` added, rows in input order."""
        is_frame = hasattr(batch, "columns")
        columns = list(batch.columns) if is_frame else list(batch)
        if self.text_column not in columns:
            raise KeyError(f"the batch has no {self.text_column!r} column (columns: {columns}); pass text_column=")
        texts = [str(text) for text in batch[self.text_column]]
        pairs = None
        if self.pair_column is not None:
            if self.pair_column not in columns:
                raise KeyError(f"the batch has no {self.pair_column!r} column (columns: {columns})")
            pairs = [str(text) for text in batch[self.pair_column]]
        rows = classify_texts(
            self.model, self.tokenizer, texts, speed=self.speed, batch_size=self.batch_size,
            max_length=self.max_length, pairs=pairs,
        )  # fmt: skip
        added = {
            "label": np.array([row["label"] for row in rows], dtype=object),
            "label_id": np.array([row["label_id"] for row in rows], dtype=np.int64),
            "score": np.array([max(row["scores"]) for row in rows], dtype=np.float32),
            "scores": np.asarray([row["scores"] for row in rows], dtype=np.float32),  # [N, C]: a tensor column
            "exit_layer": np.array([row["exit_layer"] for row in rows], dtype=np.int64),
            "uncertainty": np.array([row["uncertainty"] for row in rows], dtype=np.float32),
        }
        if is_frame:
            out = batch.copy()
            for name, values in added.items():
                out[name] = list(values) if name == "scores" else values
            return out
        return {**batch, **added}


def read_dataset(path: str, text_column: str = "text"):
    """A Ray dataset of the corpus at ``path`` (a file or a folder, local or remote), by suffix:
    ``.parquet``, ``.jsonl``/``.json``, ``.csv`` or ``.txt`` (one text a line, read as ``text``)."""
    import ray.data

    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix == ".parquet" or suffix == "":
        return ray.data.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return ray.data.read_json(path, lines=True) if suffix == ".jsonl" else ray.data.read_json(path)
    if suffix == ".csv":
        return ray.data.read_csv(path)
    if suffix == ".txt":
        dataset = ray.data.read_text(path)
        return dataset if text_column == "text" else dataset.rename_columns({"text": text_column})
    raise ValueError(f"{path}: unknown corpus format {suffix!r}; known: .parquet, .jsonl, .json, .csv, .txt")


def classify_with_ray(
    checkpoint: str | Path,
    source: str,
    output: str,
    *,
    speed: float | None = None,
    address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    threads_per_actor: int | None = None,
    batch_size: int = 256,
    max_length: int = 128,
    text_column: str = "text",
) -> str:
    """Classifies ``source`` into the file ``output`` (Parquet, or JSON Lines if its name ends in
    ``.jsonl``): the source's columns and :data:`OUTPUT_COLUMNS`, in the source's order, on a Ray
    cluster: the one at ``address``, or a local one started here. Each of the ``actors`` takes
    ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs; keep ``actors x cpus_per_actor`` below the
    cluster's CPUs, so that reading can run beside them. Returns ``output``."""
    import ray
    import ray.data

    if actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    if not cpus_per_actor > 0 or gpus_per_actor < 0:
        raise ValueError(
            f"cpus_per_actor must be positive and gpus_per_actor not negative, got {cpus_per_actor}, {gpus_per_actor}"
        )
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = read_dataset(source, text_column).map_batches(
            FastBertPredictor,
            fn_constructor_kwargs={
                "checkpoint": str(checkpoint),
                "speed": speed,
                "text_column": text_column,
                "max_length": max_length,
                "threads": threads_per_actor,
            },
            batch_size=batch_size,
            concurrency=actors,
            # Leave CPUs to the read and write tasks: actors holding every CPU of the cluster
            # would starve them, and the job would wait forever.
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
            batch_format="pandas",
            # A lost actor is restarted, and its batch retried: every row comes out once.
            max_restarts=-1,
            max_task_retries=-1,
        )
        _write_in_order(dataset, Path(output))
    finally:
        if started_here:
            ray.shutdown()
    return output


def _write_in_order(dataset, output: Path) -> None:
    """Streams the dataset's batches, in order, into one file on the driver (bounded memory: one
    batch at a time), which appears atomically when complete. Ray's own ``write_parquet`` writes a
    folder of files in parallel whose names do not sort in row order; for that, call it yourself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = output.with_name(output.name + ".tmp")
    as_jsonl = output.suffix.lower() == ".jsonl"
    writer = None
    with partial.open("w", encoding="utf-8") if as_jsonl else contextlib.nullcontext() as lines:
        for frame in dataset.iter_batches(batch_format="pandas", batch_size=None):
            frame = frame.assign(scores=[[float(x) for x in row] for row in frame["scores"]])
            if as_jsonl:
                text = frame.to_json(orient="records", lines=True, force_ascii=False)
                lines.write(text if not text or text.endswith("\n") else text + "\n")
                continue
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table.cast(writer.schema))
    if writer is not None:
        writer.close()
    partial.replace(output)


# ---- Ray Serve: replicas of the HTTP server ----------------------------------------------------


class FastBertReplica:
    """One Ray Serve replica: its own :class:`~fastbert_kernels.serving.Engine` (and so its own
    depth-pooled batching) behind the same FastAPI application as ``serve``
    (:func:`fastbert_kernels.server.create_app`). Wrapped by :func:`deployment`."""

    def __init__(self, checkpoint: str, engine_options: dict, settings: dict) -> None:
        from ..server import ServerSettings
        from ..server.run import build

        self.engine, self.asgi_app = build(checkpoint, ServerSettings(**settings), **engine_options)

    def __serve_build_asgi_app__(self):
        return self.asgi_app

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=5.0)  # a replica being stopped answers what it holds first


def deployment(
    checkpoint: str | Path,
    *,
    replicas: int | None = 1,
    autoscaling: dict | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    engine_options: dict | None = None,
    settings: dict | None = None,
):
    """A bound Ray Serve application of :class:`FastBertReplica`: ``replicas`` copies, or Ray
    Serve's ``autoscaling`` config (``{"min_replicas": 1, "max_replicas": 4, ...}``) instead.
    ``engine_options`` go to each replica's Engine, ``settings`` to its
    :class:`~fastbert_kernels.server.ServerSettings`. Run it with ``serve.run(app, route_prefix="/")``."""
    from ray import serve

    if autoscaling is None and (replicas is None or replicas < 1):
        raise ValueError(f"replicas must be at least 1 (or give autoscaling), got {replicas}")
    settings = {"model_id": str(checkpoint), **(settings or {})}
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
    options |= {"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": replicas}
    replica = serve.deployment(serve.ingress()(FastBertReplica), name="fastbert", **options)
    return replica.bind(str(checkpoint), engine_options or {}, settings)


def serve_replicas(checkpoint: str | Path, host: str, port: int, replicas: int, **options) -> int:
    """``python -m fastbert_kernels serve CKPT --replicas N``: a local Ray cluster (or the one in
    ``RAY_ADDRESS``), Ray Serve's proxy on ``host:port``, ``replicas`` replicas; until SIGTERM or
    SIGINT, then Ray Serve's graceful shutdown (each replica drains its engine)."""
    import signal
    import threading

    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(checkpoint, replicas=replicas, **options), route_prefix="/", name="fastbert")
        print(f"serving {checkpoint} on http://{host}:{port} with {replicas} replicas (Ray Serve)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
