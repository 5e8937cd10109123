"""Errors are data in every stage: one bad record is its own dead letter, never the pool's outage.

Each test feeds the worker (in-memory source, sink and dead letters; the fake
model of ``support.pipeline``) a record that fails in one stage in a way the
old worker did not survive, and checks that exactly that record is
dead-lettered with its reason while its neighbours are stored and committed.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from embedstream.envelope import RawRecord
from embedstream.errors import ModelError
from embedstream.preprocess.base import Prepared
from support.pipeline import counter, make_worker, run_until, text_records

TP = ("embedstream.text", 0)


def raw(offset: int, value: bytes) -> RawRecord:
    return RawRecord("embedstream.text", 0, offset, None, value, int(time.time() * 1000))


def reasons(dlq) -> dict[int, str]:
    return {record.offset: reason for record, reason, _ in dlq.letters}


def test_records_that_crashed_the_pre_stage_are_dead_lettered_alone(model):
    """Deep nesting (RecursionError in json.loads), a 5,000-digit number (ValueError) and a
    lone surrogate (which tokenizers refuses with a TypeError) used to kill the pre stage."""
    good = text_records(["w1 w2", "w3", "w4 w5"])
    bad = [
        raw(3, b'{"id": "deep", "text": "w1", "metadata": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"),
        raw(4, b'{"id": "big", "text": "w1", "version": ' + b"7" * 5000 + b"}"),
        raw(5, b'{"id": "lone", "text": "w1 \\ud800 w2"}'),
    ]
    worker, source, sink, dlq = make_worker(model, good + bad)
    code = run_until(worker, lambda: source.committed.get(TP) == 6)
    assert code == 0
    assert len(sink.stored) == 3
    assert reasons(dlq) == {3: "invalid_json", 4: "invalid_json", 5: "invalid_field"}
    lone = next(detail for record, _, detail in dlq.letters if record.offset == 5)
    assert "surrogate" in lone


def test_metadata_over_the_limits_is_rejected_at_decode_time(model):
    many = json.dumps({"id": "many", "text": "w1", "metadata": {f"f{i}": i for i in range(300)}})
    large = json.dumps({"id": "large", "text": "w1", "metadata": {"blob": "x" * 70_000}})
    records = [*text_records(["w1"]), raw(1, many.encode()), raw(2, large.encode())]
    worker, source, sink, dlq = make_worker(model, records)
    run_until(worker, lambda: source.committed.get(TP) == 3)
    assert reasons(dlq) == {1: "metadata_too_large", 2: "metadata_too_large"}
    assert len(sink.stored) == 1
    assert counter(worker.metrics, "embedstream_events_failed_total",
                   reason="metadata_too_large") == 2


def test_an_unforeseen_exception_in_decoding_is_an_internal_error_of_that_record(model, monkeypatch):
    from embedstream.worker import pre

    real = pre.decode

    def decode(record, *args, **kwargs):
        if record.offset == 1:
            raise ZeroDivisionError("a bug that only this record finds")
        return real(record, *args, **kwargs)

    monkeypatch.setattr(pre, "decode", decode)
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2", "w3"]))
    run_until(worker, lambda: source.committed.get(TP) == 3)
    assert reasons(dlq) == {1: "internal_error"}
    assert [d for _, _, d in dlq.letters] == ["ZeroDivisionError: a bug that only this record finds"]
    assert len(sink.stored) == 2


def test_a_failing_batch_preprocessing_call_falls_back_to_each_item(model):
    """A preprocessor whose batch call raises: every good item still goes through,
    the one that raises alone becomes internal_error with the exception's type."""
    real = model.preprocessor.prepare

    def prepare(inputs):
        if any("w9" in text for text in inputs):
            raise TypeError("refused: w9")
        return real(inputs)

    model.preprocessor.prepare = prepare
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w9 w2", "w3", "w4"]))
    run_until(worker, lambda: source.committed.get(TP) == 4)
    assert reasons(dlq) == {1: "internal_error"}
    assert dlq.letters[0][2] == "TypeError: refused: w9"
    assert {key[1] for key in sink.stored} == {"p0-0", "p0-2", "p0-3"}


def test_an_unforeseen_inference_exception_fails_one_item_not_the_batch(model):
    backend = model.backend
    real = backend.embed

    def embed(inputs):
        if (inputs["input_ids"] == 5).any():  # the token w2
            raise IndexError("kernel bug on this input")
        return real(inputs)

    backend.embed = embed
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2", "w3", "w4"]))
    run_until(worker, lambda: source.committed.get(TP) == 4)
    assert reasons(dlq) == {1: "internal_error"}
    assert len(sink.stored) == 3


def test_a_model_that_fails_a_known_good_input_stops_the_worker_and_dead_letters_nothing(model):
    """When every item fails alone and the probe input fails too, the fault is the
    model's (a lost device): the worker exits 1 and commits nothing, so the events
    are redelivered to a healthy worker instead of being dead-lettered."""

    def broken(_inputs):
        raise ModelError("CUDA error: device lost")

    model.backend.embed = broken
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2"]))
    code = run_until(worker, lambda: not worker.healthy(), timeout=10)
    assert code == 1
    assert dlq.letters == [] and sink.stored == {} and source.committed == {}


def test_a_store_data_error_rejects_that_item_and_stores_the_rest(model):
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2", "w3"]))
    sink.refuse_ids = {"p0-1"}
    run_until(worker, lambda: source.committed.get(TP) == 3)
    assert reasons(dlq) == {1: "store_rejected"}
    assert {key[1] for key in sink.stored} == {"p0-0", "p0-2"}
    assert counter(worker.metrics, "embedstream_sink_retries_total") == 0  # never retried


def test_an_unforeseen_write_exception_is_retried_item_by_item(model):
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2", "w3"]))
    write = sink.write

    def buggy(results):
        if any(r.event.id == "p0-2" for r in results):
            raise KeyError("a sink bug this item triggers")
        return write(results)

    sink.write = buggy  # type: ignore[method-assign]
    code = run_until(worker, lambda: source.committed.get(TP) == 3)
    assert code == 0
    assert reasons(dlq) == {2: "internal_error"}
    assert {key[1] for key in sink.stored} == {"p0-0", "p0-1"}


def test_a_full_store_pauses_reports_not_ready_and_loses_nothing(model):
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2"]),
                                            commit_interval_ms=0)
    sink.full_next = 10**6
    seen_not_ready = threading.Event()

    def full_and_reported() -> bool:
        if not worker.readiness()["redis_memory"] and source.committed == {}:
            seen_not_ready.set()
            sink.full_next = 0  # an operator made room
        return source.committed.get(TP) == 2

    run_until(worker, full_and_reported)
    assert seen_not_ready.is_set(), "never reported the full store"
    assert counter(worker.metrics, "embedstream_store_full_total") >= 1
    assert len(sink.stored) == 2 and dlq.letters == []
    assert worker.readiness()["redis_memory"]


def test_equal_versions_are_ordered_by_offset_not_processing_order(model):
    """Two updates of one id in the same millisecond: the later offset wins even when
    it is written first (length sorting and parallel instances reorder batches)."""
    ts = int(time.time() * 1000)
    older = RawRecord("embedstream.text", 0, 0, None, b'{"id": "doc", "text": "w1 w2 w3 w4"}', ts)
    newer = RawRecord("embedstream.text", 0, 1, None, b'{"id": "doc", "text": "w5"}', ts)
    worker, source, sink, _ = make_worker(model, [older, newer])
    run_until(worker, lambda: source.committed.get(TP) == 2)
    # The shorter text sorts first: the newer record was written before the older one.
    assert sink.stored[("fake", "doc")].event.text == "w5"
    assert counter(worker.metrics, "embedstream_events_stale_total", model="fake") == 1


def test_liveness_fails_when_a_stage_holds_work_without_progress(model):
    release = threading.Event()
    real = model.backend.embed

    def hang(inputs):
        release.wait(30)  # a hung inference call
        return real(inputs)

    model.backend.embed = hang
    worker, _, _, _ = make_worker(model, text_records(["w1"]), liveness_timeout_s=0.3)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while worker.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        checks = worker.liveness_checks()
        assert "inference" in checks["stalled"]
        assert not worker.healthy() and not worker.ready()
    finally:
        release.set()
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_an_idle_worker_and_one_waiting_out_the_store_stay_alive(model):
    """No work is not a stall, and retrying an unreachable store is progress (each retry
    beats): only readiness goes false."""
    worker, _, sink, _ = make_worker(model, text_records(["w1"]), liveness_timeout_s=0.3)
    sink.fail_next = 10**6
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while counter(worker.metrics, "embedstream_sink_retries_total") < 5:
            assert time.monotonic() < deadline, "the store outage was never reached"
            time.sleep(0.05)
        assert worker.healthy()
        assert not worker.readiness()["redis"]
    finally:
        sink.fail_next = 0
        worker.stop()
        thread.join(10)


def test_the_probe_input_is_real_model_input(model):
    """The inference stage's probe goes through the model's own preprocessor."""
    from embedstream.runtime.warmup import probe_input

    probe = probe_input(model)
    assert isinstance(probe, Prepared) and probe.cost > 0
    assert np.isfinite(model.embed_prepared([probe])).all()
