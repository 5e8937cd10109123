"""Documents on the real broker, worker and Redis: chunking, updates, deletes, metadata.

The long document is real news text (gensim's Lee corpus: 25 articles, about
4,200 words) with a fact placed only in its last paragraph; fifty other
articles of the corpus stand beside it as distractors.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from e2e_support import MODEL, ThreadWorker, dead_letters, make_settings, stored_ids
from gensim.test.utils import datapath
from kafka import KafkaProducer

from embedstream.envelope import encode
from embedstream.runtime.loader import load_models
from embedstream.search import search_vector
from embedstream.sinks.layout import result_key, tombstone_key
from embedstream.sinks.redis import connect
from support.stack import wait_for

NEEDLE = ("In 1987 a volunteer named Marguerite Osei repainted the Pelican Point lighthouse "
          "in lime green, and the colour has stayed ever since.")
QUERY = "Who painted the lighthouse at Pelican Point green?"


@pytest.fixture(scope="module")
def articles() -> list[str]:
    with open(datapath("lee_background.cor"), encoding="utf-8") as corpus:
        return [line.strip() for line in corpus if line.strip()]


def produce(settings, records: list[tuple[bytes | None, bytes | None]], timestamp_ms=None,
            partition: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 << 20)
    for key, value in records:
        producer.send(settings.topic_text, key=key, value=value, partition=partition,
                      timestamp_ms=timestamp_ms)
    producer.flush()
    producer.close()


def keys_of(client, prefix: str, doc_id: str) -> set[str]:
    base = result_key(prefix, MODEL, doc_id)
    return {k.decode() for k in client.scan_iter(match=f"{base}*")} & (
        {base} | {f"{base}#{n}" for n in range(1, 200)})


def test_documents_are_chunked_found_by_their_last_paragraph_updated_and_deleted(
        stack, unique, model_root, articles):
    settings = make_settings(stack, unique, model_root)
    client = connect(settings.redis)
    model = load_models(model_root, [MODEL], providers=[], threads=1)[MODEL]
    long_text = "\n\n".join([*articles[:25], NEEDLE])
    worker = ThreadWorker(settings)
    try:
        produce(settings, [(b"long", encode("long", text=long_text)),
                           *((f"art-{i}".encode(), encode(f"art-{i}", text=articles[i]))
                             for i in range(25, 75))])
        chunks = len(model.preprocessor.chunk(long_text, 0, settings.chunk_overlap))  # type: ignore[attr-defined]
        assert chunks > 10
        assert wait_for(lambda: len(keys_of(client, unique, "long")) == chunks
                        and len(stored_ids(client, unique)) == 51, 120)

        # The fact in the last paragraph is the top hit; k means k documents.
        hits = search_vector(client, unique, MODEL, model.embed_texts([QUERY])[0], 5)
        assert hits[0].id == "long" and NEEDLE in hits[0].fields["text"]
        assert hits[0].chunk == chunks - 1 and hits[0].chunks == chunks
        assert len({h.id for h in hits}) == 5
        start, end = hits[0].span or (0, 0)
        assert long_text[start:end] == hits[0].fields["text"]
        every = search_vector(client, unique, MODEL, model.embed_texts([QUERY])[0], 20,
                              per_document=False)
        assert len(every) == 20 and len({h.id for h in every}) < 20  # chunks of "long" too
        # Truncated to its first window, the document would rank below distractors.
        truncated = model.embed_texts([long_text])[0] @ model.embed_texts([QUERY])[0]
        assert truncated < hits[4].score

        # A newer, short version replaces every chunk: exactly one key is left.
        produce(settings, [(b"long", encode("long", text="Now a short note."))])
        assert wait_for(lambda: keys_of(client, unique, "long") == {result_key(unique, MODEL,
                                                                                "long")}, 60)
        assert client.hget(result_key(unique, MODEL, "long"), "text") == b"Now a short note."

        # A tombstone and an op: delete each remove the document; neither is a dead letter.
        produce(settings, [(b"art-25", None), (None, encode("art-26", op="delete"))])
        assert wait_for(lambda: not keys_of(client, unique, "art-25")
                        and not keys_of(client, unique, "art-26"), 60)
        assert client.exists(tombstone_key(unique, MODEL, "art-25"))
        assert 0 < client.pttl(tombstone_key(unique, MODEL, "art-25")) \
            <= settings.tombstone_retention_s * 1000
        assert worker.value("embedstream_events_deleted_total", model=MODEL) == 2

        # A replay of an older upsert after the delete does not bring the document back.
        old = int(time.time() * 1000) - 3_600_000
        produce(settings, [(b"art-25", encode("art-25", text=articles[25]))], timestamp_ms=old)
        assert wait_for(lambda: worker.value("embedstream_events_stale_total", model=MODEL) >= 1)
        assert not keys_of(client, unique, "art-25")
        assert dead_letters(settings, 1) == []
    finally:
        assert worker.stop() == 0


def test_metadata_of_any_name_round_trips_to_search_results(stack, unique, model_root):
    metadata = {"source": "crm", "model": "not ours", "id": 7, "text": "theirs",
                "nested": {"a": [1, 2.5, None], "b": "é"}, "embedding": True}
    settings = make_settings(stack, unique, model_root, metadata_schema={"source": "tag"})
    client = connect(settings.redis)
    model = load_models(model_root, [MODEL], providers=[], threads=1)[MODEL]
    worker = ThreadWorker(settings)
    try:
        produce(settings, [(b"m1", encode("m1", text="A note about tide tables.", metadata=metadata)),
                           (b"m2", encode("m2", text="A note about tide tables.",
                                          metadata={"source": "web"}))])
        assert wait_for(lambda: client.exists(result_key(unique, MODEL, "m2"))
                        and client.exists(result_key(unique, MODEL, "m1")))
        from embedstream.search import TagFilter

        hits = search_vector(client, unique, MODEL, model.embed_texts(["tides"])[0], 5,
                             [TagFilter("source", ("crm",))])
        assert [h.id for h in hits] == ["m1"]
        assert hits[0].metadata == metadata  # names and JSON values as sent
        stored = client.hgetall(result_key(unique, MODEL, "m1"))
        assert stored[b"id"] == b"m1" and stored[b"model"] == MODEL.encode()  # system fields
        assert json.loads(stored[b"metadata"]) == metadata and stored[b"meta_id"] == b"7"
    finally:
        assert worker.stop() == 0


def test_a_compacted_topic_read_from_the_start_leaves_exactly_the_live_documents(
        stack, unique, model_root, articles):
    """The input topics may be compacted (key = id): what compaction keeps of a key is its
    latest record, an upsert or a tombstone (kept for delete.retention.ms). A consumer
    reading such a log from the start, or the whole history before compaction, ends with
    exactly the live documents. (The embedded broker does not compact: the test writes
    both logs itself.)"""
    history: list[tuple[bytes, bytes | None]] = []
    live: dict[str, str] = {}
    for i in range(30):
        key = f"doc-{i % 12}"
        if i % 5 == 4:
            history.append((key.encode(), None))
            live.pop(key, None)
        else:
            text = articles[i] if i % 7 else "\n\n".join(articles[i:i + 6])  # some chunked
            history.append((key.encode(), encode(key, text=text)))
            live[key] = text
    latest = {key: value for key, value in history}
    compacted = list(latest.items())
    for name, log in (("history", history), ("compacted", compacted)):
        _consume_log(stack, f"{unique}-{name}", model_root, log, live)


def _consume_log(stack, prefix: str, model_root, log, live: dict[str, str]) -> None:
    settings = make_settings(stack, prefix, model_root)
    client = connect(settings.redis)
    worker = ThreadWorker(settings)
    try:
        produce(settings, log)
        assert wait_for(lambda: worker.value("embedstream_events_consumed_total",
                                             topic=settings.topic_text) >= len(log), 120)
        assert wait_for(lambda: _matches(client, settings.key_prefix, live), 120), prefix
    finally:
        assert worker.stop() == 0


def _matches(client, prefix: str, live: dict[str, str]) -> bool:
    """Redis holds exactly the live documents: the same ids, and every chunk's text is
    its span of the document's live text (all chunks present: 0..chunks-1)."""
    chunks: dict[str, list[tuple[int, int, int, int, str]]] = {}
    for key in client.scan_iter(match=f"{prefix}:{MODEL}:*", count=1000):
        fields = client.hgetall(key)
        chunks.setdefault(fields[b"id"].decode(), []).append(
            (int(fields[b"chunk"]), int(fields[b"chunks"]), int(fields[b"start"]),
             int(fields[b"end"]), fields[b"text"].decode()))
    if set(chunks) != set(live):
        return False
    for doc_id, parts in chunks.items():
        parts.sort()
        if [p[0] for p in parts] != list(range(parts[0][1])):
            return False
        if any(live[doc_id][start:end] != text for _, _, start, end, text in parts):
            return False
    return True


def test_tombstones_delete_images_too(stack, unique, media_model_root):
    import base64
    import io

    from PIL import Image

    settings = make_settings(stack, unique, media_model_root, topic_image=f"{unique}.image",
                             models=["efficientnet-lite0"])
    client = connect(settings.redis)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, "PNG")
    key = result_key(unique, "efficientnet-lite0", "photo")
    worker = ThreadWorker(settings)
    try:
        producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
        producer.send(settings.topic_image, key=b"photo", value=json.dumps(
            {"id": "photo", "data": base64.b64encode(buffer.getvalue()).decode()}).encode())
        producer.flush()
        assert wait_for(lambda: client.exists(key), 60)
        producer.send(settings.topic_image, key=b"photo", value=None)
        producer.flush()
        producer.close()
        assert wait_for(lambda: not client.exists(key), 60)
        assert worker.value("embedstream_events_deleted_total", model="efficientnet-lite0") == 1
    finally:
        assert worker.stop() == 0
