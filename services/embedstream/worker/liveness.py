"""Liveness means progress: each stage's heartbeat, and which stages are stuck.

A stage is *busy* while it holds work and beats whenever it makes progress
(an event decoded, a batch embedded, a write attempted). A busy stage that
has not beaten for ``timeout_s`` is stalled: a hung inference call, a write
that never returns. Waiting for input, or for room in the next stage's queue,
is not busy: the stalled one is then the stage downstream. Waiting out an
unreachable store or broker beats at every retry: that is the world's
failure, reported by readiness, and restarting the pod would not help.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Heartbeat:
    """One stage's progress. Written by its thread, read by the health server."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._busy_since: float | None = None
        self._last_beat = clock()

    def busy(self) -> None:
        """The stage took work: from now on it must make progress."""
        now = self._clock()
        self._last_beat = now
        if self._busy_since is None:
            self._busy_since = now

    def beat(self) -> None:
        """The stage made progress."""
        self._last_beat = self._clock()

    def idle(self) -> None:
        """The stage holds no work (or waits on another stage)."""
        self._busy_since = None
        self._last_beat = self._clock()

    def stalled_for(self) -> float:
        """Seconds busy without progress; 0 while idle."""
        if self._busy_since is None:
            return 0.0
        return max(0.0, self._clock() - self._last_beat)


class Liveness:
    """The heartbeats of a worker's stages and the timeout they are held to."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._beats: dict[str, Heartbeat] = {}
        self._lock = threading.Lock()

    def heartbeat(self, name: str) -> Heartbeat:
        with self._lock:
            beat = self._beats.setdefault(name, Heartbeat(name, self._clock))
        return beat

    def stalled(self) -> dict[str, float]:
        """Stage name -> seconds without progress, for stages over the timeout."""
        with self._lock:
            beats = list(self._beats.values())
        return {b.name: round(s, 1) for b in beats if (s := b.stalled_for()) > self.timeout_s}

    def names(self) -> list[str]:
        with self._lock:
            return list(self._beats)
