"""Publishing events: a small Python API for applications and the produce command.

>>> with Producer(Settings().kafka) as producer:
...     event_id = producer.send_text("hello world", metadata={"lang": "en"})
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from embedstream import envelope
from embedstream.errors import Backpressure, DeliveryFailed, EnvelopeError, SourceError
from embedstream.sections import KafkaSettings
from embedstream.sources.registry import kafka_client

log = logging.getLogger(__name__)


class Producer:
    """Sends envelopes to the modality topics. Thread-safe; call :meth:`close` (or use ``with``).

    The Kafka client library is ``settings.kafka_client``'s
    (:mod:`embedstream.sources.registry`). ``topics`` are created when missing
    (default: the modality topics). ``buffer_bytes`` bounds the bytes sent but
    not yet confirmed by the broker: :meth:`publish` raises :class:`Backpressure`
    rather than queue past it (kafka-python 3's own buffer is unbounded).
    ``connect_timeout_s`` bounds how long the constructor waits for the broker.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        create_topics: bool = True,
        topics: list[str] | None = None,
        buffer_bytes: int | None = None,
        connect_timeout_s: float = 30.0,
        max_block_s: float = 60.0,
    ) -> None:
        self.settings = settings
        client = kafka_client(settings.kafka_client)
        if create_topics:
            client.ensure_topics(settings, topics or [settings.topic_for(m)
                                                      for m in ("text", "image", "audio")])
        self._sender = client.sender(settings, connect_timeout_s=connect_timeout_s,
                                     max_block_s=max_block_s)
        self.failed = 0
        self._buffer_bytes = buffer_bytes
        self._pending = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_text(
        self,
        text: str,
        *,
        id: str | None = None,
        model: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Queue one text event; return its id. Delivery is confirmed by :meth:`flush`."""
        event_id = id or uuid.uuid4().hex
        value = envelope.encode(event_id, text=text, model=model, metadata=metadata)
        self.send_raw(self.settings.topic_text, event_id, value)
        return event_id

    def send_file(
        self,
        modality: Literal["image", "audio"],
        *,
        data: bytes | None = None,
        uri: str | None = None,
        form: Literal["inline", "raw"] = "inline",
        content_type: str = "application/octet-stream",
        id: str | None = None,
        model: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Queue one image or audio event; return its id.

        ``data`` travels inline (``form="inline"``: base64 in the JSON
        envelope; ``form="raw"``: the record value is the file, id, model and
        metadata in headers); ``uri`` sends a claim check instead.
        """
        event_id = id or uuid.uuid4().hex
        topic = self.settings.topic_for(modality)
        if uri is not None:
            self.send_raw(topic, event_id, envelope.encode(event_id, uri=uri, model=model,
                                                          metadata=metadata))
        elif data is None:
            raise ValueError("send_file needs data or uri")
        elif form == "raw":
            headers = [(envelope.HEADER_CONTENT_TYPE, content_type.encode()),
                       (envelope.HEADER_ID, event_id.encode())]
            if model:
                headers.append((envelope.HEADER_MODEL, model.encode()))
            if metadata:
                headers.append((envelope.HEADER_METADATA, json.dumps(metadata).encode()))
            self.send_raw(topic, event_id, data, headers)
        else:
            encoded = base64.b64encode(data).decode("ascii")
            self.send_raw(topic, event_id, envelope.encode(
                event_id, data_b64=encoded, model=model, metadata=metadata))
        return event_id

    def send_raw(
        self, topic: str, key: str | None, value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue an already-encoded record (the escape hatch for any envelope)."""
        self._sender.send(topic, key.encode() if key else None, value, headers) \
            .add_done_callback(self._count_failure)

    def send_tombstone(self, topic: str, event_id: str) -> None:
        """Queue a tombstone (key = the id, null value): delete every chunk of ``event_id``
        for every model served for ``topic``."""
        self._sender.send(topic, event_id.encode(), None).add_done_callback(self._count_failure)

    def publish(
        self,
        topic: str,
        records: Sequence[tuple[str | None, bytes | None]],
        *,
        timeout_s: float,
        retry_after_s: float = 1.0,
        headers: Sequence[list[tuple[str, bytes]]] | None = None,
    ) -> None:
        """Send ``(key, value)`` records (a ``None`` value is a tombstone) and wait until the
        broker confirmed all of them. ``headers``: each record's, in order.

        Raises :class:`Backpressure` when the buffer is full, the broker is
        unreachable or does not confirm within ``timeout_s`` (records already
        queued may still arrive: callers retry with the same ids, and writes are
        idempotent per id). Any other broker refusal is a :class:`SourceError`.
        """
        size = sum(len(value or b"") + len(key or "") for key, value in records)
        self._reserve(size, retry_after_s)
        futures: list[Future[None]] = []
        try:
            for index, (key, value) in enumerate(records):
                futures.append(self._sender.send(topic, key.encode() if key else None, value,
                                                 headers[index] if headers else None))
            deadline = time.monotonic() + timeout_s
            for future in futures:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as err:
            raise Backpressure(f"broker did not confirm the events within {timeout_s}s",
                               retry_after_s) from err
        except DeliveryFailed as err:
            if err.retriable:
                raise Backpressure(f"broker did not take the events: {err}", retry_after_s) from err
            raise SourceError(f"broker refused the events: {err}") from err
        finally:
            self._release(size, futures)

    def _reserve(self, size: int, retry_after_s: float) -> None:
        with self._lock:
            if self._buffer_bytes is not None and self._pending + size > self._buffer_bytes:
                raise Backpressure(
                    f"producer buffer full ({self._pending} of {self._buffer_bytes} bytes "
                    "await the broker)", retry_after_s,
                )
            self._pending += size

    def _release(self, size: int, futures: list[Future[None]]) -> None:
        """Free the reservation once every sent record is settled (now or later)."""
        remaining = [len(futures)]

        def settled(_: object = None) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0] <= 0:
                    self._pending -= size

        if not futures:
            remaining[0] = 1
            settled()
        for future in futures:
            future.add_done_callback(settled)

    @property
    def pending_bytes(self) -> int:
        """Bytes sent by :meth:`publish` and not yet confirmed or failed."""
        with self._lock:
            return self._pending

    def _count_failure(self, future: Future[None]) -> None:
        err = future.exception()
        if err is not None:
            with self._lock:
                self.failed += 1
            log.error("event not delivered: %s", err)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued event is settled (SourceError if some are not in time)."""
        self._sender.flush(timeout_s)

    def close(self) -> None:
        self._sender.close(30.0)


@dataclass(frozen=True, slots=True)
class TextLine:
    """One event to produce, read from a file."""

    id: str | None
    value: bytes


def read_text_events(stream: IO[str]) -> Iterator[TextLine]:
    """Plain lines (one text each) or JSONL envelopes, mixed freely; blank lines skipped.

    A line that starts with ``{`` must be a valid envelope object; a line
    that is not is an error naming its line number (nothing is half-sent
    silently).
    """
    for number, line in enumerate(stream, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            try:
                body = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise EnvelopeError("invalid_json", f"line {number}: {err.msg}") from err
            if not isinstance(body, dict):
                raise EnvelopeError("not_an_object", f"line {number}: not a JSON object")
            event_id = str(body["id"]) if body.get("id") is not None else uuid.uuid4().hex
            body["id"] = event_id
            yield TextLine(event_id, json.dumps(body, ensure_ascii=False).encode("utf-8"))
        else:
            event_id = uuid.uuid4().hex
            yield TextLine(event_id, envelope.encode(event_id, text=stripped))


def produce_lines(producer: Producer, lines: Iterable[TextLine], progress: Any = None) -> int:
    """Send every line to the text topic; return how many were queued."""
    sent = 0
    for line in lines:
        producer.send_raw(producer.settings.topic_text, line.id, line.value)
        sent += 1
        if progress is not None:
            progress.update(1)
    producer.flush()
    return sent


# File suffixes the produce command picks up in directories, per modality.
FILE_SUFFIXES = {
    "image": {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
              ".webp": "image/webp", ".gif": "image/gif"},
    "audio": {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg",
              ".oga": "audio/ogg", ".opus": "audio/ogg", ".mp3": "audio/mpeg"},
}


def find_files(paths: Iterable[str | Path], modality: str) -> list[Path]:
    """Files named, and files of the modality's suffixes under directories named (recursive)."""
    suffixes = FILE_SUFFIXES[modality]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in suffixes))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


def file_event_id(path: Path) -> str:
    """A stable id for a file: its name, made plain, and a hash of its absolute path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:48] or "file"
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def produce_files(
    producer: Producer,
    modality: Literal["image", "audio"],
    files: Iterable[Path],
    *,
    form: Literal["inline", "raw", "uri"] = "inline",
    model: str | None = None,
    progress: Any = None,
) -> list[str]:
    """Send one event per file; return their ids. ``form="uri"`` sends file:// claim checks."""
    ids = []
    for path in files:
        metadata = {"path": str(path)}
        event_id = file_event_id(path)
        if form == "uri":
            producer.send_file(modality, uri=path.resolve().as_uri(), id=event_id, model=model,
                               metadata=metadata)
        else:
            producer.send_file(
                modality, data=path.read_bytes(), form=form, id=event_id, model=model,
                metadata=metadata,
                content_type=FILE_SUFFIXES[modality].get(path.suffix.lower(),
                                                         "application/octet-stream"),
            )
        ids.append(event_id)
        if progress is not None:
            progress.update(1)
    producer.flush()
    return ids
