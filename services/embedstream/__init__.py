"""embedstream: real-time embeddings of live data.

Producers publish text, image and audio events to Kafka; worker pools embed
them with ONNX Runtime in micro-batches and store the vectors in Redis.
"""

from embedstream.errors import EmbedstreamError

__version__ = "0.1.0"

__all__ = ["EmbedstreamError", "__version__"]
