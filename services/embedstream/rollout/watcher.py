"""The worker's side of the control document: hot reload of the model set, dual writes.

A :class:`ModelWatcher` thread per worker process reads the control document
every ``control_poll_s``. On a new generation it loads the models the document
adds (from the model store, one session per inference thread, warmed up,
their index made) off the hot path, then swaps the worker's model set and
routing in one step (:meth:`Worker.apply_models`): from the next poll on, an
event for OLD is embedded by OLD and NEW during a rollout, by NEW alone once
it is promoted; retired models are let go. It then reports the generation it
serves at ``<prefix>:!worker:<id>`` (expiring), which is what ``rollout
start`` waits for. A model that cannot be loaded is reported there too, and
the rest of the change still applies. It also deletes OLD's vectors when a
grace period is over and sets the rollout gauges.

Redis away is about the world: the watcher logs it and tries again next time;
the worker goes on with the set it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from embedstream.errors import EmbedstreamError
from embedstream.metrics import Metrics
from embedstream.models.routing import Routing
from embedstream.rollout.lifecycle import drop_due, progress
from embedstream.rollout.state import ACTIVE, Control, read_control, worker_key
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client
from embedstream.sinks.redis import RedisSink
from embedstream.worker.pipeline import Worker

log = logging.getLogger(__name__)

Loader = Callable[[str], list[LoadedModel]]
"""Loads one model by name: one instance per inference thread."""


def routing_for(settings: Settings, control: Control, served: dict[str, str]) -> Routing:
    """The routing a worker serving ``served`` (name -> modality) follows under ``control``.

    A rollout's NEW is never the default of its modality while OLD serves (adding it
    must not change where events naming no model go); a promoted OLD stays a name
    events may carry, routed to what serves it now."""
    names = dict(served)
    for record in control.rollouts.values():
        if record["state"] == "promoted":
            names.setdefault(record["old"], record["modality"])
    targets = {}
    for name in names:
        routed = tuple(t for t in control.targets(name) if t in served)
        if routed:
            targets[name] = routed
    news = {r["new"] for r in control.rollouts.values() if r["state"] in ACTIVE}
    candidates = {n: m for n, m in names.items() if n in targets and n not in news}
    return Routing.plain(settings, {}, targets, candidates)


class ModelWatcher:
    def __init__(
        self,
        settings: Settings,
        worker: Worker,
        instances: list[dict[str, LoadedModel]],
        loader: Loader,
        sink: RedisSink,
        client: Client,
        metrics: Metrics,
        configured: list[str],
        generation: int,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.instances = [dict(i) for i in instances]
        self._loader = loader
        self._sink = sink
        self._client = client
        self._metrics = metrics
        self._configured = configured
        self.generation = generation
        self.errors: dict[str, str] = {}
        self.id = f"{settings.group_id}:{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="embedstream-models",
                                        daemon=True)

    def start(self) -> None:
        self._report()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):  # else it expires on its own
            self._client.delete(worker_key(self.settings.key_prefix, self.id))

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.control_poll_s):
            try:
                self.check()
            except (redis.RedisError, EmbedstreamError) as err:
                log.warning("model control: %s; trying again in %.0fs", err,
                            self.settings.control_poll_s)
            except Exception:  # a bug here must not take the pipeline down
                log.exception("model control failed; trying again")

    def check(self) -> None:
        """One pass: apply a new generation, report, drop what is due, set gauges."""
        control = read_control(self._client, self.settings.key_prefix)
        if control.generation != self.generation:
            self.apply(control)
        self._report()
        drop_due(self.settings, self._client, control)
        self._gauges(control)

    def apply(self, control: Control) -> None:
        """Serve the model set ``control`` asks for; load what is new first."""
        wanted = control.model_set(self._configured)
        current = self.instances[0]
        for name in [n for n in wanted if n not in current]:
            self._add(name)
        served = {n: m for n, m in self.instances[0].items() if n in wanted}
        for instance in self.instances:
            for name in [n for n in instance if n not in served]:
                del instance[name]  # a batch in flight keeps its own reference
        routing = routing_for(self.settings, control, {n: m.modality for n, m in served.items()})
        self.worker.apply_models([dict(i) for i in self.instances], routing)
        for model in served.values():
            m = model.manifest
            self._metrics.model_info.labels(m.name, m.modality, str(m.dimension),
                                            model.backend.provider).set(1)
        log.info("model set of generation %d: %s; routes %s", control.generation,
                 sorted(served), routing.targets)
        self.generation = control.generation

    def _add(self, name: str) -> None:
        try:
            loaded = self._loader(name)
            model = loaded[0]
            topic = self.settings.topic_for(model.modality)
            if topic not in self.worker.topics:
                raise EmbedstreamError(f"{name} embeds {model.modality}, whose topic {topic} "
                                       "this worker does not consume: restart it to serve it")
            self._sink.prepare([model.manifest])
        except Exception as err:
            self.errors[name] = str(err)
            log.error("cannot serve %s: %s", name, err)
            return
        self.errors.pop(name, None)
        for instance, model in zip(self.instances, loaded, strict=True):
            instance[name] = model
        log.info("loaded %s (%s, %d-d) without a restart", name, model.modality,
                 model.manifest.dimension)

    def _report(self) -> None:
        routing = self.worker.pre.routing
        report = {"generation": self.generation, "models": sorted(self.instances[0]),
                  "defaults": routing.defaults, "errors": self.errors, "at": time.time()}
        ttl = max(5, int(self.settings.control_poll_s * 5))
        self._client.set(worker_key(self.settings.key_prefix, self.id), json.dumps(report), ex=ttl)

    def _gauges(self, control: Control) -> None:
        for record in control.rollouts.values():
            p = progress(self.settings, self._client, record)
            new = record["new"]
            self._metrics.rollout_backfilled.labels(new).set(p["backfilled"])
            self._metrics.rollout_backfill_total.labels(new).set(p["total"])
            self._metrics.rollout_backfill_rate.labels(new).set(p["rate"])
            for state in ("backfilling", "ready", "promoted", "aborted"):
                self._metrics.rollout_state.labels(new, state).set(
                    1.0 if record["state"] == state else 0.0)


def attach(settings: Settings, worker: Worker, instances: list[dict[str, LoadedModel]],
           loader: Loader, sink: RedisSink, client: Client, metrics: Metrics,
           configured: list[str], control: Control) -> ModelWatcher:
    """A watcher for ``worker``, started and stopped with it."""
    watcher = ModelWatcher(settings, worker, instances, loader, sink, client, metrics,
                           configured, control.generation)
    worker.on_start.append(watcher.start)
    worker.on_stop.append(watcher.stop)
    return watcher

