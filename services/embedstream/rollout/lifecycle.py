"""The rollout commands' logic: start, promote, abort, status, and dropping OLD's vectors.

``start`` records the rollout (workers load NEW and dual-write), waits until
every live worker has picked it up, then notes where the backfill ends: the
end of each of OLD's topic partitions at that moment. A record past that end
was consumed after every worker dual-wrote, so the backfill (``rollout
backfill``, :mod:`.backfill`) and the dual writes together leave nothing out.

``promote`` switches queries in one MULTI/EXEC with the control document:
OLD's public index name (``<prefix>:idx:<old>``) stops being OLD's index
(``FT.DROPINDEX`` without ``DD``: the hashes stay) and becomes an alias of
NEW's (``FT.ALIASUPDATE``), so a plain ``FT.SEARCH`` on it answers from NEW's
vectors from that command on; the CLI, the gateway and the Python client
resolve a name to the model serving it (the control document) and embed the
query with that model. OLD's hashes are deleted ``rollout_grace_s`` later by
whichever worker (or command) sees the time has come.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from embedstream.errors import ConfigError
from embedstream.models.manifest import Manifest, find_models, load_manifest
from embedstream.models.routing import default_models
from embedstream.rollout.state import (
    ACTIVE,
    Control,
    RolloutError,
    event,
    progress_key,
    read_control,
    update_control,
    with_rollout,
    worker_key,
)
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client
from embedstream.sinks.layout import index_name, result_key, tombstone_key
from embedstream.sinks.redis import RedisSink, has_search
from embedstream.sources.registry import kafka_client

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- start
def manifest_of(settings: Settings, name: str) -> Manifest:
    """The manifest of ``name`` in the model store (``model_dir``)."""
    directory = find_models(settings.model_dir).get(name)
    if directory is None:
        raise RolloutError(f"no model {name!r} in the model store {settings.model_dir} "
                           f"(found: {sorted(find_models(settings.model_dir))})")
    try:
        return load_manifest(directory)
    except ConfigError as err:
        raise RolloutError(f"model {name!r} cannot be loaded: {err}") from err


def start(settings: Settings, client: Client, new: str, old: str) -> dict[str, Any]:
    """Record the rollout, wait for every worker to dual-write, note the backfill's range.

    Raises :class:`RolloutError` for a rollout that cannot start (and leaves nothing
    changed), or when a worker does not pick it up within ``rollout_ack_timeout_s``
    (the rollout stays recorded: ``rollout abort`` undoes it)."""
    if new == old:
        raise RolloutError("NEW and OLD are the same model")
    control = read_control(client, settings.key_prefix)
    _check_start(control, new, old)
    new_manifest = manifest_of(settings, new)
    old_manifest = manifest_of(settings, old)
    if new_manifest.modality != old_manifest.modality:
        raise RolloutError(f"{new} embeds {new_manifest.modality} but {old} embeds "
                           f"{old_manifest.modality}: a rollout keeps the modality")
    sink = RedisSink(settings.redis)
    try:
        sink.prepare([new_manifest])  # NEW's index before any write, its dimension checked
    finally:
        sink.close()
    topic = settings.topic_for(new_manifest.modality)
    record = {
        "new": new, "old": old, "modality": new_manifest.modality, "state": "backfilling",
        "old_default": _old_is_default(settings, client, old, old_manifest.modality),
        "topics": [topic], "dimension": {"old": old_manifest.dimension,
                                         "new": new_manifest.dimension},
        "history": [event("start")], "drop_old_after": None, "old_dropped": False,
    }
    client.delete(progress_key(settings.key_prefix, new))
    updated = update_control(client, settings.key_prefix, lambda c: with_rollout(c, record))
    wait_for_workers(settings, client, updated.generation, new)
    starts, ends = _offsets(settings, [topic])
    client.hset(progress_key(settings.key_prefix, new), mapping={
        "starts": json.dumps(starts), "ends": json.dumps(ends), "started_at": time.time(),
        # A group per rollout: one of an earlier, aborted rollout of NEW has offsets
        # that would skip history.
        "group": f"{settings.group_id}-backfill.{new}.{int(time.time())}",
    })
    return record


def announce(settings: Settings, client: Client, name: str) -> int:
    """Serve ``name`` (in the model store) on every running worker, without a restart;
    returns the generation every live worker serves it at."""
    manifest_of(settings, name)

    def change(control: Control) -> Control:
        announced = tuple(sorted({*control.announced, name}))
        return Control(control.generation, announced, control.rollouts)

    updated = update_control(client, settings.key_prefix, change)
    wait_for_workers(settings, client, updated.generation, name)
    return updated.generation


def _check_start(control: Control, new: str, old: str) -> None:
    existing = control.rollouts.get(new)
    if existing is not None and existing["state"] != "aborted":
        hint = (f"resume its backfill with 'embedstream rollout backfill {new}'"
                if existing["state"] == "backfilling" else f"it is {existing['state']}")
        raise RolloutError(f"a rollout of {new} exists already: {hint}")
    if control.serving(old) != old:
        raise RolloutError(f"{old} is not served any more: {control.serving(old)} replaced it")
    if control.active_for(old) is not None:
        raise RolloutError(f"a rollout replacing {old} is under way: "
                           f"{control.active_for(old)['new']}")  # type: ignore[index]
    if any(r["old"] == new and r["state"] == "promoted" for r in control.rollouts.values()):
        raise RolloutError(f"{new} was replaced by a promoted rollout; export it under a new name")


def _old_is_default(settings: Settings, client: Client, old: str, modality: str) -> bool:
    """Whether events naming no model were OLD's: as the live workers report, else as
    the settings and the model store say."""
    reports = live_workers(settings, client)
    if reports:
        return any(r.get("defaults", {}).get(modality) == old for r in reports.values())
    store: dict[str, str] = {name: load_manifest(path, verify=False).modality
             for name, path in find_models(settings.model_dir).items()}
    return default_models(settings, store).get(modality) == old


def _offsets(settings: Settings, topics: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """The first and next offsets of every partition of ``topics``, as ``topic:p``."""
    reader = kafka_client(settings.kafka_client).reader(settings.kafka)
    try:
        bounds = reader.bounds([(t, p) for t in topics for p in reader.partitions(t)])
    finally:
        reader.close()
    return ({f"{t}:{p}": first for (t, p), (first, _end) in bounds.items()},
            {f"{t}:{p}": end for (t, p), (_first, end) in bounds.items()})


# -------------------------------------------------------------------------- workers
def live_workers(settings: Settings, client: Client) -> dict[str, dict[str, Any]]:
    """Worker id -> its last report (generation, models, defaults, errors) for every
    worker of this key prefix whose report has not expired."""
    out: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=worker_key(settings.key_prefix, "*"), count=1000):
        raw = client.get(key)
        if raw:
            text = key.decode() if isinstance(key, bytes) else str(key)
            out[text.rsplit(":!worker:", 1)[-1]] = json.loads(raw)
    return out


def wait_for_workers(settings: Settings, client: Client, generation: int,
                     model: str | None = None) -> None:
    """Until every live worker applied ``generation`` (and loaded ``model``)."""
    deadline = time.monotonic() + settings.rollout_ack_timeout_s
    while True:
        behind = {}
        for wid, report in live_workers(settings, client).items():
            if int(report.get("generation", -1)) < generation:
                behind[wid] = report.get("generation")
                continue
            error = report.get("errors", {}).get(model) if model else None
            if error:
                raise RolloutError(f"worker {wid} cannot serve {model}: {error}")
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RolloutError(
                f"workers {sorted(behind)} did not pick up the change within "
                f"{settings.rollout_ack_timeout_s:.0f}s; the rollout is recorded: check them, "
                "then run the command again or 'rollout abort'")
        time.sleep(settings.control_poll_s / 4)


# ---------------------------------------------------------------- promote and abort
def _record(control: Control, new: str) -> dict[str, Any]:
    record = control.rollouts.get(new)
    if record is None:
        raise RolloutError(f"no rollout of {new}; start one with "
                           f"'embedstream rollout start {new} --replaces OLD'")
    return dict(record)


def promote(settings: Settings, client: Client, new: str, *, force: bool = False
            ) -> dict[str, Any]:
    """Answer queries for OLD (and names OLD served) from NEW, atomically; stop dual writes."""
    record = _record(read_control(client, settings.key_prefix), new)
    if record["state"] == "backfilling" and not force:
        p = progress(settings, client, record)
        raise RolloutError(f"{new} is still backfilling ({p['backfilled']}/{p['total']}); "
                           "promote when ready, or --force to accept a partial index")
    if record["state"] not in ACTIVE:
        raise RolloutError(f"{new} is {record['state']}: only a rollout under way is promoted")
    old = record["old"]
    physical = _physical_indexes(client)
    prefix = settings.key_prefix

    def change(control: Control) -> Control:
        current = _record(control, new)
        if current["state"] not in ACTIVE:
            raise RolloutError(f"{new} is {current['state']} now")
        current.update(state="promoted", drop_old_after=time.time() + settings.rollout_grace_s,
                       history=[*current["history"], event("promote", forced=force)])
        return with_rollout(control, current)

    def switch(pipe: Any, after: Control) -> None:
        if physical is None:
            return  # no search module: no index to switch, the resolvers do it all
        if index_name(prefix, old) in physical:
            pipe.execute_command("FT.DROPINDEX", index_name(prefix, old))
        for name in _public_names(after, new):
            pipe.execute_command("FT.ALIASUPDATE", index_name(prefix, name), index_name(prefix, new))

    updated = update_control(client, prefix, change, also=switch)
    wait_for_workers(settings, client, updated.generation)
    return updated.rollouts[new]


def _public_names(control: Control, new: str) -> list[str]:
    """Every name now answered by ``new`` other than its own (OLD, and what OLD served)."""
    names = {r["old"] for r in control.rollouts.values()} | {r["new"] for r in
                                                             control.rollouts.values()}
    return sorted(n for n in names if n != new and control.serving(n) == new)


def _physical_indexes(client: Client) -> set[str] | None:
    """Names of the indexes (not aliases); None without the search module."""
    if not has_search(client):
        return None
    names = client.execute_command("FT._LIST")
    return {n.decode() if isinstance(n, bytes) else str(n) for n in names}


def abort(settings: Settings, client: Client, new: str) -> dict[str, Any]:
    """Stop a rollout under way: workers stop writing NEW, then NEW's vectors are dropped."""
    record = _record(read_control(client, settings.key_prefix), new)
    if record["state"] not in ACTIVE:
        raise RolloutError(f"{new} is {record['state']}: only a rollout under way is aborted"
                           + (" (to go back, start a rollout to the old model under a new name)"
                              if record["state"] == "promoted" else ""))

    def change(control: Control) -> Control:
        current = _record(control, new)
        if current["state"] not in ACTIVE:
            raise RolloutError(f"{new} is {current['state']} now")
        current.update(state="aborted", history=[*current["history"], event("abort")])
        return with_rollout(control, current)

    updated = update_control(client, settings.key_prefix, change)
    try:
        wait_for_workers(settings, client, updated.generation)
    except RolloutError as err:
        log.warning("%s; dropping %s's vectors all the same", err, new)
    physical = _physical_indexes(client)
    if physical is not None and index_name(settings.key_prefix, new) in physical:
        client.execute_command("FT.DROPINDEX", index_name(settings.key_prefix, new))
    dropped = drop_model_keys(client, settings.key_prefix, new)
    log.info("dropped %d keys of %s", dropped, new)
    return updated.rollouts[new]


def drop_model_keys(client: Client, prefix: str, model: str) -> int:
    """Delete every chunk hash and delete marker of ``model`` (UNLINK, in slices)."""
    count = 0
    for pattern in (result_key(prefix, model, "*"), tombstone_key(prefix, model, "*")):
        batch: list[Any] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                count += int(client.unlink(*batch))
                batch = []
        if batch:
            count += int(client.unlink(*batch))
    return count


def drop_due(settings: Settings, client: Client, control: Control) -> list[str]:
    """Delete OLD's vectors of promoted rollouts whose grace period is over (one caller
    at a time, by a lock); returns the models whose vectors went."""
    dropped = []
    now = time.time()
    for record in control.rollouts.values():
        due = record.get("drop_old_after")
        if record["state"] != "promoted" or record.get("old_dropped") or due is None or due > now:
            continue
        lock = f"{settings.key_prefix}:!rollout:{record['new']}:dropping"
        if not client.set(lock, "1", nx=True, ex=300):
            continue
        old, new = record["old"], record["new"]
        count = drop_model_keys(client, settings.key_prefix, old)

        def mark(control: Control, new: str = new, count: int = count) -> Control:
            current = _record(control, new)
            current.update(old_dropped=True, history=[*current["history"],
                                                      event("drop_old", keys=count)])
            return with_rollout(control, current)

        update_control(client, settings.key_prefix, mark)
        log.info("grace period over: dropped %d keys of %s (replaced by %s)", count, old, new)
        dropped.append(old)
    return dropped


# --------------------------------------------------------------------------- status
def progress(settings: Settings, client: Client, record: dict[str, Any]) -> dict[str, Any]:
    """Backfill progress of a rollout: backfilled, total, rate (records/s), eta_s."""
    raw: dict[bytes, bytes] = client.hgetall(progress_key(settings.key_prefix, record["new"]))  # type: ignore[assignment]
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    starts = json.loads(fields.get("starts", "{}"))
    ends = json.loads(fields.get("ends", "{}"))
    done = total = 0
    for tp, end in ends.items():
        first = starts.get(tp, 0)
        committed = int(fields.get(f"o:{tp}", first))
        total += max(0, end - first)
        done += max(0, min(end, committed) - first)
    rate = float(fields.get("rate", 0.0))
    finished = record["state"] != "backfilling" and bool(ends)
    eta = 0.0 if finished or done >= total else ((total - done) / rate if rate > 0 else None)
    return {"backfilled": done, "total": total, "rate": round(rate, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "range_known": bool(ends), "updated_at": float(fields.get("updated_at", 0) or 0)}


def summaries(settings: Settings, client: Client) -> list[dict[str, Any]]:
    """Every rollout recorded, newest first: state, models, progress, history."""
    control = read_control(client, settings.key_prefix)
    out = []
    for record in control.rollouts.values():
        history = record.get("history", [])
        out.append({
            "new": record["new"], "old": record["old"], "modality": record["modality"],
            "state": record["state"], **progress(settings, client, record),
            "started_by": history[0]["by"] if history else None,
            "started_at": history[0]["at"] if history else None,
            "drop_old_after": record.get("drop_old_after"),
            "old_dropped": bool(record.get("old_dropped")),
            "serving": {record["old"]: control.serving(record["old"])},
            "history": history,
        })
    out.sort(key=lambda r: r["started_at"] or 0, reverse=True)
    return out
