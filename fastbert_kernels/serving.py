"""A serving engine that keeps every layer call full: depth-pooled continuous batching.

Compaction makes a batch shrink as its samples leave, and nothing refills it. The engine pools
rows by depth instead. A request enters after its embeddings into the queue of depth 0. Each step
picks one depth ``d``, runs layer ``d + 1`` on up to ``max_batch`` waiting rows of that depth
(grouped by length to limit padding), then the fused exit head: the rows that exit complete their
requests at once, the others join the queue of depth ``d + 1``. New requests join between steps,
so a layer call is as full as the load allows.

Policy (:func:`_pick_depth`, default ``fullest``): the depth with the most waiting rows, ties to
the deepest (it is the closest to answering), except that a request older than ``max_wait``
seconds (since it was submitted) has its depth served first (the oldest such). The bound is on
time, not on steps, so it is a latency bound whatever a step costs, and no request starves
however the load is spread. Optionally (``merge_gap``, off by default), a small group right
behind the fullest depth catches up first when the two fit in one call, so that groups merge
instead of drifting apart; on a CPU, where a fuller call saves little, it costs median latency
(``benchmarks/bench_serving.py``). ``deepest`` and ``oldest`` are there to be measured against it.

A layer call runs at most ``max_batch`` rows and at most ``max_batch_tokens`` tokens (rows x
padded length, as Text Embeddings Inference counts them), so one long text cannot make a whole
call slow: rows of lengths close to the oldest row's are grouped first.

Answers do not depend on the engine: each request is embedded alone, kept at its own length, and
padded only inside a layer call with a mask, so its logits equal running it alone (to float
rounding) and its exit layer is the same, whatever else was in flight.

    with fbk.serving.Engine(model, tokenizer, max_batch=64) as engine:
        future = engine.submit("a gripping film", speed=0.5)   # concurrent.futures.Future
        pair = engine.submit(("a question", "a passage"))       # sentence pairs
        result = future.result()                                # EngineResult
        results = engine.classify(["...", "..."])               # blocking convenience
        result = await engine.aclassify("...")                  # asyncio
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import numbers
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .architectures import architecture_for
from .config import check_speed
from .encoder import embed, layer_context, model_device
from .modeling import teacher_logits
from .ops.reference import uncertainty as criterion_uncertainty
from .ops.reference import update_streak
from .state import branch_modules, check_students_trained, fastbert_config, is_patched

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EngineFullError(RuntimeError):
    """The engine holds ``max_in_flight`` requests and the caller asked not to wait."""


class EngineClosedError(RuntimeError):
    """The engine was closed: it takes no new requests (or it gave up on those it held)."""


class InputTooLongError(ValueError):
    """A request has more tokens than the engine's ``max_length`` and asked not to be truncated."""


class EngineObserver(Protocol):
    """What the engine reports as it works, for metrics (:mod:`fastbert_kernels.server.metrics`).
    Called on the worker thread; implementations must be cheap and thread-safe."""

    def layer_call(self, layer: int, rows: int, tokens: int) -> None:
        """Layer ``layer`` (1-based) ran ``rows`` rows padded to ``tokens`` = rows x longest."""

    def answered(self, exit_layer: int, latency: float, queued: float) -> None:
        """A request was answered at ``exit_layer``, ``latency`` seconds after it was submitted,
        of which ``queued`` seconds before its first layer call."""

    def failed(self) -> None:
        """A request failed (its Future holds the error)."""


@dataclasses.dataclass(frozen=True)
class EngineResult:
    """One request's answer: ``logits [C]`` float32, the argmax ``label`` (and its name when the
    model config has one), the 1-based ``exit_layer`` (L: the teacher) and the ``uncertainty``
    (by the model's exit criterion) of the classifier that answered."""

    label: int
    label_name: str | None
    logits: torch.Tensor
    exit_layer: int
    uncertainty: float


@dataclasses.dataclass(frozen=True)
class _Request:
    """A request accepted by :meth:`Engine.submit`, waiting for the worker to embed it."""

    future: concurrent.futures.Future
    ids: torch.Tensor  # [S] int64
    token_type_ids: torch.Tensor | None  # [S] int64, for sentence pairs
    speed: float
    deadline: float | None  # time.monotonic() after which it fails with TimeoutError
    serial: int
    submitted: float  # time.monotonic() at submit


@dataclasses.dataclass
class _Row:
    """A request in flight: its hidden states at its own length ``[L, H]`` and its bookkeeping
    (its depth is the queue that holds it)."""

    future: concurrent.futures.Future
    hidden: torch.Tensor
    speed: float
    deadline: float | None
    serial: int
    submitted: float = 0.0  # time.monotonic() at submit: the aging bound counts from it
    started: float | None = None  # time.monotonic() at its first layer call
    streak: tuple[int, int] = (-1, 0)  # patience state: the last student's argmax, agreeing confident students


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started: answers, failures, per depth the layer calls made and the
    rows they ran, and the latencies (submit to answer, seconds) of the last 10,000 answers."""

    completed: int = 0
    failed: int = 0
    layer_calls: list[int] = dataclasses.field(default_factory=list)
    layer_rows: list[int] = dataclasses.field(default_factory=list)
    latencies: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10_000))
    started: float = dataclasses.field(default_factory=time.monotonic)

    def mean_fill(self, max_batch: int) -> float:
        calls = sum(self.layer_calls)
        return sum(self.layer_rows) / (calls * max_batch) if calls else 0.0

    def summary(self, max_batch: int) -> dict:
        """What a metrics endpoint reports: throughput, fill per depth, latency percentiles (ms)."""
        # deque.copy() runs in C under the GIL: safe while the worker appends (iteration is not).
        latencies = sorted(self.latencies.copy())

        def percentile(q: float) -> float | None:
            return 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

        return {
            "completed": self.completed,
            "failed": self.failed,
            "throughput_per_s": self.completed / max(1e-9, time.monotonic() - self.started),
            "batch_fill_per_depth": [
                rows / (calls * max_batch) if calls else None
                for calls, rows in zip(self.layer_calls, self.layer_rows, strict=True)
            ],
            "latency_ms": {"p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)},
        }


POLICIES = ("fullest", "deepest", "oldest")


def _check_seconds(value, name: str) -> float | None:
    """None, or a positive finite number of seconds; else the error that says so."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _check_count(value, name: str, minimum: int = 1) -> int:
    """An integer (not a bool) of at least ``minimum``; else the error that says so."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def _pick_depth(
    rows_by_depth: list[list[_Row]],
    now: float,
    max_wait: float,
    policy: str = "fullest",
    max_batch: int = 64,
    merge_gap: int = 0,
) -> int:
    """The depth to run next. Whatever the policy, the depth of the oldest request submitted more
    than ``max_wait`` seconds before ``now`` comes first. Then ``fullest``: the depth with the most
    waiting rows, ties to the deepest (full calls, and the deeper rows are the closest to
    answering); ``deepest``: the deepest depth with rows (drain first: lowest latency for rows in
    flight, emptier calls); ``oldest``: the depth of the oldest request (first come, first served).

    Merging (``fullest`` with ``merge_gap`` > 0): if a shallower depth at most ``merge_gap``
    layers behind the fullest holds rows that fit beside the fullest's in one call, it runs first
    so that the two groups merge. Its calls are made either way; run first, they let every layer
    after the merge run once for both groups, where running the fullest first would push the
    two groups further apart and make each of the remaining layers run twice, half full."""
    overdue = [
        (row.serial, d) for d, rows in enumerate(rows_by_depth) for row in rows if now - row.submitted >= max_wait
    ]
    if overdue:
        return min(overdue)[1]
    occupied = [d for d, rows in enumerate(rows_by_depth) if rows]
    if policy == "deepest":
        return occupied[-1]
    if policy == "oldest":
        return min(occupied, key=lambda d: min(row.serial for row in rows_by_depth[d]))
    fullest = max(occupied, key=lambda d: (len(rows_by_depth[d]), d))
    for behind in range(fullest - 1, max(-1, fullest - 1 - merge_gap), -1):
        if rows_by_depth[behind] and len(rows_by_depth[behind]) + len(rows_by_depth[fullest]) <= max_batch:
            return behind
    return fullest


def _group_by_length(rows: list[_Row], max_batch: int, max_tokens: int) -> list[_Row]:
    """The rows of one layer call: the oldest, then those whose lengths are closest to it, while
    the call holds at most ``max_batch`` rows and ``max_tokens`` = rows x longest length (the
    oldest row always runs: the engine refuses budgets below its ``max_length``)."""
    length = lambda row: row.hidden.shape[0]  # noqa: E731
    if len(rows) <= max_batch and len(rows) * max(map(length, rows)) <= max_tokens:
        return list(rows)
    oldest = min(rows, key=lambda row: row.serial)
    chosen, longest = [], 0
    for row in sorted(rows, key=lambda row: (abs(length(row) - length(oldest)), row.serial)):
        if len(chosen) == max_batch:
            break
        if (len(chosen) + 1) * max(longest, length(row)) > max_tokens:
            continue  # a longer row would overflow the budget; a shorter one further on may fit
        chosen.append(row)
        longest = max(longest, length(row))
    return chosen


class Engine:
    """Depth-pooled continuous batching over a patched model, on one worker thread.

    Args:
        model: a patched model (:func:`fastbert_kernels.patch`), in eval mode.
        tokenizer: turns text requests into ids (optional: requests may be token id lists).
        max_batch: the most rows a layer call runs.
        max_batch_tokens: the most tokens (rows x padded length) a layer call runs; at least
            ``max_length``. Text Embeddings Inference's default, 16,384.
        max_in_flight: the most requests the engine holds; :meth:`submit` then blocks (or raises
            :class:`EngineFullError` with ``block=False`` or after its ``timeout``).
        max_wait: seconds after its submission past which a request's depth is served first
            (the aging bound of the policy).
        max_length: the most tokens of a request (default and ceiling: the model's position
            limit); longer texts are truncated, or refused with ``truncate=False``.
        policy: which depth runs next (:func:`_pick_depth`): ``fullest`` (default), ``deepest``
            or ``oldest``.
        merge_gap: with ``fullest``, a group at most this many layers behind the fullest depth
            catches up first when the two fit in one call (0, the default: never).
        require_trained_students: refuse (rather than warn about) requests at speed > 0 while
            the students were never distilled (the server sets it).
        observer: an :class:`EngineObserver` told of every layer call and answer (metrics).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_batch: int = 64,
        max_batch_tokens: int = 16_384,
        max_in_flight: int = 1024,
        max_wait: float = 0.1,
        max_length: int | None = None,
        policy: str = "fullest",
        merge_gap: int = 0,
        require_trained_students: bool = False,
        observer: EngineObserver | None = None,
    ) -> None:
        if not is_patched(model):
            raise ValueError("the engine needs a patched model: call fastbert_kernels.patch(model) first")
        _check_count(max_batch, "max_batch")
        _check_count(max_batch_tokens, "max_batch_tokens")
        _check_count(max_in_flight, "max_in_flight")
        _check_count(merge_gap, "merge_gap", minimum=0)
        if max_length is not None:
            _check_count(max_length, "max_length")
        self.max_wait = _check_seconds(max_wait, "max_wait")
        if self.max_wait is None:
            raise ValueError("max_wait must be a positive number of seconds")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.merge_gap = policy, merge_gap
        self.require_trained_students = require_trained_students
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_batch_tokens, self.max_in_flight = max_batch, max_batch_tokens, max_in_flight
        self.arch = architecture_for(model)
        self.layers = self.arch.layers(model)
        self.limit = self.arch.max_length(model.config)
        self.max_length = min(max_length or self.limit, self.limit)
        if max_batch_tokens < self.max_length:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must hold one request of max_length ({self.max_length}) tokens"
            )
        self.device = model_device(model)
        self.observer = observer
        self.stats = EngineStats(layer_calls=[0] * len(self.layers), layer_rows=[0] * len(self.layers))
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Condition()
        self._incoming: list[_Request] = []
        self._rows: list[list[_Row]] = [[] for _ in self.layers]
        self._serial = itertools.count()
        self._in_flight = 0  # accepted and not done; under self._lock
        self._closed = False
        self._abort: BaseException | None = None  # set by abort(): fail what is held, keep running
        self._failure: BaseException | None = None
        self._worker = threading.Thread(target=self._serve, name="fastbert-engine", daemon=True)
        self._worker.start()

    # ---- client side -----------------------------------------------------------------------

    def submit(
        self,
        request: str | tuple[str, str] | Sequence[int] | torch.Tensor,
        *,
        speed: float | None = None,
        timeout: float | None = None,
        block: bool = True,
        wait: float | None = None,
        truncate: bool = True,
    ) -> concurrent.futures.Future:
        """Queues one request (a text, a ``(text, text_pair)`` sentence pair, or token ids ``[S]``);
        returns a Future of :class:`EngineResult`. ``speed`` defaults to the model's; ``timeout``
        (seconds) fails the request with :class:`TimeoutError` if it has not finished by then. A
        text longer than ``max_length`` tokens is truncated, or with ``truncate=False`` refused
        (:class:`InputTooLongError`). A bad request gets a Future that already holds its error; it
        never reaches the model. When the engine is full the call waits (at most ``wait``
        seconds) or, with ``block=False``, raises."""
        # The call's own arguments first: a bad one raises here, before any slot is taken.
        timeout = _check_seconds(timeout, "timeout")
        wait = _check_seconds(wait, "wait")
        if not isinstance(block, bool):
            raise TypeError(f"block must be True or False, got {block!r}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be True or False, got {truncate!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            ids, token_type_ids = self._encode(request, truncate)
            speed = check_speed(fastbert_config(self.model).exit_rule.speed if speed is None else speed)
            check_students_trained(self.model, speed, refuse=self.require_trained_students)
        except (TypeError, ValueError) as err:
            future.set_exception(err)
            return future
        if self._failure is not None:
            raise EngineClosedError(f"the engine stopped after an error in its worker: {self._failure!r}")
        if self._closed:
            raise EngineClosedError("the engine is closed")
        if not self._slots.acquire(blocking=block, timeout=wait if block else None):
            raise EngineFullError("the engine holds its maximum of in-flight requests; retry later")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                self._slots.release()
                raise EngineClosedError("the engine is closed")
            self._in_flight += 1
            future.add_done_callback(self._release)
            now = time.monotonic()
            self._incoming.append(_Request(future, ids, token_type_ids, speed, deadline, next(self._serial), now))
            self._lock.notify()
        return future

    def _release(self, _future) -> None:
        with self._lock:
            self._in_flight -= 1
        self._slots.release()

    def classify(
        self, requests: Sequence[str | tuple[str, str] | Sequence[int]], speed: float | None = None
    ) -> list[EngineResult]:
        """Submits every request and waits for all; raises the first failure."""
        futures = [self.submit(r, speed=speed) for r in requests]
        return [f.result() for f in futures]

    async def aclassify(
        self, request: str | tuple[str, str] | Sequence[int], speed: float | None = None
    ) -> EngineResult:
        """The asyncio form of ``submit(...).result()``; cancelling the task cancels the request.
        It never blocks the event loop: when the engine is full, the wait for a slot runs in a
        thread."""
        try:
            future = self.submit(request, speed=speed, block=False)
        except EngineFullError:
            future = await asyncio.to_thread(self.submit, request, speed=speed)
        return await asyncio.wrap_future(future)

    @property
    def healthy(self) -> bool:
        """False once the worker stopped on an error it could not contain (then :attr:`failure`)."""
        return self._failure is None and (self._worker.is_alive() or self._closed)

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet done (answered, failed or cancelled)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Rows waiting for a layer call, at any depth (the rows of the call running excluded)."""
        # Read without the lock: len() of a list the worker appends to is atomic under the GIL,
        # and a metric may be a step stale.
        return len(self._incoming) + sum(len(rows) for rows in list(self._rows))

    def abort(self, error: BaseException) -> None:
        """Fails every request the engine holds with ``error`` once the layer call running now
        ends (that call's rows included); the engine stays usable (see :meth:`close`)."""
        with self._lock:
            self._abort = error
            self._lock.notify()

    def close(self, timeout: float | None = None) -> None:
        """Takes no new requests, finishes every accepted one, stops the worker. With ``timeout``
        (seconds), the requests still held after it fail with :class:`EngineClosedError`: every
        Future is done when this returns, none is left waiting."""
        timeout = _check_seconds(timeout, "timeout")
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._worker.join(timeout)
        if self._worker.is_alive():
            self.abort(EngineClosedError(f"the engine closed before this request finished (it waited {timeout} s)"))
            self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self, request, truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids ``[S]`` int64 of one request and its token type ids (sentence pairs, when the
        tokenizer makes them), or the error that names what is wrong."""
        if isinstance(request, str) or _is_pair(request):
            return self._tokenize(request, truncate)
        if isinstance(request, torch.Tensor):
            if request.dim() != 1 or request.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"token ids must be an integer tensor [S], got {request.dtype} {tuple(request.shape)}")
            ids = request.to(torch.int64).cpu()
        elif (
            isinstance(request, Sequence)
            and not isinstance(request, (bytes, bytearray))  # a Sequence of ints, but not token ids
            and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in request)
        ):
            ids = torch.tensor([int(i) for i in request], dtype=torch.int64)
        else:
            kind = type(request).__name__
            raise TypeError(f"a request is a text, a (text, text_pair) tuple or a sequence of token ids, got {kind}")
        if ids.numel() == 0:
            raise ValueError("empty request: no tokens")
        if ids.numel() > self.max_length:
            # Token ids are never truncated: the cut would drop the final [SEP] the model expects.
            raise InputTooLongError(f"the request has {ids.numel()} tokens; {self._limit_words()}")
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return ids, None

    def _limit_words(self) -> str:
        if self.max_length == self.limit:
            return f"the model's position limit is {self.limit}"
        return f"the engine's max_length is {self.max_length} (the model's position limit {self.limit})"

    def _tokenize(self, request: str | tuple[str, str], truncate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.tokenizer is None:
            raise TypeError("text requests need a tokenizer: Engine(model, tokenizer)")
        texts = (request,) if isinstance(request, str) else tuple(request)
        if not all(text.strip() for text in texts):
            raise ValueError("empty request: the text has no characters")
        encoded = self.tokenizer(*texts, truncation=truncate, max_length=self.max_length if truncate else None)
        ids = encoded["input_ids"]
        if len(ids) > self.max_length:
            raise InputTooLongError(f"the text has {len(ids)} tokens; {self._limit_words()} (truncation would cut it)")
        types = encoded.get("token_type_ids")
        return torch.tensor(ids, dtype=torch.int64), None if types is None else torch.tensor(types, dtype=torch.int64)

    # ---- worker side -----------------------------------------------------------------------

    def _serve(self) -> None:
        """The worker. An ``Exception`` in a step fails only that step's rows (:meth:`_step`);
        anything else (``KeyboardInterrupt``, ``SystemExit``, a ``BaseException`` from a layer)
        fails every request the engine holds with that error, and marks the engine unhealthy:
        no future is ever left waiting."""
        try:
            self._serve_forever()
        except BaseException as err:
            with self._lock:
                self._failure = err
            self._fail_held(EngineClosedError(f"the engine's worker stopped: {err!r}"))

    def _fail_held(self, error: BaseException) -> None:
        """Fails every request the engine holds (queued or between layers) with ``error``."""
        with self._lock:
            pending = [request.future for request in self._incoming] + [
                row.future for rows in self._rows for row in rows
            ]
            self._incoming, self._rows = [], [[] for _ in self.layers]
        for future in pending:
            if future.cancelled():
                future.set_running_or_notify_cancel()
        self._fail([f for f in pending if not f.done()], error)

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                while not self._incoming and not any(self._rows) and not self._closed and self._abort is None:
                    self._lock.wait()
                abort, self._abort = self._abort, None
                if abort is None:
                    if self._closed and not self._incoming and not any(self._rows):
                        return
                    incoming, self._incoming = self._incoming, []
            if abort is not None:
                self._fail_held(abort)
                continue
            with torch.no_grad():
                self._admit(incoming)
                self._expire()
                if any(self._rows):
                    self._step()

    def _admit(self, incoming: list[_Request]) -> None:
        for request in incoming:
            # Futures stay pending until answered, so that a client can cancel one in flight;
            # a cancelled one is dropped and its waiters told (concurrent.futures' contract).
            if request.future.cancelled():
                request.future.set_running_or_notify_cancel()
                continue
            try:
                types = None if request.token_type_ids is None else request.token_type_ids[None].to(self.device)
                inputs = embed(self.model, self.arch, request.ids[None].to(self.device), None, types)
                hidden = inputs.hidden[0]
            except Exception as err:  # a request's own failure is its answer
                self._fail([request.future], err)
                continue
            self._rows[0].append(
                _Row(
                    request.future, hidden, request.speed, request.deadline, request.serial, submitted=request.submitted
                )
            )

    def _expire(self) -> None:
        now = time.monotonic()
        for depth, rows in enumerate(self._rows):
            keep = []
            for row in rows:
                if row.future.cancelled():
                    row.future.set_running_or_notify_cancel()  # wakes concurrent.futures.wait
                    continue
                if row.deadline is not None and now > row.deadline:
                    self._fail([row.future], TimeoutError("the request did not finish within its timeout"))
                    continue
                keep.append(row)
            self._rows[depth] = keep

    def _step(self) -> None:
        depth = _pick_depth(self._rows, time.monotonic(), self.max_wait, self.policy, self.max_batch, self.merge_gap)
        chosen = _group_by_length(self._rows[depth], self.max_batch, self.max_batch_tokens)
        chosen_ids = {id(row) for row in chosen}
        self._rows[depth] = [row for row in self._rows[depth] if id(row) not in chosen_ids]
        try:
            self._run(depth, chosen)
        except Exception as err:  # fail the rows of this call, keep serving
            self._fail([row.future for row in chosen], err)
        except BaseException:  # the worker stops (see _serve); this call's rows are not queued any more
            self._rows[depth].extend(row for row in chosen if not row.future.done())
            raise

    def _run(self, depth: int, rows: list[_Row]) -> None:
        lengths = [row.hidden.shape[0] for row in rows]
        longest = max(lengths)
        hidden = rows[0].hidden.new_zeros(len(rows), longest, rows[0].hidden.shape[1])
        mask = torch.zeros(len(rows), longest, dtype=torch.int64, device=self.device)
        for i, row in enumerate(rows):
            hidden[i, : lengths[i]] = row.hidden
            mask[i, : lengths[i]] = 1
        padded = min(lengths) < longest
        context = layer_context(self.model, self.arch, hidden, mask, padded)
        now = time.monotonic()
        for row in rows:
            if row.started is None:
                row.started = now
        hidden = self.arch.run(self.model, depth, self.layers[depth], hidden, context)
        self.stats.layer_calls[depth] += 1
        self.stats.layer_rows[depth] += len(rows)
        if self.observer is not None:
            self.observer.layer_call(depth + 1, len(rows), len(rows) * longest)
        last = depth == len(self.layers) - 1
        rule = fastbert_config(self.model).exit_rule
        streaks = None
        if last:
            logits = teacher_logits(self.model, self.arch, hidden, mask).float()
            uncertainty = criterion_uncertainty(logits, rule.criterion, rule.temperature)
            exits = torch.ones(len(rows), dtype=torch.bool)
        elif max(row.speed for row in rows) == 0.0 or not rule.evaluates(depth + 1):
            # Speed 0 computes no branch, nor does a student the rule leaves out, as in the model
            # (the rows' patience streaks pass it unchanged).
            logits = uncertainty = None
            exits = torch.zeros(len(rows), dtype=torch.bool)
        else:
            # The fused head measures the uncertainty; each row's own speed (and its patience
            # state, kept on the row) decides, exactly as the model's per-row speeds do.
            branch = branch_modules(self.model)[depth]
            logits, uncertainty, _, state = branch.exit_decision(hidden, mask, rule.replace(speed=1.0))
            speeds = torch.tensor([row.speed for row in rows], device=uncertainty.device)
            previous = torch.tensor([row.streak for row in rows], device=uncertainty.device)
            exits, streaks = update_streak(state[:, 0], uncertainty, speeds, rule.patience, previous)
            streaks = streaks.tolist()
        if logits is not None:
            logits, uncertainty = logits.cpu(), uncertainty.cpu()
        for i, (row, leaves) in enumerate(zip(rows, exits.cpu().tolist(), strict=True)):
            if leaves:
                self._complete(row, logits[i], depth + 1, float(uncertainty[i]))
            elif not row.future.cancelled():
                row.hidden = hidden[i, : lengths[i]].clone()
                if streaks is not None:
                    row.streak = tuple(streaks[i])
                self._rows[depth + 1].append(row)

    def _complete(self, row: _Row, logits: torch.Tensor, exit_layer: int, uncertainty: float) -> None:
        label = int(logits.argmax())
        names = getattr(self.model.config, "id2label", None) or {}
        result = EngineResult(label, names.get(label), logits.clone(), exit_layer, uncertainty)
        try:
            row.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            return  # cancelled by its client meanwhile
        now = time.monotonic()
        self.stats.completed += 1
        self.stats.latencies.append(now - row.submitted)
        if self.observer is not None:
            self.observer.answered(exit_layer, now - row.submitted, (row.started or now) - row.submitted)

    def _fail(self, futures: list[concurrent.futures.Future], err: BaseException) -> None:
        for future in futures:
            try:
                future.set_exception(err)
            except concurrent.futures.InvalidStateError:
                continue  # cancelled by its client meanwhile
            self.stats.failed += 1
            if self.observer is not None:
                self.observer.failed()


def _is_pair(request) -> bool:
    return isinstance(request, tuple) and len(request) == 2 and all(isinstance(text, str) for text in request)
