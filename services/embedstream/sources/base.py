"""The source interface: where events come from, and where their offsets go.

Contract: :meth:`Source.poll` returns records in partition order;
:meth:`Source.commit` records the *next* offset to read per partition and is
called only for offsets whose events are stored or dead-lettered. The
:class:`RebalanceListener` given at construction hears of rebalances, inside
``poll`` (on the polling thread, or on a client thread while the polling
thread waits in ``poll``): ``revoked`` before partitions may move (the last
chance to commit them), then ``assigned`` with the new assignment. A
partition revoked and assigned again to the same consumer may continue from
the client's fetch position (kafka-python keeps it) or from the committed
offset (librdkafka): records the worker polled before the revoke are not
necessarily delivered again, so the worker forgets only the partitions that
did not come back.

Tools that are not group members read and write through two more interfaces:
a :class:`TopicReader` reads partitions from chosen offsets (``replay``, a
rollout's backfill bounds), and :class:`GroupOffsets` reads and commits a
group's offsets without joining it (``replay``'s re-drive progress).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from embedstream.envelope import RawRecord

TopicPartition = tuple[str, int]


class RebalanceListener(Protocol):
    def revoked(self, partitions: set[TopicPartition]) -> None:
        """These partitions may move to another member: commit what is finished."""
        ...

    def assigned(self, partitions: set[TopicPartition]) -> None:
        """The new assignment (complete, possibly empty), after every ``revoked``."""
        ...


class IgnoreRebalances:
    """A listener for consumers that commit nothing on a rebalance (tools, benchmarks)."""

    def revoked(self, partitions: set[TopicPartition]) -> None:
        pass

    def assigned(self, partitions: set[TopicPartition]) -> None:
        pass


class Source(Protocol):
    def poll(self, timeout_s: float) -> list[RawRecord]: ...

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit; False when the group rejected it (rebalance): events are redelivered."""
        ...

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        """Send a commit without waiting for it (safe inside ``revoked``)."""
        ...

    def pause(self) -> None:
        """Stop fetching (keep polling for group membership); backpressure."""
        ...

    def resume(self) -> None: ...

    def connected(self) -> bool:
        """True when the broker is reachable (readiness)."""
        ...

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end, per assigned partition (best effort)."""
        ...

    def close(self) -> None:
        """Leave the group without committing anything further."""
        ...


class DeadLetters(Protocol):
    """Where rejected events go.

    ``send`` never raises and never blocks for long: it is asynchronous, and
    exactly one of ``on_done`` (the letter is durably written) or ``on_error``
    (it was not; the caller may send again) runs later, possibly on the
    producer's own thread, so neither callback may block. A letter always
    fits the producer's limits: a record too large to copy is sent as a
    reference to its source position (header ``embedstream.value: reference``).
    """

    def send(
        self,
        record: RawRecord,
        reason: str,
        detail: str,
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class RecordSender(Protocol):
    """A producer of one client library, as :class:`embedstream.producer.Producer` (the
    gateway's publisher, the results stream, ``produce``, the demo) uses it.

    ``send`` queues a record and returns a future that completes once the broker
    acknowledged it (``acks=all``) or fails with :class:`~embedstream.errors.DeliveryFailed`;
    a record refused at once (no metadata within the blocking limit, a full local
    queue) raises that error from ``send`` itself. The future may complete on the
    client's own thread: its callbacks must not block.
    """

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None) -> Future[None]: ...

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is settled; SourceError if some are not in time."""
        ...

    def close(self, timeout_s: float) -> None: ...


class TopicReader(Protocol):
    """Reads chosen partitions from chosen offsets, outside any consumer group.

    It commits nothing and joins no group: what a tool uses to read a range of
    a topic (``replay``) or to learn its bounds (a rollout's backfill). Records
    of a partition come in offset order; once :meth:`stop` names a partition,
    :meth:`poll` returns none of it again.
    """

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions, sorted; empty when the topic does not exist."""
        ...

    def bounds(self, partitions: list[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """The first offset the broker still holds and the next offset to be written."""
        ...

    def read_from(self, positions: dict[TopicPartition, int]) -> None:
        """Read exactly these partitions, each from its offset (or from its first
        offset still held, when retention removed the offset asked for)."""
        ...

    def poll(self, timeout_s: float) -> list[RawRecord]:
        """Records fetched within ``timeout_s`` (empty when none came)."""
        ...

    def stop(self, partition: TopicPartition) -> None:
        """Fetch no more of this partition."""
        ...

    def stopped(self) -> set[TopicPartition]: ...

    def close(self) -> None: ...


class GroupOffsets(Protocol):
    """A consumer group's committed offsets, read and written by a tool that is not
    one of its members (the group need not have any)."""

    def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The committed next offset of each partition that has one."""
        ...

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these next offsets; SourceError when the broker refuses."""
        ...

    def close(self) -> None: ...
