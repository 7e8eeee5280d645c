"""``python -m fastbert_kernels serve CHECKPOINT``: the application on uvicorn, with a graceful
drain. Binds to 127.0.0.1 unless told otherwise.

The drain, on SIGTERM or SIGINT (:class:`DrainingServer`):

1. The listening socket closes (new connections are refused, so a load balancer moves on),
   ``/health`` answers 503 ``draining``, and a request arriving on a kept-alive connection gets 503
   with ``Connection: close``.
2. Every request already accepted runs to its answer.
3. Past ``drain_timeout`` seconds the engine fails the texts it still holds, and their requests
   are answered 503 with an error that says so: never a reset connection.
4. The process exits with status 0 once no request is open (at most a few seconds past the
   timeout). A second SIGINT forces the exit at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from ..architectures import architecture_for
from ..serialization import load_checkpoint
from ..serving import Engine, EngineClosedError
from .app import DrainState, ServerSettings, create_app
from .metrics import ServerMetrics

logger = logging.getLogger("fastbert_kernels.server")

DEFAULT_DRAIN_TIMEOUT = 20.0  # seconds; under Kubernetes' default 30 s termination grace period
#: After the drain timeout, how long the 503s of the abandoned requests get to be written.
ANSWER_GRACE = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above in place of its own shutdown on a signal (which
    closes connections whose request is not parsed yet and re-raises the signal, exit -15)."""

    def __init__(self, config, engine: Engine, drain: DrainState, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain, self.drain_timeout = engine, drain, drain_timeout
        self._signal: int | None = None
        self._deadline: float | None = None
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags; on_tick (the event loop, every 0.1 s) acts on them.
        if self._signal is not None and sig == signal.SIGINT:
            logger.warning("second interrupt: exiting without finishing the drain")
            self.force_exit = self.should_exit = True
        self._signal = sig

    def begin_drain(self) -> None:
        """Stops accepting and starts the clock (what a signal does; callable directly)."""
        if self.drain.draining:
            return
        self.drain.draining = True
        self._deadline = time.monotonic() + self.drain_timeout
        for server in getattr(self, "servers", []):
            server.close()  # no new connections; the open ones carry on
        logger.info(
            "draining: %d requests open, %d texts in the engine; at most %.1f s",
            self.drain.open_requests,
            self.engine.in_flight,
            self.drain_timeout,
        )

    async def on_tick(self, counter: int) -> bool:
        if self._signal is not None and not self.drain.draining:
            self.begin_drain()
        if self.drain.draining and not self.should_exit:
            self.should_exit = self._drained()
        return await super().on_tick(counter)

    def _drained(self) -> bool:
        now = time.monotonic()
        if self.drain.open_requests == 0 and self.engine.in_flight == 0:
            logger.info("drained: every accepted request was answered")
            return True
        if self._aborted_at is None and now >= self._deadline:
            logger.warning("drain timeout: failing %d texts still in the engine with 503", self.engine.in_flight)
            self.engine.abort(
                EngineClosedError(f"the server shut down: its drain timeout ({self.drain_timeout:g} s) passed")
            )
            self._aborted_at = now
        if self._aborted_at is not None and now >= self._aborted_at + ANSWER_GRACE:
            logger.error("%d requests still open after the drain timeout; closing them", self.drain.open_requests)
            return True
        return False


def build(checkpoint: str, settings: ServerSettings, drain: DrainState | None = None, **engine_options):
    """A checkpoint's engine (students required to be trained) with the server's metrics as its
    observer, and the application over it: ``(engine, app)``. ``engine_options`` go to
    :class:`~fastbert_kernels.serving.Engine` (``max_batch``, ``max_batch_tokens``, ...)."""
    model, tokenizer = load_checkpoint(checkpoint)
    options = {"max_batch": 64, "max_batch_tokens": 16_384, **engine_options}
    metrics = ServerMetrics(
        len(architecture_for(model).layers(model)), options["max_batch"], options["max_batch_tokens"]
    )
    engine = Engine(model, tokenizer, require_trained_students=True, observer=metrics, **options)
    return engine, create_app(engine, settings, metrics=metrics, drain=drain)


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_batch: int = 64,
    max_batch_tokens: int = 16_384,
    max_concurrent_requests: int = 512,
    max_client_batch_size: int = 32,
    max_input_length: int | None = None,
    max_body_bytes: int = 1 << 20,
    max_wait: float = 0.1,
    auto_truncate: bool = False,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    log_level: str = "info",
) -> int:
    """Loads a FastBERT checkpoint and serves it until a signal, then drains (above); returns 0."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        model_id=str(checkpoint),
        max_body_bytes=max_body_bytes,
        max_client_batch_size=max_client_batch_size,
        auto_truncate=auto_truncate,
    )
    drain = DrainState()
    engine, app = build(
        checkpoint,
        settings,
        drain,
        max_batch=max_batch,
        max_batch_tokens=max_batch_tokens,
        max_in_flight=max_concurrent_requests,
        max_length=max_input_length,
        max_wait=max_wait,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=ANSWER_GRACE
    )
    try:
        DrainingServer(config, engine, drain, drain_timeout).run()
    finally:
        engine.close(timeout=ANSWER_GRACE)
    return 0
