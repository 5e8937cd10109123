"""The worker's logic with in-memory source, sink and dead letters and a fake model.

The tokenizer is a real ``tokenizers`` WordLevel model; the backend is a fake
that derives a vector from the token ids and fails on the token ``poison``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from embedstream.envelope import RawRecord, encode
from embedstream.errors import ModelError
from embedstream.metrics import Metrics
from embedstream.models.manifest import Manifest
from embedstream.runtime.loader import LoadedModel
from embedstream.runtime.text import TextPreprocessor
from embedstream.settings import Settings
from embedstream.testing import MemoryDeadLetters, MemorySink, MemorySource
from embedstream.worker.pipeline import Worker

WORDS = ["[PAD]", "[UNK]", "poison", *[f"w{i}" for i in range(50)]]
DIM = 8


class FakeBackend:
    provider = "FakeProvider"

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.calls += 1
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if (ids == WORDS.index("poison")).any():
            raise ModelError("poisoned input")
        out = np.zeros((ids.shape[0], DIM), np.float32)
        for row in range(ids.shape[0]):
            for tok in ids[row][mask[row] == 1]:
                out[row, tok % DIM] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def model(tmp_path: Path) -> LoadedModel:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    manifest = Manifest(
        name="fake", modality="text", dimension=DIM, pooling="mean", normalize=True,
        inputs=["input_ids", "attention_mask"], tokenizer_files=["tokenizer.json"],
        max_length=6, opset=17, sha256="-",
    )
    return LoadedModel(manifest, tmp_path, FakeBackend(), TextPreprocessor(manifest, tmp_path))


def text_records(texts: list[str], partition: int = 0, start: int = 0) -> list[RawRecord]:
    return [
        RawRecord("embedstream.text", partition, start + i, None,
                  encode(f"p{partition}-{start + i}", text=t), int(time.time() * 1000))
        for i, t in enumerate(texts)
    ]


def make_worker(model: LoadedModel, records: list[RawRecord], **overrides):
    settings = Settings(**{"batch_max_items": 4, "batch_max_wait_ms": 5, "shutdown_timeout_s": 5,
                           **overrides})
    sink, dlq = MemorySink(), MemoryDeadLetters()
    holder: dict[str, MemorySource] = {}

    def factory(on_revoked):
        holder["source"] = MemorySource(records, on_revoked)
        return holder["source"]

    worker = Worker(settings, {"fake": model}, factory, sink, dlq, Metrics())
    return worker, holder["source"], sink, dlq


def run_until(worker: Worker, condition, timeout: float = 10.0, stop_grace: float = 10.0) -> int:
    """Run the worker until ``condition`` holds (or ``timeout``), then stop it.

    ``stop_grace`` bounds how long stopping may take; it is generous because a
    loaded CI machine can stall a thread for a while, and the tests that care
    how fast a stop is measure it themselves."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()))
    thread.start()
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    thread.join(stop_grace)
    assert result, "worker did not stop"
    return result[0]


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_good_event_stored_bad_ones_dead_lettered_and_all_committed(model):
    good = text_records([f"w{i} w{i + 1}" for i in range(30)])
    bad = [
        RawRecord("embedstream.text", 0, 30, None, b"{nope", 0),
        RawRecord("embedstream.text", 0, 31, None, encode("x", text="w1", model="missing"), 0),
        RawRecord("embedstream.text", 0, 32, None, b'{"id": "e", "text": ""}', 0),
    ]
    worker, source, sink, dlq = make_worker(model, good + bad)
    code = run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 33)
    assert code == 0
    assert len(sink.stored) == 30
    assert sorted(reason for _, reason, _ in dlq.letters) == [
        "empty_text", "invalid_json", "unknown_model"
    ]
    stored = sink.stored[("fake", "p0-3")]
    assert stored.vector.shape == (DIM,)
    assert stored.event.text == "w3 w4"
    m = worker.metrics
    assert counter(m, "embedstream_events_embedded_total", model="fake") == 30
    assert counter(m, "embedstream_events_failed_total", reason="invalid_json") == 1
    assert counter(m, "embedstream_events_consumed_total", topic="embedstream.text") == 33
    assert source.closed and sink.closed


def test_one_bad_item_does_not_fail_its_batch(model):
    records = text_records(["w1", "w2 poison", "w3", "w4"])
    worker, source, sink, dlq = make_worker(model, records)
    run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 4)
    assert set(sink.stored) == {("fake", "p0-0"), ("fake", "p0-2"), ("fake", "p0-3")}
    assert [(r.offset, reason) for r, reason, _ in dlq.letters] == [(1, "model_error")]


def test_truncation_is_counted(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1 " * 20, "w2"]))
    run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 2)
    assert counter(worker.metrics, "embedstream_events_truncated_total", model="fake") == 1
    assert len(sink.stored) == 2


def test_nothing_is_committed_while_the_store_is_down(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1", "w2"]))
    sink.fail_next = 3
    run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 2)
    assert sink.writes >= 1 and len(sink.stored) == 2
    assert counter(worker.metrics, "embedstream_sink_retries_total") == 3


def test_shutdown_abandons_unstored_work_uncommitted(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1", "w2"]))
    sink.fail_next = 10**6  # Redis never comes back
    worker.settings = worker.settings.model_copy(update={"shutdown_timeout_s": 0.5})
    failing = lambda: counter(worker.metrics, "embedstream_sink_retries_total") >= 2  # noqa: E731
    started = time.monotonic()
    code = run_until(worker, failing, timeout=5.0)
    assert failing(), "the write never failed: the test did not reach the outage"
    assert code == 0
    # Without abandoning, the sink stage would retry forever and the worker never stop.
    assert time.monotonic() - started < 8
    assert source.committed == {} and sink.stored == {}


def test_a_revoke_commits_what_is_finished_and_forgets_the_rest(model):
    records = text_records(["w1", "w2", "w3"], partition=0) + text_records(["w4"], partition=1)
    worker, source, sink, _ = make_worker(model, records)
    t0, t1 = ("embedstream.text", 0), ("embedstream.text", 1)

    def revoke_when_t0_done() -> bool:
        if len(sink.stored) == 4 and not source.revoke_next:
            source.revoke_next = {t0}  # the next poll revokes it
            return True
        return False

    run_until(worker, lambda: revoke_when_t0_done() and source.committed.get(t1) == 1)
    assert source.committed.get(t0) == 3  # finished before the revoke: committed in it
    assert t0 not in worker._tracker.committable()  # and forgotten afterwards


def test_a_dead_stage_stops_the_worker_with_an_error(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1"]))

    def broken_write(results):
        raise RuntimeError("bug in the sink")

    sink.write = broken_write  # type: ignore[method-assign]
    code = run_until(worker, lambda: not worker.healthy(), timeout=5)
    assert code == 1
    assert source.committed == {}


def test_a_queued_text_backlog_is_sorted_as_one_window(model):
    """Polls queued behind the one taken merge up to ``batch_sort_window`` records;
    a non-text poll or the stop marker ends the merge and comes next, not lost."""
    from embedstream.worker.pipeline import _STOP

    worker, *_ = make_worker(model, [], batch_sort_window=6)
    texts = text_records(["w1", "w2", "w3"] * 3)
    image_poll = [RawRecord("embedstream.image", 0, 0, None, b"{}", 0)]
    for poll in (texts[0:3], texts[3:6], texts[6:9], image_poll, texts[0:3]):
        worker._records.put(poll)
    worker._records.put(_STOP)

    assert [r.offset for r in worker._next_records(0.1)] == [0, 1, 2, 3, 4, 5]  # window full
    assert [r.offset for r in worker._next_records(0.1)] == [6, 7, 8]  # image poll stops it
    assert worker._next_records(0.1) == image_poll  # never merged
    assert len(worker._next_records(0.1)) == 3  # stop marker held back
    assert worker._next_records(0.1) is _STOP
    assert worker._next_records(0.01) is None


def test_queued_audio_polls_merge_into_a_window_of_a_few_batches(model):
    """Audio polls (a few large clips each) merge with queued audio polls, up to four
    batches' worth of records; a text poll ends the merge and is not lost."""
    worker, *_ = make_worker(model, [], batch_max_items=2)  # window: 4 x 2 = 8 records
    worker.modality_of["embedstream.audio"] = "audio"
    clips = [RawRecord("embedstream.audio", 0, i, None, b"{}", 0) for i in range(12)]
    texts = text_records(["w1"])
    for poll in (clips[0:3], clips[3:6], clips[6:9], texts, clips[9:12]):
        worker._records.put(poll)

    assert [r.offset for r in worker._next_records(0.1)] == list(range(9))  # window reached
    assert worker._next_records(0.1) == texts
    assert [r.offset for r in worker._next_records(0.1)] == [9, 10, 11]


def test_a_full_poll_waits_briefly_for_the_backlog_behind_it(model):
    """A full poll means a backlog: the next one is awaited (up to the max wait) and
    merged; a poll that is not full is a light load and waits for nothing."""
    worker, *_ = make_worker(model, [], batch_sort_window=100, max_poll_records=3,
                             batch_max_wait_ms=6000)
    texts = text_records(["w1"] * 8)
    worker._records.put(texts[0:3])  # full
    late = threading.Timer(0.2, worker._records.put, args=(texts[3:5],))
    late.start()
    started = time.monotonic()
    merged = worker._next_records(0.1)
    assert [r.offset for r in merged] == [0, 1, 2, 3, 4]  # the late poll was awaited
    assert time.monotonic() - started < 3  # and, not full, ended the wait (of 6 s)

    worker._records.put(texts[5:7])  # not full: a light load
    started = time.monotonic()
    assert [r.offset for r in worker._next_records(0.1)] == [5, 6]
    assert time.monotonic() - started < 3  # returned without waiting out the 6 s


def test_warm_up_runs_the_largest_batch_the_budgets_allow(model):
    from embedstream.runtime.warmup import warm_up

    calls: list[tuple[int, ...]] = []
    backend = model.backend
    original = backend.embed

    def recording(inputs):
        calls.append(inputs["input_ids"].shape)
        return original(inputs)

    backend.embed = recording
    # The fake model's token limit is 6: 4 items fit 24 tokens, 3 fit 20.
    assert warm_up(model, max_items=4, max_tokens=100) == (4, 6)
    assert warm_up(model, max_items=4, max_tokens=20) == (3, 6)
    assert calls == [(4, 6), (3, 6)]


def test_model_instances_share_the_batches_and_stop_together(model, tmp_path):
    """inference_instances: each thread runs its own model instance; every event is
    stored once, both instances work, and the worker still drains and exits 0."""
    replica = LoadedModel(model.manifest, model.directory, FakeBackend(), model.preprocessor)
    records = text_records([f"w{i % 50} w{(i * 7) % 50}" for i in range(200)])
    settings = Settings(batch_max_items=4, batch_max_wait_ms=5, shutdown_timeout_s=5)
    sink, dlq = MemorySink(), MemoryDeadLetters()
    holder: dict[str, MemorySource] = {}

    def factory(on_revoked):
        holder["source"] = MemorySource(records, on_revoked)
        return holder["source"]

    slow = model.backend.embed
    model.backend.embed = lambda inputs: (time.sleep(0.002), slow(inputs))[1]
    worker = Worker(settings, {"fake": model}, factory, sink, dlq, Metrics(),
                    replicas=[{"fake": replica}])
    code = run_until(worker, lambda: holder["source"].committed.get(("embedstream.text", 0)) == 200)
    assert code == 0
    assert len(sink.stored) == 200
    assert model.backend.calls > 0 and replica.backend.calls > 0
    assert model.backend.calls + replica.backend.calls >= 200 // 4
    assert not any(t.is_alive() for t in worker._threads)


def test_auto_instances_are_two_on_a_multi_core_cpu_and_one_otherwise(monkeypatch):
    """inference_instances 0 (the default) picks 2 on CPU with 2+ threads, 1 on one
    thread or a GPU; a number set by the user always wins."""
    from embedstream.worker import service

    cpu = Settings(providers=["CPUExecutionProvider"])
    assert cpu.inference_instances == 0
    assert service.instances_per_process(cpu, threads=2) == 2
    assert service.instances_per_process(cpu, threads=8) == 2
    assert service.instances_per_process(cpu, threads=1) == 1
    assert service.instances_per_process(cpu.model_copy(update={"inference_instances": 3}),
                                         threads=1) == 3
    monkeypatch.setattr(service, "choose_providers", lambda requested: ["CUDAExecutionProvider"])
    assert service.instances_per_process(Settings(), threads=8) == 1
