"""The source interface: where events come from, and where their offsets go.

Contract: :meth:`Source.poll` returns records in partition order;
:meth:`Source.commit` records the *next* offset to read per partition and is
called only for offsets whose events are stored or dead-lettered. The
``on_revoked`` callback given at construction runs inside ``poll`` (on the
polling thread) before partitions move to another worker; it is the last
chance to commit them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from embedstream.envelope import RawRecord

TopicPartition = tuple[str, int]
RevokeCallback = Callable[[set[TopicPartition]], None]


class Source(Protocol):
    def poll(self, timeout_s: float) -> list[RawRecord]: ...

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit; False when the group rejected it (rebalance): events are redelivered."""
        ...

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        """Send a commit without waiting for it (safe inside ``on_revoked``)."""
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
    """Where rejected events go. ``send`` is asynchronous: ``on_done`` runs once
    the dead letter is durably written, ``on_error`` if it cannot be."""

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
