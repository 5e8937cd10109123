"""The HTTP gateway: ingest events, search embeddings, serve the search page.

``embedstream gateway`` runs :func:`run_gateway`; tests build the app with
:func:`embedstream.gateway.app.create_app` over in-memory or real parts.
Needs the ``gateway`` extra (FastAPI, uvicorn); never imports torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from embedstream.settings import Settings

if TYPE_CHECKING:
    from embedstream.gateway.query import Searcher

log = logging.getLogger(__name__)


def build_searcher(settings: Settings) -> Searcher | None:
    """Load the served models and connect to Redis (None when search is off)."""
    if not settings.gateway_search:
        return None
    from embedstream.gateway.query import Searcher
    from embedstream.runtime.loader import load_configured
    from embedstream.sinks.redis import connect

    models = load_configured(settings, settings.models, threads=settings.intra_op_threads or 1)
    return Searcher(settings, models, connect(settings.redis))


def run_gateway(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn drains open requests); return the exit code.

    Keys and exposure are checked first, so a gateway that may not start open
    says so at once, before loading any model.
    """
    import uvicorn

    from embedstream.gateway.app import create_app
    from embedstream.gateway.auth import Authenticator, check_exposure
    from embedstream.gateway.publisher import KafkaEventPublisher
    from embedstream.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    auth = Authenticator(settings.gateway, metrics)
    check_exposure(settings.gateway, auth)
    searcher = build_searcher(settings)
    app = create_app(settings, KafkaEventPublisher(settings.kafka, settings.gateway), searcher, metrics, auth)
    log.info("gateway on http://%s:%d (search %s, auth %s)", settings.gateway_host,
             settings.gateway_port, "on" if searcher else "off",
             f"on, {len(auth.store.entries())} keys" if auth.enabled else "off")
    config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port,
                            log_config=None, access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
    return 0
