"""embedstream: real-time embeddings of live data.

Producers publish text, image and audio events to Kafka; worker pools embed
them with ONNX Runtime in micro-batches and store the vectors in Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedstream.errors import EmbedstreamError

if TYPE_CHECKING:
    from embedstream.client import AsyncClient, Client

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "EmbedstreamError", "__version__"]


def __getattr__(name: str) -> Any:
    # The HTTP clients import httpx: load them only when asked for.
    if name in ("Client", "AsyncClient"):
        from embedstream import client

        return getattr(client, name)
    raise AttributeError(f"module 'embedstream' has no attribute {name!r}")
