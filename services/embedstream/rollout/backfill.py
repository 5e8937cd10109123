"""The backfill of a rollout: OLD's retained history re-embedded into NEW's index.

It is a consumer group of its own (``<group_id>-backfill.<new>.<start time>``)
running the worker's own pipeline (decode, route, preprocess, batch, embed,
versioned write, dead letters, commit after the write) over OLD's topics, up
to the ends ``rollout start`` noted, with NEW as the only model: an event for
OLD (by name, or naming none when OLD was the default) is embedded by NEW;
deletes remove NEW's copy; events of other models are skipped. So:

* Resumable: offsets are committed only once written. Killed, it starts again
  from the committed offsets; what it wrote since is recognised as duplicates.
* Never older over newer: the writes are versioned like the live ones, so a
  record of the history never replaces what a dual write stored since.
* Rate-limited (``rollout_backfill_rate`` records/s, a token bucket in front
  of the consumer) so the live workers keep the CPU they need; several
  backfill processes share the partitions like any group.

Progress (committed offset per partition, rate) goes to the rollout's
progress hash after every commit; when every partition reached its end the
rollout becomes ``ready`` and the process exits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.models.routing import Routing
from embedstream.rollout.lifecycle import progress
from embedstream.rollout.state import (
    Control,
    RolloutError,
    event,
    progress_key,
    read_control,
    update_control,
    with_rollout,
)
from embedstream.runtime.loader import load_configured
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client
from embedstream.sinks.redis import RedisSink, connect
from embedstream.sources.base import RebalanceListener, Source, TopicPartition
from embedstream.sources.registry import kafka_client
from embedstream.worker.pipeline import Worker

log = logging.getLogger(__name__)


class TokenBucket:
    """At most ``rate`` records a second on average, bursts of a second's worth (0: no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def wait_s(self) -> float:
        """Seconds until a record may go (0: now)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self, count: int) -> None:
        if self.rate > 0:
            self._tokens -= count


class BoundedSource:
    """A :class:`Source` that yields records before ``ends`` only, at most ``bucket``'s rate.

    Records at or past their partition's end are dropped here: they are never
    tracked, so nothing past an end is ever committed (the live workers own them).
    """

    def __init__(self, inner: Source, ends: dict[TopicPartition, int], bucket: TokenBucket,
                 stopping: threading.Event) -> None:
        self._inner = inner
        self._ends = ends
        self._bucket = bucket
        self._stopping = stopping

    def poll(self, timeout_s: float) -> list[RawRecord]:
        wait = self._bucket.wait_s()
        if wait > 0:
            self._stopping.wait(min(wait, timeout_s))
            return []
        records = [r for r in self._inner.poll(timeout_s)
                   if r.offset < self._ends.get((r.topic, r.partition), 0)]
        self._bucket.take(len(records))
        return records

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        return self._inner.commit(offsets)

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        self._inner.commit_nowait(offsets)

    def pause(self) -> None:
        self._inner.pause()

    def resume(self) -> None:
        self._inner.resume()

    def connected(self) -> bool:
        return self._inner.connected()

    def lag(self) -> dict[TopicPartition, int]:
        return self._inner.lag()

    def close(self) -> None:
        self._inner.close()


@dataclass
class BackfillResult:
    state: str
    backfilled: int
    total: int
    seconds: float


def _tp(text: str) -> TopicPartition:
    topic, partition = text.rsplit(":", 1)
    return topic, int(partition)


class _Progress:
    """Records committed offsets in the progress hash; decides when the backfill is over."""

    def __init__(self, settings: Settings, client: Client, record: dict[str, Any],
                 starts: dict[str, int], ends: dict[str, int], metrics: Metrics,
                 on_tick: Callable[[dict[str, Any]], None] | None) -> None:
        self.settings = settings
        self.client = client
        self.record = record
        self.starts = starts
        self.ends = ends
        self.metrics = metrics
        self.on_tick = on_tick
        self.key = progress_key(settings.key_prefix, record["new"])
        self.stop: Callable[[], None] = lambda: None
        self._last: tuple[float, int] | None = None
        self._rate = 0.0

    def offsets(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = self.client.hgetall(self.key)  # type: ignore[assignment]
        return {k.decode()[2:]: int(v) for k, v in raw.items() if k.startswith(b"o:")}

    def done(self) -> int:
        committed = self.offsets()
        return sum(max(0, min(end, committed.get(tp, self.starts.get(tp, 0)))
                       - self.starts.get(tp, 0)) for tp, end in self.ends.items())

    def finished(self) -> bool:
        committed = self.offsets()
        return all(committed.get(tp, self.starts.get(tp, 0)) >= end
                   for tp, end in self.ends.items())

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """After each commit (the polling thread): store, measure, maybe finish."""
        self.client.hset(self.key, mapping={f"o:{t}:{p}": o for (t, p), o in offsets.items()})
        done, now = self.done(), time.monotonic()
        if self._last is not None and now > self._last[0]:
            measured = (done - self._last[1]) / (now - self._last[0])
            self._rate = measured if self._rate == 0 else 0.7 * self._rate + 0.3 * measured
        self._last = (now, done)
        self.client.hset(self.key, mapping={"rate": round(self._rate, 2),
                                            "updated_at": time.time()})
        new = self.record["new"]
        total = sum(max(0, e - self.starts.get(tp, 0)) for tp, e in self.ends.items())
        self.metrics.rollout_backfilled.labels(new).set(done)
        self.metrics.rollout_backfill_total.labels(new).set(total)
        self.metrics.rollout_backfill_rate.labels(new).set(self._rate)
        if self.on_tick is not None:
            self.on_tick({"backfilled": done, "total": total, "rate": self._rate})
        state = read_control(self.client, self.settings.key_prefix).rollouts[new]["state"]
        if state != "backfilling":
            log.warning("rollout of %s is %s: the backfill stops", new, state)
            self.stop()
        elif self.finished():
            self.stop()


def mark_ready(settings: Settings, client: Client, new: str, seconds: float) -> str:
    """``backfilling`` -> ``ready``; returns the state the rollout is in after."""
    def change(control: Control) -> Control:
        current = dict(control.rollouts[new])
        if current["state"] == "backfilling":
            current.update(state="ready", history=[*current["history"],
                                                   event("backfilled", seconds=round(seconds, 1))])
        return with_rollout(control, current)

    return update_control(client, settings.key_prefix, change).rollouts[new]["state"]


def run_backfill(settings: Settings, new: str, *, rate: float | None = None,
                 metrics: Metrics | None = None,
                 on_tick: Callable[[dict[str, Any]], None] | None = None,
                 stop: threading.Event | None = None) -> BackfillResult:
    """Re-embed OLD's history into NEW until done (or ``stop`` is set); resumable."""
    started = time.monotonic()
    client = connect(settings.redis)
    record = read_control(client, settings.key_prefix).rollouts.get(new)
    if record is None:
        raise RolloutError(f"no rollout of {new}")
    if record["state"] != "backfilling":
        p = progress(settings, client, record)
        return BackfillResult(record["state"], p["backfilled"], p["total"], 0.0)
    fields: dict[bytes, bytes] = client.hgetall(progress_key(settings.key_prefix, new))  # type: ignore[assignment]
    if b"ends" not in fields:
        raise RolloutError(f"the rollout of {new} has no backfill range yet: "
                           "'rollout start' did not finish; run it again after an abort")
    starts, ends = json.loads(fields[b"starts"]), json.loads(fields[b"ends"])
    metrics = metrics or Metrics()
    tracker = _Progress(settings, client, record, starts, ends, metrics, on_tick)
    if tracker.finished():
        state = mark_ready(settings, client, new, time.monotonic() - started)
        return BackfillResult(state, tracker.done(), tracker.done(), 0.0)

    worker = _backfill_worker(settings, record, fields, ends, rate, metrics, stop)
    tracker.stop = worker.stop
    worker.committer.on_commit(tracker.committed)
    if stop is not None:
        def relay(event: threading.Event = stop) -> None:
            event.wait()
            worker.stop()

        threading.Thread(target=relay, daemon=True).start()
    log.info("backfill of %s from %s: %d records to go", new, record["old"],
             sum(ends.values()) - sum(starts.values()) - tracker.done())
    code = worker.run()
    seconds = time.monotonic() - started
    state = record["state"]
    if tracker.finished():
        state = mark_ready(settings, client, new, seconds)
    elif code != 0:
        raise RolloutError(f"the backfill of {new} failed (exit {code}); run it again: "
                           "it resumes where it stopped")
    total = sum(max(0, e - starts.get(tp, 0)) for tp, e in ends.items())
    return BackfillResult(state, tracker.done(), total, seconds)


def _backfill_worker(settings: Settings, record: dict[str, Any], fields: dict[bytes, bytes],
                     ends: dict[str, int], rate: float | None, metrics: Metrics,
                     stop: threading.Event | None) -> Worker:
    new, old = record["new"], record["old"]
    limit = settings.rollout_backfill_rate if rate is None else rate
    group = fields.get(b"group", b"").decode() or f"{settings.group_id}-backfill.{new}"
    bsettings = settings.model_copy(update={
        "group_id": group, "auto_offset_reset": "earliest", "models": [new],
        "max_poll_records": max(1, min(settings.max_poll_records, int(limit) or 1 << 30)),
    })
    models = load_configured(settings, [new], threads=max(1, settings.intra_op_threads))
    routing = Routing({old: (new,), new: (new,)},
                      {record["modality"]: old} if record.get("old_default") else {},
                      skip_others=True)
    sink = RedisSink(bsettings.redis)
    sink.prepare([models[new].manifest])
    library = kafka_client(settings.kafka_client)
    bucket = TokenBucket(limit)
    stopping = stop or threading.Event()
    bounds = {_tp(tp): end for tp, end in ends.items()}

    def source(listener: RebalanceListener) -> Source:
        return BoundedSource(library.source(bsettings.kafka, record["topics"], listener), bounds,
                             bucket, stopping)

    return Worker(bsettings, models, source_factory=source, sink=sink,
                  dead_letters=library.dead_letters(bsettings.kafka), metrics=metrics,
                  routing=routing)
