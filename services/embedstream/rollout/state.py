"""The control document in Redis: which models are announced, which rollouts run.

One JSON string at ``<prefix>:!control`` (``!`` cannot occur in a model name,
so no index covers it), replaced whole under WATCH/MULTI, its ``generation``
raised by every change. Workers and gateways poll it (``control_poll_s``) and
act on a new generation: load a model, route events, answer queries from
another model. Shape::

    {"generation": 7,
     "announced": ["model-x"],                 # hot-added: served in addition
     "rollouts": {"<new>": {                   # one record per rollout, by NEW
        "new": ..., "old": ..., "modality": "text", "state": "backfilling",
        "old_default": true,                   # events naming no model were OLD's
        "topics": [...], "starts": {"topic:p": 0}, "ends": {"topic:p": 120},
        "history": [{"action": "start", "by": "ana@host", "at": 1700000000.0}, ...],
        "drop_old_after": null, "old_dropped": false}}}

States: ``backfilling`` (dual writes, backfill running), ``ready`` (backfill
finished, dual writes go on), ``promoted`` (queries and writes use NEW; OLD's
vectors wait for ``drop_old_after``), ``aborted`` (NEW's vectors dropped; OLD
serves as before).

Backfill progress changes often and is kept apart, in the hash
``<prefix>:!rollout:<new>:progress`` (committed offset per partition, rate,
updated_at), so it never wakes the workers.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from embedstream.errors import EmbedstreamError
from embedstream.sinks.cluster import Client

STATES = ("backfilling", "ready", "promoted", "aborted")
ACTIVE = ("backfilling", "ready")
"""States in which live events are embedded with both models."""


class RolloutError(EmbedstreamError):
    """A rollout command cannot go on (wrong state, unknown model, workers not answering)."""


def control_key(prefix: str) -> str:
    return f"{prefix}:!control"


def progress_key(prefix: str, new: str) -> str:
    return f"{prefix}:!rollout:{new}:progress"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:!worker:{worker_id}"


def actor() -> str:
    """Who runs this command: ``user@host``."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without one): the host alone
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Control:
    """A read-only view of the control document, and what it implies."""

    generation: int = 0
    announced: tuple[str, ...] = ()
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Control:
        if not raw:
            return cls()
        doc = json.loads(raw)
        return cls(int(doc.get("generation", 0)), tuple(doc.get("announced", ())),
                   dict(doc.get("rollouts", {})))

    def to_doc(self) -> dict[str, Any]:
        return {"generation": self.generation, "announced": list(self.announced),
                "rollouts": self.rollouts}

    # ----------------------------------------------------------- what it implies
    def extra_models(self) -> set[str]:
        """Models to serve besides the configured ones: announced, and every NEW of a
        rollout that is not aborted."""
        news = {r["new"] for r in self.rollouts.values() if r["state"] != "aborted"}
        return set(self.announced) | news

    def retired(self) -> set[str]:
        """Models no longer served: OLD of a promoted rollout, NEW of an aborted one."""
        out = {r["old"] for r in self.rollouts.values() if r["state"] == "promoted"}
        out |= {r["new"] for r in self.rollouts.values() if r["state"] == "aborted"}
        return out - {r["new"] for r in self.rollouts.values() if r["state"] != "aborted"}

    def model_set(self, configured: list[str]) -> list[str]:
        """The models a worker serves: ``configured`` plus :meth:`extra_models`, less
        :meth:`retired`."""
        return sorted((set(configured) | self.extra_models()) - self.retired())

    def serving(self, name: str) -> str:
        """The model whose vectors answer queries for ``name``: NEW once a rollout that
        replaces ``name`` is promoted (followed through later rollouts)."""
        seen = {name}
        while True:
            promoted = [r["new"] for r in self.rollouts.values()
                        if r["old"] == name and r["state"] == "promoted"]
            if not promoted or promoted[0] in seen:
                return name
            name = promoted[0]
            seen.add(name)

    def targets(self, name: str) -> tuple[str, ...]:
        """The models that embed an event for ``name``: the model serving it, plus the
        NEW of every active rollout replacing that one (dual write)."""
        serving = self.serving(name)
        dual = [r["new"] for r in self.rollouts.values()
                if r["old"] == serving and r["state"] in ACTIVE]
        return (serving, *sorted(dual))

    def active_for(self, old: str) -> dict[str, Any] | None:
        """The rollout under way that replaces ``old``, if any."""
        for record in self.rollouts.values():
            if record["old"] == old and record["state"] in ACTIVE:
                return record
        return None


def read_control(client: Client, prefix: str) -> Control:
    return Control.from_json(client.get(control_key(prefix)))


def update_control(
    client: Client,
    prefix: str,
    change: Callable[[Control], Control],
    also: Callable[[Any, Control], None] | None = None,
) -> Control:
    """Apply ``change`` to the control document atomically (optimistic: WATCH, retried on
    a concurrent change) and raise its generation. ``also(pipe, updated)`` adds commands
    that go in the same MULTI/EXEC (the index alias switch of a promotion)."""
    key = control_key(prefix)
    while True:
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                current = Control.from_json(pipe.get(key))
                changed = change(current)
                updated = Control(current.generation + 1, changed.announced, changed.rollouts)
                pipe.multi()
                pipe.set(key, json.dumps(updated.to_doc(), separators=(",", ":")))
                if also is not None:
                    also(pipe, updated)
                replies = pipe.execute(raise_on_error=False)
            except redis.WatchError:
                continue
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            raise RolloutError(f"Redis refused part of the change: {failed[0]}")
        return updated


def with_rollout(control: Control, record: dict[str, Any]) -> Control:
    """``control`` with ``record`` stored under its NEW."""
    return Control(control.generation, control.announced, {**control.rollouts,
                                                           record["new"]: record})


def event(action: str, **details: Any) -> dict[str, Any]:
    """One history entry: what, who, when."""
    return {"action": action, "by": actor(), "at": round(time.time(), 3), **details}
