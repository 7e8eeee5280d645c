"""The serving engine: answers equal running each request alone whatever the arrival order and
concurrency; bad requests, timeouts, cancellation and step failures affect only their own
requests; back-pressure and closing never lose an accepted request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import pytest
import torch
from helpers import VOCAB, layers_wait_for, spread_branches, tiny_model

import fastbert_kernels as fbk
from fastbert_kernels.serving import (
    Engine,
    EngineClosedError,
    EngineFullError,
    InputTooLongError,
    _group_by_length,
    _pick_depth,
    _Row,
)


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
    with pytest.raises(TypeError, match=r"a request is a text, a \(text, text_pair\) tuple or a sequence of token ids"):
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
    now = 100.0

    def rows(count: int, age: float = 0.0, first: int = 0) -> list[_Row]:
        return [_Row(future, torch.zeros(1, 1), 0.5, None, serial=first + i, submitted=now - age) for i in range(count)]

    assert _pick_depth([rows(3), rows(5), rows(1)], now, 1.0) == 1
    assert _pick_depth([rows(2), rows(2), []], now, 1.0) == 1  # ties go deeper
    assert _pick_depth([rows(3), rows(5), rows(1)], now, 1.0, "deepest") == 2
    oldest_first = [rows(3), rows(1, first=-1), rows(1)]
    assert _pick_depth(oldest_first, now, 1.0, "oldest") == 1
    # A request older than max_wait (seconds since submit) is served first, however full the
    # other depths are; among overdue requests, the oldest submitted.
    for policy in ("fullest", "deepest", "oldest"):
        assert _pick_depth([rows(1, age=1.5, first=-5), rows(50), []], now, 1.0, policy) == 0
        assert _pick_depth([rows(1, age=1.5, first=-5), rows(1, age=2.0, first=-9), []], now, 1.0, policy) == 1
    # Merging: a small group up to merge_gap layers behind the fullest catches up first, when the
    # two fit in one call; never past the gap, nor when they would overflow max_batch.
    assert _pick_depth([rows(2), rows(5), []], now, 1.0, "fullest", max_batch=8, merge_gap=1) == 0
    assert _pick_depth([rows(2), [], rows(5)], now, 1.0, "fullest", max_batch=8, merge_gap=1) == 2
    assert _pick_depth([rows(2), [], rows(5)], now, 1.0, "fullest", max_batch=8, merge_gap=2) == 0
    assert _pick_depth([rows(2), rows(1), rows(5)], now, 1.0, "fullest", max_batch=8, merge_gap=2) == 1  # nearest first
    assert _pick_depth([rows(4), rows(5), []], now, 1.0, "fullest", max_batch=8, merge_gap=1) == 1
    assert _pick_depth([rows(2), rows(5), []], now, 1.0, "fullest", max_batch=8, merge_gap=0) == 1
    with pytest.raises(ValueError, match="merge_gap"):
        Engine(_model(), merge_gap=-1)
    with pytest.raises(ValueError, match="policy"):
        Engine(_model(), policy="random")
    with pytest.raises(ValueError, match="max_wait"):
        Engine(_model(), max_wait=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(_model(), max_batch_tokens=4, max_length=16)


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


# ---- token budget, sentence pairs, truncation, abort, observer -----------------------------------


class _Recorder:
    """An EngineObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.answers: list[tuple[int, float, float]] = []
        self.failures = 0

    def layer_call(self, layer: int, rows: int, tokens: int) -> None:
        self.calls.append((layer, rows, tokens))

    def answered(self, exit_layer: int, latency: float, queued: float) -> None:
        self.answers.append((exit_layer, latency, queued))

    def failed(self) -> None:
        self.failures += 1


def test_layer_calls_stay_within_the_token_budget(_seed):
    """Rows x padded length never exceeds max_batch_tokens, long and short requests alike, and
    the answers are still those of each request alone."""
    model, recorder = _model(), _Recorder()
    rng = random.Random(_seed)
    requests = [[rng.randrange(5, VOCAB) for _ in range(rng.choice([2, 3, 60, 64]))] for _ in range(40)]
    gate = threading.Event()
    with Engine(model, max_batch=16, max_batch_tokens=128, observer=recorder) as engine, layers_wait_for(model, gate):
        futures = [engine.submit(r, speed=0.5) for r in requests]
        gate.set()
        results = [f.result(timeout=120) for f in futures]
    assert recorder.calls and all(tokens <= 128 for _, _, tokens in recorder.calls)
    assert max(rows for _, rows, _ in recorder.calls) > 2  # short rows still share calls
    for ids, result in zip(requests, results, strict=True):
        alone = _alone(model, ids, 0.5)
        assert result.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(result.logits, alone.logits[0].float(), atol=1e-4, rtol=1e-4)
    assert sorted(layer for layer, _, _ in recorder.answers) == sorted(r.exit_layer for r in results)
    assert all(0 <= queued <= latency for _, latency, queued in recorder.answers)


def test_group_by_length_picks_the_oldest_and_fits_the_budget(_seed):
    future = concurrent.futures.Future()
    rng = random.Random(_seed)
    rows = [_Row(future, torch.zeros(rng.randint(1, 64), 1), 0.5, None, serial=i) for i in range(50)]
    for max_batch, budget in ((8, 64), (64, 256), (3, 1000)):
        chosen = _group_by_length(rows, max_batch, budget)
        assert rows[0] in chosen and 1 <= len(chosen) <= max_batch
        assert len(chosen) * max(row.hidden.shape[0] for row in chosen) <= max(budget, rows[0].hidden.shape[0])
        assert len({id(row) for row in chosen}) == len(chosen)


def test_sentence_pairs_equal_the_model_on_the_pair():
    from helpers import word_tokenizer

    model, tokenizer = _model(), word_tokenizer()
    with Engine(model, tokenizer) as engine:
        result = engine.submit(("w1 w2 w3", "w4 w5"), speed=0.5).result(timeout=60)
    encoded = tokenizer("w1 w2 w3", "w4 w5", return_tensors="pt")
    assert encoded["token_type_ids"][0].tolist().count(1) == 3  # the pair template: B and its [SEP]
    with torch.no_grad():
        alone = model(**encoded, speed=0.5)
    assert result.exit_layer == int(alone.exit_layer)
    torch.testing.assert_close(result.logits, alone.logits[0].float(), atol=1e-4, rtol=1e-4)


def test_long_texts_are_truncated_or_refused_as_asked():
    from helpers import word_tokenizer

    model, tokenizer = _model(), word_tokenizer()
    long_text = " ".join(f"w{i % 50}" for i in range(200))
    with Engine(model, tokenizer, max_length=32) as engine:
        cut = engine.submit(long_text, speed=0.0).result(timeout=60)
        with pytest.raises(InputTooLongError, match="202 tokens; the engine's max_length is 32"):
            engine.submit(long_text, speed=0.0, truncate=False).result(timeout=60)
        with pytest.raises(TypeError, match="truncate must be True or False"):
            engine.submit("w1", truncate="no")
    ids = tokenizer(long_text, truncation=True, max_length=32)["input_ids"]
    torch.testing.assert_close(cut.logits, _alone(model, ids, 0.0).logits[0].float(), atol=1e-4, rtol=1e-4)


def test_abort_and_close_with_a_timeout_leave_no_future_waiting():
    """close(timeout): what is still held after it fails with EngineClosedError, the call running
    then included; nothing is left pending and the engine's count returns to zero."""
    model, recorder = _model(), _Recorder()
    release, started = threading.Event(), threading.Event()
    engine = Engine(model, max_batch=2, observer=recorder)
    with layers_wait_for(model, release, started):
        futures = [engine.submit([5, 6, 7], speed=0.0) for _ in range(6)]
        assert started.wait(timeout=30)
        closer = threading.Thread(target=engine.close, kwargs={"timeout": 0.2})
        closer.start()
        time.sleep(0.4)  # the timeout passes while the first call is held
        release.set()
        closer.join(timeout=60)
    assert not closer.is_alive()
    _, pending = concurrent.futures.wait(futures, timeout=30)
    assert not pending
    errors = [f.exception() for f in futures]
    assert all(isinstance(e, EngineClosedError) and "closed before this request finished" in str(e) for e in errors)
    assert engine.in_flight == 0 and recorder.failures == 6
    with pytest.raises(EngineClosedError):
        engine.submit([5, 6])
