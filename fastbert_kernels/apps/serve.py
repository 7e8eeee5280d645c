"""``python -m fastbert_kernels serve CHECKPOINT``: the serving engine over HTTP (Starlette on
uvicorn, the ``serve`` extra). Binds to 127.0.0.1 unless told otherwise.

* ``POST /classify`` with ``{"text": "..."}`` or ``{"texts": ["...", ...]}`` and optionally
  ``"speed"``: ``{"results": [{"label", "label_name", "scores", "exit_layer", "uncertainty"}]}``,
  in request order. Bad bodies get a 4xx with a message that names the problem (unknown fields,
  wrong types, JSON nested deeper than 32 levels included); a body over the size limit gets 413
  before it is read; a full engine gets 503, and the texts of that request already queued are
  cancelled, as are those of a client that hangs up.
* ``GET /health``: ``{"status": "ok"}``, or 503 ``{"status": "unhealthy", "error"}`` once the
  engine's worker stopped on an error.
* ``GET /metrics``: throughput, batch fill per depth, latency percentiles (:meth:`EngineStats.summary`).
"""

from __future__ import annotations

import asyncio
import json

import torch

from ..config import check_speed
from ..serving import Engine, EngineClosedError, EngineFullError, EngineResult

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_TEXTS_PER_REQUEST = 256


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _result_json(result: EngineResult) -> dict:
    return {
        "label": result.label,
        "label_name": result.label_name,
        "scores": torch.softmax(result.logits, dim=-1).tolist(),
        "exit_layer": result.exit_layer,
        "uncertainty": result.uncertainty,
    }


MAX_JSON_DEPTH = 32
FIELDS = ("text", "texts", "speed")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), in one pass,
    so that a body nested thousands deep is refused before the parser recurses into it."""
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


def parse_body(body: bytes) -> tuple[list[str], float | None]:
    """The texts and the speed of a ``/classify`` body, or :class:`BadRequest`: unknown fields
    and wrong types are refused by name, and JSON nested deeper than :data:`MAX_JSON_DEPTH`."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(422, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise BadRequest(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the body must be a JSON object: {"text": "..."} or {"texts": [...]}')
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadRequest(422, f"unknown fields {unknown}; known: {', '.join(FIELDS)}")
    if ("text" in payload) == ("texts" in payload):
        raise BadRequest(422, 'give exactly one of "text" or "texts"')
    texts = [payload["text"]] if "text" in payload else payload["texts"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, '"text" must be a string and "texts" a non-empty list of strings')
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise BadRequest(413, f"at most {MAX_TEXTS_PER_REQUEST} texts per request, got {len(texts)}")
    speed = payload.get("speed")
    if speed is not None:
        try:
            speed = check_speed(speed)
        except (TypeError, ValueError) as err:
            raise BadRequest(422, str(err)) from err
    return texts, speed


def _cancel(futures) -> None:
    for future in futures:
        future.cancel()


async def _disconnect(request) -> None:
    """Returns when the client of ``request`` hangs up (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The Starlette application over ``engine``."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def read_limited(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise BadRequest(413, f"the body is over the {max_body_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise BadRequest(413, f"the body is over the {max_body_bytes}-byte limit")
        return bytes(body)

    async def classify(request):
        futures: list = []
        try:
            texts, speed = parse_body(await read_limited(request))
            for text in texts:
                futures.append(engine.submit(text, speed=speed, block=False))
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except (EngineFullError, EngineClosedError) as err:
            _cancel(futures)  # the client gets no answer: the texts already queued must not run
            return JSONResponse({"error": str(err)}, status_code=503)
        answers = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({answers, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not answers.done():  # the client hung up: drop its rows from the engine's queues
                _cancel(futures)
                answers.cancel()
                return JSONResponse({"error": "the client disconnected"}, status_code=499)
            results = answers.result()
        except (TypeError, ValueError) as err:  # a text the engine refused (empty, too long)
            return JSONResponse({"error": str(err)}, status_code=422)
        finally:
            disconnected.cancel()
        return JSONResponse({"results": [_result_json(r) for r in results]})

    async def health(_):
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy", "error": repr(engine.failure)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(_):
        return JSONResponse(engine.stats.summary(engine.max_batch))

    return Starlette(
        routes=[
            Route("/classify", classify, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


def serve(checkpoint: str, host: str, port: int, max_batch: int, max_body_bytes: int) -> int:
    """Loads a FastBERT checkpoint and serves it until interrupted; closing drains the engine."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("serve needs the serve extra: pip install 'fastbert_kernels[serve]'") from None
    from ..serialization import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    with Engine(model, tokenizer, max_batch=max_batch, require_trained_students=True) as engine:
        uvicorn.run(create_app(engine, max_body_bytes), host=host, port=port, log_level="info")
    return 0
