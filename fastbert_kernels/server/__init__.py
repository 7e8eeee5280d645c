"""The HTTP server (the ``serve`` extra: FastAPI, uvicorn, prometheus-client).

* :func:`create_app`: the FastAPI application over a :class:`~fastbert_kernels.serving.Engine`
  (:mod:`.app`; request and response models in :mod:`.schemas`);
* :class:`ServerMetrics`: its Prometheus metrics, the engine's observer (:mod:`.metrics`);
* :func:`serve`: a checkpoint on uvicorn with a graceful drain on SIGTERM (:mod:`.run`);
* :mod:`.loadtest`: a load test against the real server process, a signal in the middle.
"""

from .app import DrainState, ServerSettings, create_app
from .metrics import ServerMetrics
from .run import DrainingServer, serve

__all__ = ["DrainState", "DrainingServer", "ServerMetrics", "ServerSettings", "create_app", "serve"]
