"""The results stream: announced after the write, before the commit, retried."""

from __future__ import annotations

import json
import time

import numpy as np

from embedstream.envelope import Event
from embedstream.models.manifest import Manifest
from embedstream.sinks.base import Embedded
from embedstream.sinks.results import result_record
from embedstream.testing import MemoryResults
from support.pipeline import make_worker, run_until, text_records


def test_stored_events_are_announced_before_commit(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1", "w2", "w3"]))
    worker.results = results = MemoryResults(sink)
    results.fail_next = 2  # the results topic is away for a while: retried, commit waits
    # Each commit, with what had been announced when it was sent.
    commits: list[tuple[int, set[str]]] = []
    commit = source.commit

    def recording(offsets):
        commits.append((offsets.get(("embedstream.text", 0), 0),
                        {e for _, e in results.announced}))
        return commit(offsets)

    source.commit = recording  # type: ignore[method-assign]
    code = run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 3)
    assert code == 0
    assert sorted(results.announced) == [("fake", "p0-0"), ("fake", "p0-1"), ("fake", "p0-2")]
    assert commits and commits[-1][0] == 3
    for offset, announced in commits:  # every committed event was announced before
        assert {f"p0-{o}" for o in range(offset)} <= announced, (offset, announced)
    assert results.closed


def test_unannounced_batches_stay_uncommitted(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1"]))
    worker.settings = worker.settings.model_copy(update={"shutdown_timeout_s": 0.5})
    worker.results = results = MemoryResults(sink)
    results.fail_next = 10**6  # never comes back
    run_until(worker, lambda: bool(sink.stored), timeout=2)
    assert sink.stored and not results.announced
    assert source.committed == {}


def test_result_record_format(model):
    event = Event("doc-1", "text", None, "hi", {}, text_records(["w1"])[0])
    manifest: Manifest = model.manifest
    body = result_record(Embedded(event, manifest, np.ones(8, np.float32)), "es", 1.5, True)
    assert body == {
        "id": "doc-1", "model": "fake", "modality": "text", "dim": 8, "key": "es:fake:doc-1",
        "chunks": 1, "stored_at": 1.5, "source": "embedstream.text:0:0", "vector": [1.0] * 8,
    }
    assert "vector" not in result_record(Embedded(event, manifest, np.ones(8)), "es", 1.5, False)
    json.dumps(body)


def test_a_stale_write_is_committed_but_never_announced(model):
    # The delete (newer) reaches the store first; the older upsert of the same document
    # is then left out by the store, and the results stream must not say it was stored.
    from embedstream.envelope import RawRecord, encode

    now = int(time.time() * 1000)
    records = [RawRecord("embedstream.text", 0, 0, b"doc", None, now + 10),
               RawRecord("embedstream.text", 0, 1, b"doc", encode("doc", text="w1 w2"), now),
               RawRecord("embedstream.text", 0, 2, b"new", encode("new", text="w3"), now)]
    worker, source, sink, _ = make_worker(model, records)
    worker.results = results = MemoryResults(sink)
    assert run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 3) == 0
    assert ("fake", "doc") not in sink.stored
    assert results.deleted == [("fake", "doc")]
    assert results.announced == [("fake", "new")]
    assert worker.metrics.registry.get_sample_value(
        "embedstream_events_stale_total", {"model": "fake"}) == 1
