"""The HTTP server (the serve extra): Hugging Face inference shapes on /predict and /, the richer
/classify, /info, /health, Prometheus /metrics, TEI's error bodies and status codes, request ids,
the body limits, clients that hang up, the drain, and a real SIGTERM under load."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from helpers import layers_wait_for, spread_branches, tiny_model, word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbert_kernels as fbk
from fastbert_kernels.serving import Engine, EngineClosedError

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
uvicorn = pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from fastbert_kernels.server import DrainingServer, DrainState, ServerSettings, create_app  # noqa: E402

SETTINGS = ServerSettings(model_id="tiny", max_body_bytes=2048, max_client_batch_size=8)


def _model():
    model = fbk.patch(tiny_model("bert", layers=4))
    spread_branches(model)
    return model.eval()


def _alone(model, tokenizer, *texts: str, speed: float):
    with torch.no_grad():
        return model(**tokenizer(*texts, return_tensors="pt"), speed=speed)


@pytest.fixture
def served():
    model, tokenizer = _model(), word_tokenizer()
    with (
        Engine(model, tokenizer, max_batch=8, max_in_flight=64) as engine,
        TestClient(create_app(engine, SETTINGS)) as client,
    ):
        yield client, model, tokenizer, engine


def _labels(model) -> list[str]:
    return [f"LABEL_{i}" for i in range(model.config.num_labels)]


# ---- the Hugging Face / TEI shapes ----------------------------------------------------------------


def test_predict_answers_in_the_hugging_face_shapes(served):
    client, model, tokenizer, _ = served
    speed = fbk.state.fastbert_config(model).exit_rule.speed
    for path in ("/predict", "/"):
        one = client.post(path, json={"inputs": "w1 w2 w3"})
        assert one.status_code == 200
        answer = one.json()
        assert [item["label"] for item in answer] != [] and set(answer[0]) == {"label", "score"}
        expected = torch.softmax(_alone(model, tokenizer, "w1 w2 w3", speed=speed).logits[0], -1)
        scores = {item["label"]: item["score"] for item in answer}
        assert sorted(scores) == sorted(_labels(model))  # every label, as TEI answers
        assert [item["score"] for item in answer] == sorted(scores.values(), reverse=True)  # best first
        for i, label in enumerate(_labels(model)):
            assert scores[label] == pytest.approx(float(expected[i]), abs=1e-5)
    batch = client.post("/predict", json={"inputs": ["w1 w2", "w3", "w4 w5 w6"]}).json()
    assert len(batch) == 3 and all(len(item) == model.config.num_labels for item in batch)
    single = client.post("/predict", json={"inputs": "w3"}).json()
    assert [i["label"] for i in batch[1]] == [i["label"] for i in single]  # batching changes no answer
    assert [i["score"] for i in batch[1]] == pytest.approx([i["score"] for i in single], abs=1e-5)


def test_predict_parameters_top_k_function_and_raw_scores(served):
    client, model, tokenizer, _ = served
    speed = fbk.state.fastbert_config(model).exit_rule.speed
    logits = _alone(model, tokenizer, "w1 w2", speed=speed).logits[0]
    top = client.post("/predict", json={"inputs": "w1 w2", "parameters": {"top_k": 1}}).json()
    assert len(top) == 1 and top[0]["label"] == f"LABEL_{int(logits.argmax())}"
    sigmoid = client.post("/predict", json={"inputs": "w1 w2", "parameters": {"function_to_apply": "sigmoid"}}).json()
    for item in sigmoid:
        assert item["score"] == pytest.approx(float(torch.sigmoid(logits[int(item["label"][6:])])), abs=1e-5)
    raw = client.post("/predict", json={"inputs": "w1 w2", "raw_scores": True}).json()
    for item in raw:
        assert item["score"] == pytest.approx(float(logits[int(item["label"][6:])]), abs=1e-4)
    clash = client.post(
        "/predict", json={"inputs": "w1", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}}
    )
    assert clash.status_code == 422 and "raw_scores" in clash.json()["error"]


def test_predict_takes_sentence_pairs(served):
    client, model, tokenizer, _ = served
    speed = fbk.state.fastbert_config(model).exit_rule.speed
    expected = torch.softmax(_alone(model, tokenizer, "w1 w2", "w3 w4", speed=speed).logits[0], -1)
    for inputs in (
        {"text": "w1 w2", "text_pair": "w3 w4"},
        [["w1 w2", "w3 w4"]],
        [{"text": "w1 w2", "text_pair": "w3 w4"}],
    ):
        answer = client.post("/predict", json={"inputs": inputs}).json()
        answer = answer if isinstance(inputs, dict) else answer[0]
        scores = {item["label"]: item["score"] for item in answer}
        for i, label in enumerate(_labels(model)):
            assert scores[label] == pytest.approx(float(expected[i]), abs=1e-5), inputs


def test_classify_keeps_the_rich_answer_with_its_rule(served):
    client, model, tokenizer, _ = served
    answer = client.post("/classify", json={"texts": ["w1 w2 w3", "w4 w5"], "speed": 0.5})
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["results"]) == 2 and body["rule"]["speed"] == 0.5
    assert body["rule"]["criterion"] == fbk.state.fastbert_config(model).exit_rule.criterion
    expected = _alone(model, tokenizer, "w1 w2 w3", speed=0.5)
    first = body["results"][0]
    assert first["exit_layer"] == int(expected.exit_layer)
    torch.testing.assert_close(torch.tensor(first["scores"]), torch.softmax(expected.logits[0], -1), atol=1e-5, rtol=0)
    pair = client.post("/classify", json={"inputs": [["w1", "w2"]], "speed": 0.0}).json()
    assert pair["results"][0]["exit_layer"] == 4  # speed 0: the teacher answers


def test_info_health_openapi_and_request_ids(served):
    client, model, _, engine = served
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["architecture"] == "bert" and info["num_layers"] == 4
    labels = _labels(model)  # TEI's model_type.classifier, so that its clients read it
    assert info["model_type"]["classifier"]["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert info["model_type"]["classifier"]["label2id"] == {name: i for i, name in enumerate(labels)}
    assert (
        info["labels"] == _labels(model) and info["exit_rule"] == fbk.state.fastbert_config(model).exit_rule.as_dict()
    )
    assert info["max_client_batch_size"] == 8 and info["max_batch_requests"] == engine.max_batch
    assert info["max_batch_tokens"] == engine.max_batch_tokens and info["max_input_length"] == 64
    assert info["model_dtype"] == "float32" and info["max_wait_ms"] == pytest.approx(100.0)
    assert info["version"] == fbk.__version__ and info["certificate"] is None
    assert client.get("/health").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/", "/classify", "/health", "/info", "/metrics"} <= set(spec["paths"])
    assert "PredictRequest" in spec["components"]["schemas"] and client.get("/docs").status_code == 200
    echoed = client.post("/predict", json={"inputs": "w1"}, headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/health").headers["x-request-id"]


# ---- errors: TEI's bodies and status codes ----------------------------------------------------------


@pytest.mark.parametrize(
    "path,body,status,error_type,message",
    [
        ("/predict", b"{not json", 422, "validation", "JSON"),
        ("/predict", b"[1, 2]", 422, "validation", ""),
        ("/predict", b'{"inputs": []}', 422, "empty", "no inputs"),
        ("/predict", b'{"inputs": "   "}', 422, "empty", "empty request"),
        ("/predict", b'{"inputs": "w1", "sped": 1}', 422, "validation", "unknown field 'sped'"),
        ("/predict", b'{"inputs": "w1", "parameters": {"top_k": 0}}', 422, "validation", "top_k"),
        ("/predict", b'{"inputs": ["w1", 3]}', 422, "validation", "inputs"),
        ("/predict", json.dumps({"inputs": ["w1"] * 9}).encode(), 413, "validation", "at most 8 inputs"),
        ("/predict", b'{"inputs": "' + b"w1 " * 1000 + b'"}', 413, "validation", "2048-byte limit"),
        ("/predict", b"[" * 1000 + b"]" * 1000, 422, "validation", "nests deeper than 32"),
        ("/predict", b"\xff\xfe", 422, "validation", ""),
        ("/classify", b'{"text": "w1", "texts": ["w2"]}', 422, "validation", "exactly one"),
        ("/classify", b'{"text": "w1", "speed": 3}', 422, "validation", "speed"),
        ("/classify", b'{"text": "w1", "speed": true}', 422, "validation", "speed"),
        ("/nowhere", b"{}", 404, "validation", "Not Found"),
    ],
)
def test_bad_requests_get_tei_error_bodies(served, path, body, status, error_type, message):
    client = served[0]
    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["error_type"] == error_type and message in answer.json()["error"]


def test_long_texts_get_413_unless_truncation_is_asked_for(served):
    client = served[0]
    text = " ".join(f"w{i % 40}" for i in range(80))  # 82 tokens over the tiny model's 64 positions
    refused = client.post("/predict", json={"inputs": text})
    assert refused.status_code == 413 and "position limit is 64" in refused.json()["error"]
    for body in ({"inputs": text, "truncate": True}, {"inputs": text, "parameters": {"truncate": True}}):
        assert client.post("/predict", json=body).status_code == 200
    assert client.post("/classify", json={"text": text, "truncate": True}).status_code == 200
    both = client.post("/predict", json={"inputs": text, "truncate": True, "parameters": {"truncate": False}})
    assert both.status_code == 422 and "truncate is given twice" in both.json()["error"]


def test_a_full_engine_answers_429_with_retry_after():
    model = _model()
    release, started = threading.Event(), threading.Event()
    with Engine(model, word_tokenizer(), max_batch=2, max_in_flight=2) as engine:
        client = TestClient(create_app(engine, SETTINGS))
        with layers_wait_for(model, release, started):
            holding = [engine.submit([5, 6], speed=0.0), engine.submit([5, 7], speed=0.0)]
            assert started.wait(timeout=30)
            answer = client.post("/predict", json={"inputs": ["w1", "w2"]})
            assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
            assert answer.json()["error_type"] == "overloaded"
            release.set()
            for future in holding:
                future.result(timeout=60)
        assert engine.in_flight == 0  # the refused request left nothing queued


# ---- Prometheus -------------------------------------------------------------------------------------


def _samples(client) -> dict[tuple[str, tuple], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_count_requests_batches_and_exit_layers(served):
    client = served[0]
    before = _samples(client)
    texts = ["w1 w2", "w3", "w4 w5 w6", "w7"]
    results = client.post("/classify", json={"texts": texts, "speed": 0.5}).json()["results"]
    client.post("/predict", json={"inputs": "   "})  # a 422
    after = _samples(client)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("fastbert_requests_total", route="/classify", status="200") == 1
    assert delta("fastbert_request_errors_total", route="/predict", status="422") == 1
    assert delta("fastbert_exit_layer_count") == len(texts)
    assert delta("fastbert_exit_layer_sum") == sum(r["exit_layer"] for r in results)
    for layer in range(1, 5):  # cumulative buckets: answers at or below each layer
        assert delta("fastbert_exit_layer_bucket", le=f"{float(layer)}") == sum(
            r["exit_layer"] <= layer for r in results
        )
    assert delta("fastbert_batch_rows_sum", layer="1") == len(texts)  # every text runs layer 1
    assert delta("fastbert_batch_tokens_sum", layer="1") >= len(texts) * 3
    assert delta("fastbert_inference_duration_seconds_count") == len(texts)
    assert delta("fastbert_queue_duration_seconds_count") == len(texts)
    assert after[("fastbert_in_flight_rows", ())] == 0 and after[("fastbert_queued_rows", ())] == 0
    info = [key for key in after if key[0] == "fastbert_model_info"]
    assert info and dict(info[0][1])["model_id"] == "tiny"


# ---- over real sockets: hang-ups, any body, the drain -------------------------------------------------


@pytest.fixture
def http_server():
    model = _model()
    engine = Engine(model, word_tokenizer(), max_batch=8)
    drain = DrainState()
    app = create_app(engine, SETTINGS, drain=drain)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), engine, drain, drain_timeout=0.5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", model, engine, server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()


def _http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
_bodies = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"inputs": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=4)},
        optional={"parameters": _json, "truncate": _json, "extra": _json},
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.binary(max_size=64),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, path=st.sampled_from(["/predict", "/classify"]))
def test_any_body_gets_a_2xx_or_a_4xx_with_an_error(http_server, body, path):
    """Any JSON (any depth, types, unicode) or any bytes: a 2xx or a 4xx with a TEI error body,
    never a 5xx or a reset connection."""
    url = http_server[0]
    status, answer = _http(f"{url}{path}", body)
    assert 200 <= status < 500, (status, answer)
    if status != 200:
        assert isinstance(answer.get("error"), str) and isinstance(answer.get("error_type"), str)


def test_a_client_that_hangs_up_is_dropped_from_the_queues(http_server):
    url, model, engine, _, _ = http_server
    port = int(url.rsplit(":", 1)[1])
    release, started = threading.Event(), threading.Event()
    with layers_wait_for(model, release, started):
        blocker = engine.submit([5, 6, 7], speed=0.0)
        assert started.wait(timeout=30)
        body = json.dumps({"texts": ["w1 w2", "w3 w4 w5", "w6"], "speed": 0.0}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while engine.queued < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.close()
        time.sleep(0.3)  # the server sees the hang-up and cancels the request's rows
        release.set()
        blocker.result(timeout=60)
    deadline = time.monotonic() + 30
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.completed == 1  # the blocker alone: the three gone rows never ran to an answer


def test_the_drain_answers_accepted_requests_and_refuses_new_ones(http_server):
    """Draining: a request held in the engine is still answered; a new request gets 503 with
    Connection: close; /health says draining; past the drain timeout the engine's texts fail
    with an explicit 503, and the server stops."""
    url, model, engine, server, thread = http_server
    release, started = threading.Event(), threading.Event()
    answers: dict[str, tuple[int, dict]] = {}

    def post(name: str, body: dict) -> None:
        answers[name] = _http(f"{url}/classify", json.dumps(body).encode())

    with layers_wait_for(model, release, started):
        held = threading.Thread(target=post, args=("held", {"texts": ["w1 w2"], "speed": 0.0}))
        held.start()
        assert started.wait(timeout=30)
        server.begin_drain()
        assert server.drain.draining
        import http.client

        port = int(url.rsplit(":", 1)[1])
        # The listener is closed: a new connection is refused (the OS may need a moment).
        deadline = time.monotonic() + 5
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                refused = True
        assert refused
        del http
        time.sleep(0.8)  # past the 0.5 s drain timeout: the held text is failed explicitly
        release.set()
        held.join(timeout=60)
    status, body = answers["held"]
    assert status == 503 and body["error_type"] == "unhealthy" and "drain timeout" in body["error"]
    thread.join(timeout=30)
    assert not thread.is_alive() and engine.in_flight == 0


def test_health_reports_a_stopped_engine():
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


def test_sigterm_under_load_loses_no_accepted_request(tmp_path):
    """The real server process, 50 clients over loopback, some hanging up, SIGTERM in the middle:
    every accepted request is answered exactly once, and the process exits 0."""
    from fastbert_kernels.server import loadtest

    model = _model()
    fbk.save_pretrained(model, tmp_path / "ckpt", tokenizer=word_tokenizer())
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(1 + i % 30)) for i in range(40)))
    options = ["--clients", "50", "--signal-after", "2", "--max-requests", "60", "--texts", str(texts)]
    args = loadtest.build_parser().parse_args([str(tmp_path / "ckpt"), *options, "--drain-timeout", "20"])
    report = loadtest.run(args)
    assert report["problems"] == [], report
    assert report["exit_code"] == 0 and report["accepted_by_server"] > 50
    assert report["outcomes"].get("200", 0) > 0
