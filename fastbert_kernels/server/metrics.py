"""Prometheus metrics of the server and its engine (``prometheus-client``, text format on
``GET /metrics``), in a registry of their own so that several servers can live in one process.

=======================================  =========  ===========================================
name                                      type       what
=======================================  =========  ===========================================
``fastbert_requests_total``               counter    HTTP requests by ``route`` and ``status``
``fastbert_request_errors_total``         counter    those answered >= 400, by ``route``, ``status``
``fastbert_request_duration_seconds``     histogram  HTTP request time, by ``route``
``fastbert_queue_duration_seconds``       histogram  per text: submit to its first layer call
``fastbert_inference_duration_seconds``   histogram  per text: submit to answer
``fastbert_in_flight_requests``           gauge      HTTP requests being answered
``fastbert_in_flight_rows``               gauge      texts the engine holds
``fastbert_queued_rows``                  gauge      texts waiting for a layer call
``fastbert_batch_rows``                   histogram  rows per layer call, by ``layer``
``fastbert_batch_tokens``                 histogram  rows x padded length per call, by ``layer``
``fastbert_batch_fill``                   histogram  rows / max_batch per call, by ``layer``
``fastbert_exit_layer``                   histogram  the layer that answered each text
``fastbert_failed_rows_total``            counter    texts that failed in the engine
``fastbert_model_info``                   gauge      1, labelled with model, rule and version
=======================================  =========  ===========================================

The exit-layer histogram is the speed-up the traffic gets: with L layers and a mean exit layer
m = ``sum / count``, the encoder runs about L / m times fewer layers than the full model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..serving import Engine
from ..state import fastbert_config

#: Seconds: from 1 ms to 10 s, enough resolution around a CPU encoder's 10-500 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _powers_of_two(top: int) -> tuple[float, ...]:
    buckets, value = [], 1
    while value < top:
        buckets.append(float(value))
        value *= 2
    return (*buckets, float(top))


class ServerMetrics:
    """The metrics of one server; it is the engine's :class:`~fastbert_kernels.serving.EngineObserver`.

    Build it before the engine (``Engine(..., observer=metrics)``), then :meth:`bind` the engine so
    that the gauges read its queues at scrape time."""

    def __init__(self, num_layers: int, max_batch: int, max_batch_tokens: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_batch = max_batch
        r = self.registry
        self.requests = Counter("fastbert_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.errors = Counter(
            "fastbert_request_errors", "HTTP requests answered >= 400", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "fastbert_request_duration_seconds", "HTTP request time", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "fastbert_queue_duration_seconds",
            "per text: submit to first layer call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "fastbert_inference_duration_seconds", "per text: submit to answer", buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight_requests = Gauge("fastbert_in_flight_requests", "HTTP requests being answered", registry=r)
        self.in_flight_rows = Gauge("fastbert_in_flight_rows", "texts the engine holds", registry=r)
        self.queued_rows = Gauge("fastbert_queued_rows", "texts waiting for a layer call", registry=r)
        self.batch_rows = Histogram(
            "fastbert_batch_rows", "rows per layer call", ["layer"], buckets=_powers_of_two(max_batch), registry=r
        )
        self.batch_tokens = Histogram(
            "fastbert_batch_tokens",
            "rows x padded length per layer call",
            ["layer"],
            buckets=_powers_of_two(max_batch_tokens),
            registry=r,
        )
        self.batch_fill = Histogram(
            "fastbert_batch_fill", "rows / max_batch per layer call", ["layer"], buckets=FILL_BUCKETS, registry=r
        )
        self.exit_layer = Histogram(
            "fastbert_exit_layer",
            "the 1-based layer whose classifier answered each text",
            buckets=tuple(float(layer) for layer in range(1, num_layers + 1)),
            registry=r,
        )
        self.failed_rows = Counter("fastbert_failed_rows", "texts that failed in the engine", registry=r)
        self.model_info = Gauge(
            "fastbert_model_info",
            "the served model",
            ["model_id", "model_type", "criterion", "speed", "version"],
            registry=r,
        )

    def bind(self, engine: Engine, model_id: str, model_type: str, version: str) -> None:
        """Reads the engine's queues at scrape time and publishes what is served."""
        self.in_flight_rows.set_function(lambda: engine.in_flight)
        self.queued_rows.set_function(lambda: engine.queued)
        rule = fastbert_config(engine.model).exit_rule
        self.model_info.labels(model_id, model_type, rule.criterion, f"{rule.speed:g}", version).set(1)

    # ---- EngineObserver (called on the engine's worker thread) ----------------------------------

    def layer_call(self, layer: int, rows: int, tokens: int) -> None:
        label = str(layer)
        self.batch_rows.labels(label).observe(rows)
        self.batch_tokens.labels(label).observe(tokens)
        self.batch_fill.labels(label).observe(rows / self.max_batch)

    def answered(self, exit_layer: int, latency: float, queued: float) -> None:
        self.exit_layer.observe(exit_layer)
        self.inference_seconds.observe(latency)
        self.queue_seconds.observe(queued)

    def failed(self) -> None:
        self.failed_rows.inc()

    # ---- HTTP side ------------------------------------------------------------------------------

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
