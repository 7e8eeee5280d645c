"""``python -m fastbert_kernels serve CHECKPOINT``: the serving engine over HTTP (Starlette on
uvicorn, the ``serve`` extra). Binds to 127.0.0.1 unless told otherwise.

* ``POST /classify`` with ``{"text": "..."}`` or ``{"texts": ["...", ...]}`` and optionally
  ``"speed"``: ``{"results": [{"label", "label_name", "scores", "exit_layer", "uncertainty"}]}``,
  in request order. Bad bodies get a 4xx with a message that names the problem; a body over the
  size limit gets 413 before it is read; a full engine gets 503.
* ``GET /health``: ``{"status": "ok"}``.
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


def parse_body(body: bytes) -> tuple[list[str], float | None]:
    """The texts and the speed of a ``/classify`` body, or :class:`BadRequest`."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the body must be a JSON object: {"text": "..."} or {"texts": [...]}')
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
        try:
            texts, speed = parse_body(await read_limited(request))
            futures = [engine.submit(text, speed=speed, block=False) for text in texts]
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except EngineFullError as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        except EngineClosedError as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except (TypeError, ValueError) as err:  # a text the engine refused (empty, too long)
            return JSONResponse({"error": str(err)}, status_code=422)
        return JSONResponse({"results": [_result_json(r) for r in results]})

    async def health(_):
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
    from .loading import load_for_cli

    model, tokenizer = load_for_cli(checkpoint)
    with Engine(model, tokenizer, max_batch=max_batch) as engine:
        uvicorn.run(create_app(engine, max_body_bytes), host=host, port=port, log_level="info")
    return 0
