"""The serving engine: answers equal running each request alone whatever the arrival order and
concurrency; bad requests, timeouts, cancellation and step failures affect only their own
requests; back-pressure and closing never lose an accepted request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import threading
import time

import pytest
import torch
from helpers import VOCAB, layers_wait_for, spread_branches, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbert_kernels as fbk
from fastbert_kernels.serving import Engine, EngineClosedError, EngineFullError, _pick_depth, _Row


def _model():
    model = fbk.patch(tiny_model("bert", layers=4))
    spread_branches(model)
    return model.eval()


def _requests(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(count)]


def _alone(model, ids: list[int], speed: float):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), speed=speed)


@pytest.mark.parametrize(
    "max_batch,policy", [(1, "fullest"), (4, "fullest"), (16, "fullest"), (4, "deepest"), (4, "oldest")]
)
def test_answers_equal_running_each_request_alone(max_batch, policy, _seed):
    model = _model()
    requests = _requests(40, _seed)
    speeds = [random.Random(_seed + i).choice([0.0, 0.3, 0.6, 0.9]) for i in range(len(requests))]
    order = list(range(len(requests)))
    random.Random(_seed).shuffle(order)
    with Engine(model, max_batch=max_batch, policy=policy) as engine:
        futures = {i: engine.submit(requests[i], speed=speeds[i]) for i in order}
        results = {i: f.result(timeout=120) for i, f in futures.items()}
    exit_layers = set()
    for i, ids in enumerate(requests):
        expected = _alone(model, ids, speeds[i])
        got = results[i]
        assert got.exit_layer == int(expected.exit_layer), i
        torch.testing.assert_close(got.logits, expected.logits[0], atol=1e-5, rtol=1e-5)
        assert got.label == int(expected.logits[0].argmax())
        exit_layers.add(got.exit_layer)
    assert len(exit_layers) > 1, "the requests should leave at different depths"
    assert engine.stats.completed == len(requests)


@pytest.mark.parametrize(
    "criterion,temperature,patience,students",
    [("margin", 1.0, 2, None), ("max_prob", 0.5, 3, None), ("entropy", 1.0, 2, (1, 3))],
)
def test_engine_follows_the_models_exit_rule(criterion, temperature, patience, students, _seed):
    """Under another criterion, a temperature, patience (each request's state kept on it between
    depths) and a subset of the students, each answer still equals running the request alone
    through the model."""
    model = _model()
    fbk.fastbert_config(model).exit_rule = fbk.ExitRule(criterion, temperature, patience, students=students)
    requests = _requests(24, _seed)
    speeds = [random.Random(_seed + i).choice([0.4, 0.7, 1.0]) for i in range(len(requests))]
    with Engine(model, max_batch=4) as engine:
        results = [
            f.result(timeout=120) for f in [engine.submit(r, speed=s) for r, s in zip(requests, speeds, strict=True)]
        ]
    for ids, speed, got in zip(requests, speeds, results, strict=True):
        expected = _alone(model, ids, speed)
        assert got.exit_layer == int(expected.exit_layer)
        torch.testing.assert_close(got.logits, expected.logits[0], atol=1e-5, rtol=1e-5)
        assert got.uncertainty == pytest.approx(float(expected.uncertainty[0]), abs=1e-5)
    assert min(r.exit_layer for r in results) >= min(patience, 4)


def test_many_client_threads(_seed):
    model = _model()
    requests = _requests(48, _seed)
    results: dict[int, object] = {}
    with Engine(model, max_batch=8) as engine:

        def client(part: int) -> None:
            for i in range(part, len(requests), 6):
                results[i] = engine.submit(requests[i], speed=0.5).result(timeout=120)

        threads = [threading.Thread(target=client, args=(p,)) for p in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == list(range(len(requests)))
    for i, ids in enumerate(requests):
        assert results[i].exit_layer == int(_alone(model, ids, 0.5).exit_layer)


def test_bad_requests_fail_alone():
    model = _model()
    with Engine(model) as engine:
        good = engine.submit([7, 8, 9], speed=0.5)
        empty = engine.submit([], speed=0.5)
        too_long = engine.submit([7] * 1000, speed=0.5)
        wrong_type = engine.submit(3.5, speed=0.5)
        bad_speed = engine.submit([7, 8], speed=2.0)
        text_without_tokenizer = engine.submit("some text")
        out_of_vocab = engine.submit([VOCAB + 5])
        assert good.result(timeout=60).exit_layer >= 1
    with pytest.raises(ValueError, match="empty request"):
        empty.result()
    with pytest.raises(ValueError, match="position limit"):
        too_long.result()
    with pytest.raises(TypeError, match="a request is a text or a sequence of token ids"):
        wrong_type.result()
    with pytest.raises(ValueError, match="speed"):
        bad_speed.result()
    with pytest.raises(TypeError, match="need a tokenizer"):
        text_without_tokenizer.result()
    with pytest.raises(ValueError, match="token ids must be in"):
        out_of_vocab.result()


def test_a_failing_step_fails_its_rows_and_the_engine_keeps_serving(monkeypatch):
    model = _model()
    layer = model.bert.encoder.layer[1]
    original = type(layer).forward
    broken = threading.Event()
    broken.set()

    def flaky(self, *args, **kwargs):
        if broken.is_set():
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    with Engine(model, max_batch=64) as engine:
        monkeypatch.setattr(type(layer), "forward", flaky)
        first = [engine.submit([5 + i, 6, 7], speed=0.0) for i in range(3)]
        errors = [f.exception(timeout=60) for f in first]
        assert all(isinstance(e, RuntimeError) and "injected" in str(e) for e in errors)
        broken.clear()
        later = engine.submit([9, 10, 11], speed=0.0).result(timeout=60)
    assert later.exit_layer == 4
    assert engine.stats.failed == 3


def test_timeouts_and_cancellation():
    model = _model()
    started = threading.Event()
    release = threading.Event()
    with Engine(model, max_batch=1) as engine, layers_wait_for(model, release, started):
        blocker = engine.submit([5, 6, 7], speed=0.0)
        assert started.wait(timeout=30)
        timed_out = engine.submit([8, 9], speed=0.0, timeout=0.01)
        cancelled = engine.submit([8, 9, 10], speed=0.0)
        assert cancelled.cancel()
        time.sleep(0.05)  # past the 10 ms deadline before the worker looks at the queue again
        release.set()
        assert blocker.result(timeout=60).exit_layer == 4
        with pytest.raises(TimeoutError):
            timed_out.result(timeout=60)
        assert cancelled.cancelled()


def test_back_pressure_and_closing_drain():
    model = _model()
    release = threading.Event()
    with layers_wait_for(model, release):
        engine = Engine(model, max_batch=2, max_in_flight=2)
        try:
            accepted = [engine.submit([5, 6], speed=0.0), engine.submit([7, 8], speed=0.0)]
            with pytest.raises(EngineFullError):
                engine.submit([9], speed=0.0, block=False)
            with pytest.raises(EngineFullError):
                engine.submit([9], speed=0.0, wait=0.05)
            release.set()
            engine.close()  # drains: every accepted request is answered
            assert all(f.result(timeout=0).exit_layer == 4 for f in accepted)
            with pytest.raises(EngineClosedError):
                engine.submit([5], speed=0.0)
        finally:
            release.set()
            engine.close()


def test_asyncio_and_blocking_conveniences():
    model = _model()
    requests = _requests(6, 1)
    with Engine(model) as engine:
        blocking = engine.classify(requests, speed=0.5)

        async def run():
            return await asyncio.gather(*(engine.aclassify(r, speed=0.5) for r in requests))

        awaited = asyncio.run(run())
    for a, b in zip(blocking, awaited, strict=True):
        assert a.exit_layer == b.exit_layer
        torch.testing.assert_close(a.logits, b.logits)


def test_text_requests_with_a_tokenizer():
    from helpers import word_tokenizer

    model = _model()
    tokenizer = word_tokenizer()
    with Engine(model, tokenizer) as engine:
        result = engine.submit("a b c", speed=0.5).result(timeout=60)
        with pytest.raises(ValueError, match="empty request"):
            engine.submit("   ").result()
    ids = tokenizer("a b c")["input_ids"]
    assert result.exit_layer == int(_alone(model, ids, 0.5).exit_layer)


def test_policy_serves_the_fullest_depth_and_never_starves():
    future = concurrent.futures.Future()

    def rows(count: int, waited: int = 0) -> list[_Row]:
        return [_Row(future, torch.zeros(1, 1), 0.5, None, serial=i, waited=waited) for i in range(count)]

    assert _pick_depth([rows(3), rows(5), rows(1)], max_wait_steps=16) == 1
    assert _pick_depth([rows(2), rows(2), []], max_wait_steps=16) == 1  # ties go deeper
    assert _pick_depth([rows(3), rows(5), rows(1)], 16, "deepest") == 2
    oldest_first = [rows(3), [_Row(future, torch.zeros(1, 1), 0.5, None, serial=-1)], rows(1)]
    assert _pick_depth(oldest_first, 16, "oldest") == 1
    # A row that waited max_wait_steps is served first, however full the other depths are.
    for policy in ("fullest", "deepest", "oldest"):
        assert _pick_depth([rows(1, waited=16), rows(50), []], 16, policy) == 0
    with pytest.raises(ValueError, match="policy"):
        Engine(_model(), policy="random")


def test_batches_fill_under_load(_seed):
    model = _model()
    requests = _requests(64, _seed)
    gate = threading.Event()
    # The load arrives while the first call runs.
    with Engine(model, max_batch=8) as engine, layers_wait_for(model, gate):
        futures = [engine.submit(r, speed=0.0) for r in requests]
        gate.set()
        for f in futures:
            f.result(timeout=120)
    # Speed 0: nobody leaves early; with the queue full, layer calls run (nearly) full.
    assert engine.stats.mean_fill(8) > 0.8
    assert sum(engine.stats.layer_rows) == 64 * 4


# ---- HTTP (the serve extra), on the loopback interface only -------------------------------------


@pytest.fixture
def http_server():
    pytest.importorskip("starlette")
    uvicorn = pytest.importorskip("uvicorn")
    import socket

    from helpers import word_tokenizer

    from fastbert_kernels.apps.serve import create_app

    model = _model()
    engine = Engine(model, word_tokenizer(), max_batch=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_body_bytes=2048), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", model, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()


def _http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_classify_health_and_metrics(http_server):
    import json

    from helpers import word_tokenizer

    url, model, _ = http_server
    status, body = _http(f"{url}/health")
    assert (status, body) == (200, {"status": "ok"})
    status, body = _http(f"{url}/classify", json.dumps({"texts": ["a b c", "d e"], "speed": 0.5}).encode())
    assert status == 200 and len(body["results"]) == 2
    ids = word_tokenizer()("a b c")["input_ids"]
    expected = _alone(model, ids, 0.5)
    first = body["results"][0]
    assert first["exit_layer"] == int(expected.exit_layer)
    torch.testing.assert_close(torch.tensor(first["scores"]), torch.softmax(expected.logits[0], -1), atol=1e-5, rtol=0)
    status, metrics = _http(f"{url}/metrics")
    assert status == 200 and metrics["completed"] >= 2 and metrics["latency_ms"]["p50"] is not None


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"text": "a", "texts": ["b"]}', 422, "exactly one"),
        (b'{"texts": []}', 422, "non-empty list"),
        (b'{"text": "a", "speed": 3}', 422, "speed"),
        (b'{"text": "   "}', 422, "empty request"),
        (b'{"text": "' + b"a " * 2000 + b'"}', 413, "byte limit"),
        (b'{"text": "a", "sped": 0.9}', 422, "unknown fields ['sped']"),
        (b'{"text": "a", "speed": true}', 422, "speed must be a real number"),
        (b'{"texts": "a"}', 422, "non-empty list"),
        (b"[" * 1000 + b"]" * 1000, 422, "nests deeper than 32"),
        (b'{"text": ' + b"[" * 600 + b"]" * 600 + b"}", 422, "nests deeper than 32"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_http_bad_bodies_get_clear_4xx(http_server, body, status, message):
    url, _, _ = http_server
    got_status, got = _http(f"{url}/classify", body)
    assert got_status == status and message in got["error"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
_bodies = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"text": st.text(max_size=30)}, optional={"speed": _json, "texts": _json, "extra": _json}
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.binary(max_size=64),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_http_any_body_gets_a_2xx_or_a_4xx(http_server, body):
    """Any JSON (any depth, types, unicode) or any bytes: an answer with a 2xx or a 4xx and a
    message, never a 5xx or a reset connection."""
    url, _, _ = http_server
    status, answer = _http(f"{url}/classify", body)
    assert 200 <= status < 500, (status, answer)
    assert ("results" in answer) if status == 200 else isinstance(answer.get("error"), str)


def test_http_client_that_hangs_up_is_dropped_from_the_queues(http_server):
    """A request whose client is gone does not keep computing: its rows leave the engine."""
    import socket

    url, model, engine = http_server
    port = int(url.rsplit(":", 1)[1])
    release, started = threading.Event(), threading.Event()
    with layers_wait_for(model, release, started):
        blocker = engine.submit([5, 6, 7], speed=0.0)
        assert started.wait(timeout=30)
        body = json.dumps({"texts": ["a b", "c d e", "f"], "speed": 0.0}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while sum(len(rows) for rows in engine._rows) + len(engine._incoming) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.close()
        time.sleep(0.3)  # the server sees the hang-up and cancels the request's rows
        release.set()
        blocker.result(timeout=60)
    deadline = time.monotonic() + 30
    while (any(engine._rows) or engine._incoming) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.completed == 1  # the blocker alone: the three gone rows never ran to an answer


def test_http_health_reports_a_stopped_engine():
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fastbert_kernels.apps.serve import create_app

    model = _model()
    layer_class = type(model.bert.encoder.layer[0])
    original = layer_class.forward

    def dying(self, *args, **kwargs):
        raise KeyboardInterrupt

    engine = Engine(model, max_batch=2)
    layer_class.forward = dying
    try:
        with pytest.raises(EngineClosedError):
            engine.submit([5, 6], speed=0.0).result(timeout=60)
    finally:
        layer_class.forward = original
    client = TestClient(create_app(engine))
    answer = client.get("/health")
    assert answer.status_code == 503 and answer.json()["status"] == "unhealthy"
    engine.close()
