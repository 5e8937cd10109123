"""The worker's logic with in-memory source, sink and dead letters and a fake model.

The tokenizer is a real ``tokenizers`` WordLevel model; the backend is a fake
that derives a vector from the token ids and fails on the token ``poison``
(``tests/support/pipeline.py``).
"""

from __future__ import annotations

import threading
import time

from embedstream.envelope import RawRecord, encode
from embedstream.metrics import Metrics
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings
from embedstream.testing import MemoryDeadLetters, MemorySink, MemorySource
from embedstream.worker.pipeline import Worker
from support.pipeline import DIM, FakeBackend, counter, make_worker, run_until, text_records


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
    worker, source, sink, _ = make_worker(model, text_records(["w1 " * 20, "w2"]),
                                          text_overflow="truncate")
    run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 2)
    assert counter(worker.metrics, "embedstream_events_truncated_total", model="fake") == 1
    assert len(sink.stored) == 2


def test_nothing_is_committed_while_the_store_is_down(model):
    worker, source, sink, _ = make_worker(model, text_records(["w1", "w2"]), commit_interval_ms=0)
    sink.fail_next = 3
    commits: list[tuple[dict, int]] = []  # each commit, with the successful writes before it
    commit = source.commit
    source.commit = lambda offsets: (commits.append((dict(offsets), sink.writes)),  # type: ignore[method-assign]
                                     commit(offsets))[1]
    run_until(worker, lambda: source.committed.get(("embedstream.text", 0)) == 2)
    assert sink.writes >= 1 and len(sink.stored) == 2
    assert counter(worker.metrics, "embedstream_sink_retries_total") == 3
    assert commits, "nothing was committed at all"
    assert all(writes >= 1 for _, writes in commits), "committed while every write had failed"


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
    assert t0 not in worker.committer.committable()  # and forgotten afterwards


def test_a_partition_given_back_by_a_rebalance_keeps_its_events_in_flight_tracked(model):
    """kafka-python keeps the fetch position of a partition assigned again to the same
    consumer: events polled before the revoke do not come again, so the worker must
    not forget them, and no commit may pass one that is not stored yet."""
    t0 = ("embedstream.text", 0)
    real = model.backend.embed
    model.backend.embed = lambda inputs: (time.sleep(0.05), real(inputs))[1]
    worker, source, sink, _ = make_worker(model, text_records([f"w{i}" for i in range(12)]),
                                          commit_interval_ms=0)
    source.given_back = {t0}
    stored_at_commit: list[tuple[int, set[int]]] = []
    commit = source.commit
    source.commit = lambda offsets: (  # type: ignore[method-assign]
        stored_at_commit.append((offsets.get(t0, 0), {int(k[1][3:]) for k in sink.stored})),
        commit(offsets))[1]

    revoked_with = []

    def revoke_mid_way() -> bool:
        if sink.stored and not revoked_with:
            revoked_with.append(len(sink.stored))
            source.revoke_next = {t0}
        return source.committed.get(t0) == 12

    code = run_until(worker, revoke_mid_way)
    assert code == 0 and len(sink.stored) == 12
    assert revoked_with and revoked_with[0] < 12  # the revoke came with events in flight
    assert source.committed.get(t0) == 12  # still tracked, so still committed at the end
    for offset, stored in stored_at_commit:
        assert set(range(offset)) <= stored, f"committed {offset} with only {sorted(stored)} stored"


def test_a_dead_stage_stops_the_worker_with_an_error(model):
    worker, source, _, _ = make_worker(model, text_records(["w1"]))

    def broken_stage(result):
        raise RuntimeError("bug in the sink stage itself")

    worker.sink_stage.store = broken_stage  # type: ignore[method-assign]
    code = run_until(worker, lambda: not worker.healthy(), timeout=5)
    assert code == 1
    assert source.committed == {}


def test_a_queued_text_backlog_is_sorted_as_one_window(model):
    """Polls queued behind the one taken merge up to ``batch_sort_window`` records;
    a non-text poll or the stop marker ends the merge and comes next, not lost."""
    from embedstream.worker.items import STOP

    worker, *_ = make_worker(model, [], batch_sort_window=6)
    pre = worker.pre
    texts = text_records(["w1", "w2", "w3"] * 3)
    image_poll = [RawRecord("embedstream.image", 0, 0, None, b"{}", 0)]
    for poll in (texts[0:3], texts[3:6], texts[6:9], image_poll, texts[0:3]):
        pre.submit(poll)
    pre.finish()

    assert [r.offset for r in pre.next_records(0.1)] == [0, 1, 2, 3, 4, 5]  # window full
    assert [r.offset for r in pre.next_records(0.1)] == [6, 7, 8]  # image poll stops it
    assert pre.next_records(0.1) == image_poll  # never merged
    assert len(pre.next_records(0.1)) == 3  # stop marker held back
    assert pre.next_records(0.1) is STOP
    assert pre.next_records(0.01) is None


def test_queued_audio_polls_merge_into_a_window_of_a_few_batches(model):
    """Audio polls (a few large clips each) merge with queued audio polls, up to four
    batches' worth of records; a text poll ends the merge and is not lost."""
    worker, *_ = make_worker(model, [], batch_max_items=2)  # window: 4 x 2 = 8 records
    pre = worker.pre
    pre.modality_of["embedstream.audio"] = "audio"
    clips = [RawRecord("embedstream.audio", 0, i, None, b"{}", 0) for i in range(12)]
    texts = text_records(["w1"])
    for poll in (clips[0:3], clips[3:6], clips[6:9], texts, clips[9:12]):
        pre.submit(poll)

    assert [r.offset for r in pre.next_records(0.1)] == list(range(9))  # window reached
    assert pre.next_records(0.1) == texts
    assert [r.offset for r in pre.next_records(0.1)] == [9, 10, 11]


def test_a_full_poll_waits_briefly_for_the_backlog_behind_it(model):
    """A full poll means a backlog: the next one is awaited (up to the max wait) and
    merged; a poll that is not full is a light load and waits for nothing."""
    worker, *_ = make_worker(model, [], batch_sort_window=100, max_poll_records=3,
                             batch_max_wait_ms=6000)
    pre = worker.pre
    texts = text_records(["w1"] * 8)
    pre.submit(texts[0:3])  # full
    late = threading.Timer(0.2, pre.submit, args=(texts[3:5],))
    late.start()
    started = time.monotonic()
    merged = pre.next_records(0.1)
    assert [r.offset for r in merged] == [0, 1, 2, 3, 4]  # the late poll was awaited
    assert time.monotonic() - started < 3  # and, not full, ended the wait (of 6 s)

    pre.submit(texts[5:7])  # not full: a light load
    started = time.monotonic()
    assert [r.offset for r in pre.next_records(0.1)] == [5, 6]
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

    def factory(listener):
        holder["source"] = MemorySource(records, listener)
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


def test_crashed_pool_processes_restart_after_a_doubling_delay():
    """A child that keeps crashing waits 1, 2, 4 ... seconds (capped) before its restart;
    one that ran for a minute starts over at 1 s; children count separately."""
    from embedstream.worker.service import RestartBackoff

    backoff = RestartBackoff(max_s=10)
    assert [backoff.after_crash(0, lived_s=2) for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff.after_crash(1, lived_s=2) == 1
    assert backoff.after_crash(0, lived_s=120) == 1
    assert backoff.after_crash(0, lived_s=2) == 2


def test_queued_records_of_partitions_that_went_elsewhere_are_dropped(model):
    """Records of a lost partition still queued for the pre stage are its new owner's:
    dropped here (no wasted work, no death counted against nobody); others stay."""
    worker, *_ = make_worker(model, [])
    pre = worker.pre
    p0, p1 = text_records(["w1", "w2"], partition=0), text_records(["w3"], partition=1)
    pre.submit(p0 + p1)
    pre.submit(text_records(["w4"], partition=0, start=2), alone=True)
    assert pre.drop({("embedstream.text", 0)}) == 3
    remaining = pre.next_records(0.1)
    assert [(r.partition, r.offset) for r in remaining] == [(1, 0)]
    assert pre.next_records(0.01) is None  # the alone-submission of partition 0 is gone
