"""Documents: chunking long texts, deleting, updating, with in-memory parts.

The fake model's limit is 6 tokens (``support.pipeline``); the chunker's
properties with the real MiniLM tokenizer are in ``test_chunking.py``.
"""

from __future__ import annotations

import time

from embedstream.envelope import RawRecord, encode
from embedstream.testing import MemoryResults
from support.pipeline import counter, make_worker, run_until

TP = ("embedstream.text", 0)
LONG = "w1 w2 w3. w4 w5 w6 w7 w8. w9 w10 w11 w12.\n\nw13 w14 w15 w16 w17 w18 w19 w20."


def record(offset: int, value: bytes | None, key: bytes | None = b"doc", ts: int | None = None):
    return RawRecord(TP[0], TP[1], offset, key, value, ts or int(time.time() * 1000))


def test_a_long_text_is_stored_as_chunks_that_reproduce_it(model):
    worker, source, sink, _ = make_worker(model, [record(0, encode("doc", text=LONG))])
    run_until(worker, lambda: source.committed.get(TP) == 1)
    doc = sink.stored[("fake", "doc")]
    parts = doc.parts()
    assert len(parts) > 1 and [c.index for c in parts] == list(range(len(parts)))
    for chunk in parts:
        text = LONG[chunk.start:chunk.end]
        assert text.strip() == text and len(text.split()) <= 6
    covered = {i for c in parts for i in range(c.start, c.end)}
    assert all(i in covered for i, ch in enumerate(LONG) if not ch.isspace())  # nothing lost
    assert counter(worker.metrics, "embedstream_chunks_stored_total", model="fake") == len(parts)
    assert counter(worker.metrics, "embedstream_events_truncated_total", model="fake") == 0


def test_truncate_and_reject_keep_their_meaning(model):
    for overflow, stored, letters in (("truncate", 1, 0), ("reject", 0, 1)):
        worker, source, sink, dlq = make_worker(model, [record(0, encode("doc", text=LONG))],
                                                text_overflow=overflow)
        run_until(worker, lambda source=source: source.committed.get(TP) == 1)
        assert len(sink.stored) == stored and len(dlq.letters) == letters
        if stored:
            assert len(sink.stored[("fake", "doc")].parts()) == 1


def test_a_tombstone_and_an_op_delete_remove_the_document_and_are_not_dead_letters(model):
    ts = int(time.time() * 1000)
    records = [record(0, encode("doc", text=LONG), ts=ts), record(1, None, ts=ts + 1),
               record(2, encode("other", text="w1 w2"), key=b"other", ts=ts + 2),
               record(3, encode("other", op="delete"), key=None, ts=ts + 3)]
    worker, source, sink, dlq = make_worker(model, records)
    worker.results = results = MemoryResults(sink)
    assert run_until(worker, lambda: source.committed.get(TP) == 4) == 0
    assert source.committed.get(TP) == 4
    assert sink.stored == {} and dlq.letters == []
    assert counter(worker.metrics, "embedstream_events_deleted_total", model="fake") == 2
    assert sorted(results.deleted) == [("fake", "doc"), ("fake", "other")]


def test_a_replayed_older_upsert_after_a_delete_stays_deleted(model):
    ts = int(time.time() * 1000)
    records = [record(0, None, ts=ts + 10),  # the delete (newer) is processed first
               record(1, encode("doc", text="w1 w2", version=ts), ts=ts)]
    worker, source, sink, _ = make_worker(model, records)
    run_until(worker, lambda: source.committed.get(TP) == 2)
    assert sink.stored == {}
    assert counter(worker.metrics, "embedstream_events_stale_total", model="fake") == 1


def test_a_newer_short_version_replaces_every_chunk(model):
    ts = int(time.time() * 1000)
    records = [record(0, encode("doc", text=LONG), ts=ts),
               record(1, encode("doc", text="w1 w2"), ts=ts + 1)]
    worker, source, sink, _ = make_worker(model, records)
    run_until(worker, lambda: source.committed.get(TP) == 2)
    parts = sink.stored[("fake", "doc")].parts()
    assert len(parts) == 1 and sink.stored[("fake", "doc")].event.text == "w1 w2"


def test_one_failing_chunk_fails_its_document_once_and_stores_none_of_it(model):
    text = "w1 w2 w3 w4 w5. w6 poison w8 w9 w10. w11 w12"
    worker, source, sink, dlq = make_worker(
        model, [record(0, encode("doc", text=text)), record(1, encode("ok", text="w1"), b"ok")])
    run_until(worker, lambda: source.committed.get(TP) == 2)
    assert list(sink.stored) == [("fake", "ok")]
    assert [(r.offset, reason) for r, reason, _ in dlq.letters] == [(0, "model_error")]
