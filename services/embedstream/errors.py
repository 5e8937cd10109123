"""The exception hierarchy: one root, one subclass per package.

Callers catch :class:`EmbedstreamError` at entry points; code inside a package
raises that package's subclass and wraps foreign errors with ``raise ... from``.
"""

from __future__ import annotations


class EmbedstreamError(Exception):
    """Root of every error embedstream raises on purpose."""


class ConfigError(EmbedstreamError):
    """Settings or a model manifest are missing or inconsistent."""


class EnvelopeError(EmbedstreamError):
    """An event cannot be decoded. ``reason`` is a short, stable code.

    The reason goes into the dead-letter record's header and into the
    ``reason`` label of the failure counter, so the set of codes is small and
    fixed (see :data:`embedstream.envelope.REASONS`).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelError(EmbedstreamError):
    """A model cannot be found, loaded or run."""


class ExportError(EmbedstreamError):
    """A checkpoint cannot be exported to ONNX."""


class ModelUnavailable(ModelError):
    """The model fails on a known-good input too: the fault is the model's or the
    device's, not an event's. The worker stops (and is restarted) rather than
    dead-letter the events it holds."""


class SinkError(EmbedstreamError):
    """The store could not take a batch now (unreachable, busy, failing over):
    transient and about the world, never about one item. The caller retries the
    whole batch; versioned writes make the retry idempotent."""


class StoreUnavailable(SinkError):
    """The store does not answer (connection refused or timed out, or still loading
    its data set): a worker starting meanwhile waits for it rather than exit."""


class StoreFull(SinkError):
    """The store refused writes for lack of memory (``OOM`` under ``noeviction``).

    About the world, not the items: the worker pauses, reports not-ready and
    commits nothing until an operator makes room."""


class SourceError(EmbedstreamError):
    """The broker cannot be reached or refused an operation."""


class BrokerUnavailable(SourceError):
    """No broker answers: a worker starting meanwhile waits for one rather than exit."""


class DeliveryFailed(SourceError):
    """The broker did not take a record. ``retriable``: the cause may pass (a timeout, a
    leader moving, a full local queue), so sending again may succeed."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class Backpressure(SourceError):
    """The broker cannot take events now (producer buffer full, broker unreachable).

    Transient by nature: callers should retry after ``retry_after_s`` seconds
    (the gateway turns it into ``429`` with a ``Retry-After`` header).
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GatewayError(EmbedstreamError):
    """A request to the gateway cannot be served; ``status`` is the HTTP answer.

    ``code`` is a short, stable machine-readable reason (an envelope reason
    code for invalid events, e.g. ``invalid_json``; otherwise the gateway's own).
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class RateLimited(GatewayError):
    """A key spent its request budget: 429 with ``Retry-After`` (``retry_after_s``)."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(429, "rate_limited", detail)
        self.retry_after_s = retry_after_s


class Cancelled(EmbedstreamError):
    """A retry loop gave up because its caller is shutting down."""


class DevStackError(EmbedstreamError):
    """The embedded development stack failed to start or stop."""


class BenchError(EmbedstreamError):
    """The benchmark cannot run (a missing extra, a model, or a stage that stalled)."""
