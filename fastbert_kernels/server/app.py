"""The FastAPI application over a :class:`~fastbert_kernels.serving.Engine`.

Routes (the OpenAPI document is at ``/openapi.json``, its pages at ``/docs``):

* ``POST /predict`` and ``POST /``: Hugging Face inference shapes (:mod:`.schemas`). One input is
  answered ``[{"label", "score"}, ...]``, best first; a list of inputs, one such list per input.
* ``POST /classify``: per text the label, the scores, the exit layer and the uncertainty, and the
  exit rule that answered; ``speed`` sets this request's exit threshold.
* ``GET /health``: 200 ``{"status": "ok"}``; 503 while draining or once the engine has failed.
* ``GET /info``: the model, its labels and layers, the exit rule and its certificate, the limits.
* ``GET /metrics``: Prometheus text format (:mod:`.metrics`).

Errors are ``{"error", "error_type"}`` with the status codes Text Embeddings Inference uses: 413 a
body, a batch or a text over its limit; 422 a body that does not validate; 429 the engine is full
(with ``Retry-After``); 503 draining or unhealthy; 500 a failure inside the model. Every answer
carries an ``X-Request-ID``: the client's, or one made here; the log names it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..exit_rule import check_speed
from ..serving import Engine, EngineClosedError, EngineFullError, EngineResult, InputTooLongError
from ..state import fastbert_config
from .metrics import ServerMetrics
from .schemas import (
    Classifier,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    Health,
    Info,
    LabelScore,
    ModelKind,
    PredictRequest,
    TextPair,
)

logger = logging.getLogger("fastbert_kernels.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Texts per request; Text Embeddings Inference's default ``--max-client-batch-size``.
DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
MAX_JSON_DEPTH = 32
ROUTES = ("/", "/predict", "/classify", "/health", "/info", "/metrics", "/openapi.json", "/docs")
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An answer other than 200: the status, the message and TEI's error type."""

    def __init__(self, status: int, message: str, error_type: str = "validation", headers: dict | None = None):
        super().__init__(message)
        self.status, self.error_type, self.headers = status, error_type, headers or {}

    def response(self) -> JSONResponse:
        return _error(self.status, str(self), self.error_type, self.headers)


def _error(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


@dataclasses.dataclass
class ServerSettings:
    """What the application enforces and reports, beside the engine's own limits."""

    model_id: str = "model"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE
    auto_truncate: bool = False


@dataclasses.dataclass
class DrainState:
    """``draining`` is set when the server begins to drain: new requests get 503, ``/health``
    says so. ``open_requests`` counts the HTTP requests being answered (the event loop's only)."""

    draining: bool = False
    open_requests: int = 0


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), in one pass,
    so that a body nested thousands deep is refused before a parser recurses into it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


class RequestContext:
    """Pure ASGI middleware around every HTTP request: the request id, the body limits (size
    before the body is read whole, JSON depth before it is parsed), refusal while draining, the
    in-flight gauge, the per-route metrics and the log line."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics, drain: DrainState) -> None:
        self.app, self.settings, self.metrics, self.drain = app, settings, metrics, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started, status = time.perf_counter(), 500
        logger.debug("accepted request_id=%s %s %s", request_id, scope["method"], scope["path"])

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if self.drain.draining:
                    extra.append((b"connection", b"close"))  # a keep-alive client must reconnect elsewhere
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        self.metrics.in_flight_requests.inc()
        self.drain.open_requests += 1
        try:
            if scope["method"] == "POST":
                if self.drain.draining:
                    error = ApiError(503, "the server is shutting down; retry on another replica", "unhealthy")
                    return await error.response()(scope, receive, send_with_id)
                try:
                    receive = await self._buffered_body(headers, receive)
                except ApiError as error:
                    return await error.response()(scope, receive, send_with_id)
            await self.app(scope, receive, send_with_id)
        finally:
            self.drain.open_requests -= 1
            self.metrics.in_flight_requests.dec()
            seconds = time.perf_counter() - started
            self.metrics.request_done(route, status, seconds)
            logger.info("request_id=%s route=%s status=%d ms=%.1f", request_id, scope["path"], status, 1e3 * seconds)

    async def _buffered_body(self, headers: dict, receive) -> Callable[[], Awaitable[dict]]:
        """Reads the body (refusing it past the byte limit as soon as it is), checks its depth,
        and returns a ``receive`` that replays it, then passes on (a hang-up included)."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body is over the {limit}-byte limit")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(499, "the client disconnected")
            body += message.get("body", b"")
            if len(body) > limit:
                raise ApiError(413, f"the body is over the {limit}-byte limit")
            if not message.get("more_body", False):
                break
        if json_depth(body) > MAX_JSON_DEPTH:
            raise ApiError(422, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay


async def _disconnect(request: Request) -> None:
    """Returns when the client of ``request`` hangs up (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _flatten(inputs) -> tuple[list[str | tuple[str, str]], bool]:
    """The engine requests of ``inputs`` and whether it was a single input (answered unnested)."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, TextPair):
        return [(inputs.text, inputs.text_pair)], True
    requests = [(item.text, item.text_pair) if isinstance(item, TextPair) else item for item in inputs]
    return [tuple(item) if isinstance(item, (list, tuple)) else item for item in requests], False


def _scores(logits: torch.Tensor, function: str) -> torch.Tensor:
    if function == "softmax":
        return torch.softmax(logits, dim=-1)
    if function == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _answer_error(err: BaseException, request_id: str) -> ApiError:
    """The HTTP answer to a text the engine failed."""
    if isinstance(err, InputTooLongError):
        return ApiError(413, str(err))
    if isinstance(err, (TypeError, ValueError)):  # a text the engine refused (empty, bad pair)
        return ApiError(422, str(err), "empty" if "empty" in str(err) else "validation")
    if isinstance(err, (EngineClosedError, TimeoutError)):
        return ApiError(503, str(err), "unhealthy")
    # A failure inside the model: the request's own 500.
    logger.error("request_id=%s failed in the model", request_id, exc_info=err)
    return ApiError(500, f"the model failed: {err!r}", "backend")


def _pick(explicit: bool | None, spelled_elsewhere: bool | None, name: str, default: bool) -> bool:
    if explicit is not None and spelled_elsewhere is not None and explicit != spelled_elsewhere:
        raise ApiError(422, f"{name} is given twice with different values")
    chosen = explicit if explicit is not None else spelled_elsewhere
    return default if chosen is None else chosen


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    *,
    metrics: ServerMetrics | None = None,
    drain: DrainState | None = None,
) -> FastAPI:
    """The application over ``engine``. Without ``metrics`` it makes them and, if the engine has no
    observer yet, makes them the engine's observer."""
    settings = settings or ServerSettings()
    drain = drain or DrainState()
    model = engine.model
    num_layers = len(engine.layers)
    if metrics is None:
        metrics = ServerMetrics(num_layers, engine.max_batch, engine.max_batch_tokens)
        if engine.observer is None:
            engine.observer = metrics
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    metrics.bind(engine, settings.model_id, model_type, __version__)
    num_labels = int(model.config.num_labels)
    names = getattr(model.config, "id2label", None) or {}
    labels = [str(names.get(i, f"LABEL_{i}")) for i in range(num_labels)]

    app = FastAPI(
        title="fastbert_kernels",
        version=__version__,
        description="Early-exit BERT classification (FastBERT) behind Hugging Face inference shapes.",
    )

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid body"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid body")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {where!r}"
        elif where:
            message = f"{where}: {message}"
        return _error(422, message, "validation")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), "validation", getattr(error, "headers", None))

    async def run(request: Request, texts: list, speed: float | None, truncate: bool) -> list[EngineResult]:
        """Every text through the engine, in order, or the :class:`ApiError` that says why not;
        a client that hangs up has its texts dropped from the engine's queues."""
        if not texts:
            raise ApiError(422, "no inputs: give at least one text", "empty")
        if len(texts) > settings.max_client_batch_size:
            raise ApiError(413, f"at most {settings.max_client_batch_size} inputs per request, got {len(texts)}")
        futures = []
        try:
            for text in texts:
                futures.append(engine.submit(text, speed=speed, truncate=truncate, block=False))
        except EngineFullError as err:
            _cancel(futures)  # the client gets no answer: the texts already queued must not run
            raise ApiError(429, str(err), "overloaded", {"Retry-After": str(RETRY_AFTER_SECONDS)}) from err
        except EngineClosedError as err:
            _cancel(futures)
            raise ApiError(503, str(err), "unhealthy") from err
        answers = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({answers, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not answers.done():  # the client hung up: drop its rows from the engine's queues
                raise ApiError(499, "the client disconnected")
            if answers.exception() is not None:
                raise _answer_error(answers.exception(), request.state.request_id) from answers.exception()
            return answers.result()
        finally:
            disconnected.cancel()
            if not answers.done():
                answers.cancel()
            _cancel(futures)  # no-op for answered ones; the rest (an error, a hang-up) leave the queues

    error_responses = {code: {"model": ErrorResponse} for code in (413, 422, 429, 503)}

    async def predict(request: Request, payload: PredictRequest) -> Response:
        parameters = payload.parameters
        truncate = _pick(
            parameters.truncate if parameters else None, payload.truncate, "truncate", settings.auto_truncate
        )
        function = parameters.function_to_apply if parameters else None
        if payload.raw_scores and function not in (None, "none"):
            raise ApiError(422, f"raw_scores is true but function_to_apply is {function!r}")
        function = "none" if payload.raw_scores else function or "softmax"
        top_k = parameters.top_k if parameters and parameters.top_k else num_labels
        texts, single = _flatten(payload.inputs)
        results = await run(request, texts, None, truncate)
        answers = []
        for result in results:
            scores = _scores(result.logits, function)
            order = torch.argsort(scores, descending=True)[:top_k].tolist()
            answers.append([{"label": labels[i], "score": float(scores[i])} for i in order])
        return JSONResponse(answers[0] if single else answers)

    for path in ("/predict", "/"):
        app.post(
            path,
            response_model=list[LabelScore] | list[list[LabelScore]],
            responses=error_responses,
            summary="Classify: Hugging Face / TEI shapes",
        )(predict)

    @app.post(
        "/classify", response_model=ClassifyResponse, responses=error_responses, summary="Classify with exit details"
    )
    async def classify(request: Request, payload: ClassifyRequest) -> Response:
        given = [name for name in ("text", "texts", "inputs") if getattr(payload, name) is not None]
        if len(given) != 1:
            raise ApiError(422, 'give exactly one of "text", "texts" or "inputs"')
        if payload.text is not None:
            texts = [payload.text]
        elif payload.texts is not None:
            texts = payload.texts
        else:
            texts = _flatten(payload.inputs)[0]
        rule = fastbert_config(model).exit_rule
        try:
            speed = rule.speed if payload.speed is None else check_speed(payload.speed)
        except (TypeError, ValueError) as err:
            raise ApiError(422, str(err)) from err
        truncate = settings.auto_truncate if payload.truncate is None else payload.truncate
        results = await run(request, texts, speed, truncate)
        return JSONResponse(
            {
                "results": [
                    {
                        "label": r.label,
                        "label_name": r.label_name,
                        "scores": torch.softmax(r.logits, dim=-1).tolist(),
                        "exit_layer": r.exit_layer,
                        "uncertainty": r.uncertainty,
                    }
                    for r in results
                ],
                "rule": rule.replace(speed=speed).as_dict(),
            }
        )

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="Liveness and readiness")
    async def health() -> Response:
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy", "error": repr(engine.failure)}, status_code=503)
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/info", response_model=Info, summary="What is served, and the limits")
    async def info() -> Info:
        config = fastbert_config(model)
        classifier = Classifier(
            id2label={str(i): name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
        )
        return Info(
            model_id=settings.model_id,
            model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            model_type=ModelKind(classifier=classifier),
            max_concurrent_requests=engine.max_in_flight,
            max_input_length=engine.max_length,
            max_batch_tokens=engine.max_batch_tokens,
            max_batch_requests=engine.max_batch,
            max_client_batch_size=settings.max_client_batch_size,
            auto_truncate=settings.auto_truncate,
            version=__version__,
            architecture=model_type,
            labels=labels,
            num_layers=num_layers,
            exit_rule=config.exit_rule.as_dict(),
            certificate=config.certificate,
            quantization=config.quantization,
            max_body_bytes=settings.max_body_bytes,
            max_wait_ms=1e3 * engine.max_wait,
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestContext, settings=settings, metrics=metrics, drain=drain)
    return app


def _cancel(futures) -> None:
    for future in futures:
        future.cancel()
