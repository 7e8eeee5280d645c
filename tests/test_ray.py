"""Ray Data (the ray extra) on a local cluster of 2 CPUs, started once for the module: the
predictor's rows equal the single-process run's (order, labels, exit layers, scores), on Parquet
and JSON Lines, through the command line too; a crashed actor still yields every row once."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import spread_branches, tiny_model, word_tokenizer

import fastbert_kernels as fbk

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fastbert_kernels.integrations.ray import FastBertPredictor, classify_with_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A distilled-looking tiny checkpoint, a Parquet corpus, and the single-process answer."""
    directory = tmp_path_factory.mktemp("ray")
    model = fbk.patch(tiny_model("bert", layers=4))
    spread_branches(model)
    fbk.save_pretrained(model.eval(), directory / "ckpt", tokenizer=word_tokenizer())
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    lengths = torch.randint(1, 30, (300,), generator=generator).tolist()
    texts = [" ".join(f"w{int(w)}" for w in torch.randint(0, 60, (n,), generator=generator)) for n in lengths]
    pq.write_table(pa.table({"text": texts, "id": list(range(300))}), directory / "corpus.parquet", row_group_size=64)
    model, tokenizer = fbk.load_checkpoint(directory / "ckpt")
    out = fbk.classify_corpus(model, texts, tokenizer, directory / "single.jsonl", speed=0.5, progress=False)
    single = [json.loads(line) for line in out.read_text().splitlines()]
    return directory, texts, single


def _assert_rows_equal(rows: list[dict], single: list[dict]) -> None:
    assert len(rows) == len(single)
    for row, expected in zip(rows, single, strict=True):
        assert row["label"] == expected["label"] and row["label_id"] == expected["label_id"]
        assert row["exit_layer"] == expected["exit_layer"]
        assert [float(s) for s in row["scores"]] == pytest.approx(expected["scores"], abs=1e-5)
        assert float(row["score"]) == pytest.approx(max(expected["scores"]), abs=1e-5)
        assert float(row["uncertainty"]) == pytest.approx(expected["uncertainty"], abs=1e-5)


def test_predictor_on_a_batch_keeps_order_and_columns(job):
    directory, texts, single = job
    predictor = FastBertPredictor(directory / "ckpt", speed=0.5)
    import numpy as np
    import pandas as pd

    batch = {"text": np.array(texts[:40], dtype=object), "id": np.arange(40)}
    out = predictor(batch)
    assert list(out["id"]) == list(range(40))
    rows = [{name: out[name][i] for name in ("label", "label_id", "score", "scores", "exit_layer", "uncertainty")}
            for i in range(40)]  # fmt: skip
    _assert_rows_equal(rows, single[:40])
    frame = predictor(pd.DataFrame(batch))
    assert list(frame["label"]) == list(out["label"]) and list(frame["id"]) == list(range(40))
    with pytest.raises(KeyError, match="no 'body' column"):
        FastBertPredictor(directory / "ckpt", text_column="body")(batch)


def test_ray_data_over_parquet_equals_the_single_process_run(cluster, job):
    directory, texts, single = job
    output = classify_with_ray(
        directory / "ckpt", str(directory / "corpus.parquet"), str(directory / "out.parquet"), speed=0.5, actors=2,
        cpus_per_actor=0.5, batch_size=32,
    )  # fmt: skip
    table = pq.read_table(output).to_pylist()
    assert [row["id"] for row in table] == list(range(300))  # the dataset's order, every row once
    assert [row["text"] for row in table] == texts
    _assert_rows_equal(table, single)


def test_a_crashed_actor_still_yields_every_row_once(cluster, job):
    """One actor dies (os._exit, as ray.kill or a lost node would leave it) in the middle of the job;
    Ray restarts it and retries its batch: every row comes out exactly once."""
    directory, _, single = job
    marker = directory / "crash-once"
    marker.write_text("")

    class CrashingOnce(FastBertPredictor):
        def __call__(self, batch):
            try:
                os.unlink(marker)  # the first actor to get here, and only it, dies
            except FileNotFoundError:
                return super().__call__(batch)
            os._exit(1)

    dataset = ray.data.read_parquet(str(directory / "corpus.parquet")).map_batches(
        CrashingOnce,
        fn_constructor_kwargs={"checkpoint": str(directory / "ckpt"), "speed": 0.5},
        batch_size=32,
        concurrency=2,
        num_cpus=0.5,
        batch_format="pandas",
        max_restarts=-1,
        max_task_retries=-1,
    )
    rows = dataset.take_all()
    assert not marker.exists()  # an actor did die
    assert sorted(row["id"] for row in rows) == list(range(300))
    _assert_rows_equal(sorted(rows, key=lambda row: row["id"]), single)


def test_the_command_line_runs_on_ray(cluster, job, capsys):
    from fastbert_kernels.apps.cli import main

    directory, texts, single = job
    source = directory / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    out = directory / "cli.jsonl"
    args = ["classify", str(directory / "ckpt"), str(source), "--out", str(out), "--engine", "ray", "--speed", "0.5"]
    assert main([*args, "--actors", "2", "--cpus-per-actor", "0.5", "--batch-size", "50"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["text"] for row in rows] == texts
    _assert_rows_equal(rows, single)


def test_two_ray_serve_replicas_answer_as_the_engine_does(cluster, job):
    """Two replicas behind one route on loopback, concurrent clients: every answer equals the
    engine's on the same checkpoint, in Hugging Face's shape."""
    import concurrent.futures
    import socket
    import urllib.request

    from ray import serve

    from fastbert_kernels.integrations.ray import deployment
    from fastbert_kernels.serving import Engine

    directory, texts, _ = job
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = deployment(directory / "ckpt", replicas=2, cpus_per_replica=0.25)
        serve.run(app, route_prefix="/", name="fastbert")
        status = serve.status().applications["fastbert"].deployments["fastbert"]
        assert status.replica_states.get("RUNNING") == 2

        def ask(text: str) -> list[dict]:
            body = json.dumps({"inputs": text}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, texts[:40]))
    finally:
        serve.shutdown()
    model, tokenizer = fbk.load_checkpoint(directory / "ckpt")
    with Engine(model, tokenizer) as engine:
        expected = engine.classify(texts[:40])
    names = model.config.id2label
    for answer, result in zip(answers, expected, strict=True):
        assert answer[0]["label"] == names[result.label]
        scores = torch.softmax(result.logits, -1)
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(
            {names[i]: float(scores[i]) for i in range(len(scores))}, abs=1e-5
        )


def test_serve_replicas_from_the_command_line(job):
    """`serve CKPT --replicas 2` in its own process (its own local cluster): it answers on the
    port it was given, and SIGTERM stops it with status 0."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    directory, texts, single = job
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = directory / "replicas.log"
    command = [sys.executable, "-m", "fastbert_kernels", "serve", str(directory / "ckpt"), "--replicas", "2",
               "--port", str(port)]  # fmt: skip
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "replicas (Ray Serve)" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = json.dumps({"texts": texts[:3], "speed": 0.5}).encode()  # the speed of the single-process rows
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/classify", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            got = json.loads(answer.read())["results"]
        assert [(r["label_name"], r["exit_layer"]) for r in got] == [(r["label"], r["exit_layer"]) for r in single[:3]]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
