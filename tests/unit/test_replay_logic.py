"""``replay``'s logic on in-memory topics: what moves the re-drive progress, and what a
re-embedded range holds. The real clients are tested against the broker in
``tests/integration/test_replay.py``."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from embedstream import replay
from embedstream.envelope import RawRecord, encode
from embedstream.errors import DeliveryFailed, SourceError
from embedstream.settings import Settings
from embedstream.sources.base import TopicPartition
from embedstream.sources.registry import KafkaClient

DLQ = "events.dlq"
SOURCE = "events.text"


class Topics:
    """Topics in memory behind the TopicReader, GroupOffsets and RecordSender interfaces."""

    def __init__(self) -> None:
        self.logs: dict[TopicPartition, list[RawRecord]] = {}
        self.groups: dict[str, dict[TopicPartition, int]] = {}
        self.refuse: set[bytes] = set()
        """Keys the 'broker' refuses to take."""

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
               headers: tuple[tuple[str, bytes], ...] = (), timestamp_ms: int = 1_000) -> None:
        log = self.logs.setdefault((topic, partition), [])
        log.append(RawRecord(topic, partition, len(log), key, value, timestamp_ms, headers))

    def client(self) -> KafkaClient:
        def unused(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("replay needs no consumer-group member or dead-letter producer")

        return KafkaClient("memory", unused, unused, unused,  # type: ignore[arg-type]
                           lambda _settings, **_kw: Sender(self),
                           lambda _settings, **_kw: Reader(self),
                           lambda _settings, group: Group(self, group))


class Reader:
    def __init__(self, topics: Topics) -> None:
        self._topics = topics
        self._positions: dict[TopicPartition, int] = {}
        self._stopped: set[TopicPartition] = set()

    def partitions(self, topic: str) -> list[int]:
        return sorted(p for t, p in self._topics.logs if t == topic)

    def bounds(self, partitions: list[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: (0, len(self._topics.logs[tp])) for tp in partitions}

    def read_from(self, positions: dict[TopicPartition, int]) -> None:
        self._positions = dict(positions)

    def poll(self, timeout_s: float) -> list[RawRecord]:
        out = []
        for tp, at in self._positions.items():
            if tp not in self._stopped:
                out += self._topics.logs[tp][at:]
                self._positions[tp] = len(self._topics.logs[tp])
        return out

    def stop(self, partition: TopicPartition) -> None:
        self._stopped.add(partition)

    def stopped(self) -> set[TopicPartition]:
        return set(self._stopped)

    def close(self) -> None:
        pass


class Group:
    def __init__(self, topics: Topics, name: str) -> None:
        self._offsets = topics.groups.setdefault(name, {})

    def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._offsets[tp] for tp in partitions if tp in self._offsets}

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self._offsets.update(offsets)

    def close(self) -> None:
        pass


class Sender:
    def __init__(self, topics: Topics) -> None:
        self._topics = topics

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None) -> Future[None]:
        done: Future[None] = Future()
        if key in self._topics.refuse:
            done.set_exception(DeliveryFailed("record refused", retriable=False))
        else:
            # Re-published records are newer than the run: timestamp far ahead.
            self._topics.append(topic, 0, key, value, tuple(headers or ()), timestamp_ms=1 << 62)
            done.set_result(None)
        return done

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        pass


@pytest.fixture
def topics(monkeypatch: pytest.MonkeyPatch) -> Topics:
    topics = Topics()
    monkeypatch.setattr(replay, "kafka_client", lambda _name: topics.client())
    monkeypatch.setattr(replay, "_IDLE_S", 0.0)
    return topics


def letter(topics: Topics, key: bytes, reason: str) -> None:
    topics.append(DLQ, 0, key, b"payload-" + key, (
        ("embedstream.reason", reason.encode()), ("embedstream.source.topic", SOURCE.encode()),
        ("embedstream.value", b"original"), ("x-own", b"kept")))


def settings() -> Settings:
    return Settings(topic_dlq=DLQ, group_id="g")


def test_a_refused_record_stops_the_redrive_before_its_progress_moves(topics: Topics) -> None:
    for key in (b"a", b"b", b"c"):
        letter(topics, key, "unknown_model")
    topics.refuse = {b"b"}
    with pytest.raises(SourceError, match="1 re-published records were refused"):
        replay.redrive_dead_letters(settings().kafka)
    assert topics.groups["g-redrive"] == {}  # nothing marked done: a later run sends all again

    topics.refuse = set()
    report = replay.redrive_dead_letters(settings().kafka)
    assert report.published == 3 and topics.groups["g-redrive"] == {(DLQ, 0): 3}
    sent = [(r.key, r.value, dict(r.headers)) for r in topics.logs[(SOURCE, 0)]]
    assert [k for k, _v, _h in sent] == [b"a", b"c", b"a", b"b", b"c"]  # a and c twice: at least once
    assert sent[-1][1] == b"payload-c" and sent[-1][2]["x-own"] == b"kept"
    assert "embedstream.reason" not in sent[-1][2]  # the letter's own headers are dropped
    assert sent[-1][2]["embedstream.redriven_from"] == f"{DLQ}:0:2".encode()


def test_a_reason_run_moves_only_its_reason_and_an_all_run_finishes_the_rest(topics: Topics) -> None:
    letter(topics, b"a", "unknown_model")
    letter(topics, b"b", "invalid_json")
    letter(topics, b"c", "unknown_model")
    first = replay.redrive_dead_letters(settings().kafka, reasons={"unknown_model"})
    assert (first.published, first.skipped) == (2, 1)
    assert topics.groups == {"g-redrive.unknown_model": {(DLQ, 0): 3}, "g-redrive": {}}
    rest = replay.redrive_dead_letters(settings().kafka)
    assert (rest.published, rest.already, dict(rest.by_reason)) == (1, 2, {"invalid_json": 1})
    assert topics.groups["g-redrive"] == {(DLQ, 0): 3}
    dry = replay.redrive_dead_letters(settings().kafka, dry_run=True)
    assert (dry.published, dry.already, sum(dry.by_reason.values())) == (0, 0, 0)


def test_reembed_publishes_the_range_pinned_to_the_originals(topics: Topics) -> None:
    for p in (0, 1):
        for i in range(4):
            topics.append(SOURCE, p, f"k{p}{i}".encode(),
                          encode(f"e{p}{i}", text="t") if i != 2 else b"not json",
                          timestamp_ms=100 + i)
    report = replay.reembed_range(settings().kafka, SOURCE, "m2", start=1, end=3)
    assert (report.published, report.skipped) == (2, 2)  # offset 1 of each; offset 2 is no envelope
    new = [json.loads(r.value or b"") for r in topics.logs[(SOURCE, 0)][4:]]
    assert sorted((b["id"], b["model"], b["version"]) for b in new) == [
        ("e01", "m2", 101), ("e11", "m2", 101)]
    with pytest.raises(SourceError, match="no partition 5"):
        replay.reembed_range(settings().kafka, SOURCE, "m2", partitions=[5])
