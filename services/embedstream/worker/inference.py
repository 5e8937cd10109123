"""The inference stage: batches of model inputs in, vectors out. One thread per model instance.

Contract: every item of a batch taken from the batches queue leaves this stage
in exactly one way: with its vector in a result batch on the results queue, or
rejected to the dead-letter topic. A batch that fails is retried item by item,
so one bad item never fails the rest (``model_error`` for what the model
refused, ``internal_error`` for any other exception); when one chunk of a
document fails, the document is rejected once and none of its chunks go on. A
batch over the budget (a document of many chunks) runs in budget-sized pieces. When every item fails
alone, the model runs a known-good probe input: if that fails too, the fault
is the model's or the device's, not the events', and the stage raises
:class:`~embedstream.errors.ModelUnavailable` (the worker stops and is
restarted; the batch stays uncommitted) instead of dead-lettering good events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedstream.errors import ModelError, ModelUnavailable
from embedstream.metrics import Metrics
from embedstream.preprocess.base import Prepared
from embedstream.runtime.loader import LoadedModel
from embedstream.runtime.warmup import probe_input
from embedstream.worker.deadletters import describe
from embedstream.worker.items import STOP, Item, Position, ResultBatch, WorkBatch, position, put
from embedstream.worker.liveness import Heartbeat
from embedstream.worker.pre import Reject

log = logging.getLogger(__name__)


class InferenceStage:
    """Runs one model instance set; several stages may share the batches queue."""

    def __init__(
        self,
        models: dict[str, LoadedModel],
        batches: queue.Queue[Any],
        results: queue.Queue[Any],
        reject: Reject,
        metrics: Metrics,
        heartbeat: Heartbeat,
        abandon: threading.Event,
        last_one_out: Callable[[], bool],
        max_items: int = 1 << 30,
        max_tokens: int = 1 << 30,
    ) -> None:
        self.models = models
        self._max_items = max_items
        self._max_tokens = max_tokens
        self._batches = batches
        self._results = results
        self._reject = reject
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._abandon = abandon
        self._last_one_out = last_one_out
        self._probes: dict[str, Prepared | None] = {}

    def run(self) -> None:
        while not self._abandon.is_set():
            try:
                work = self._batches.get(timeout=0.1)
            except queue.Empty:
                continue
            if work is STOP:
                put(self._batches, STOP, self._abandon)  # for the other inference threads
                if self._last_one_out():  # the sink stops after every inference thread has
                    put(self._results, STOP, self._abandon)
                return
            self._heartbeat.busy()
            started = time.perf_counter()
            # This thread's instance of the model; a model added since this stage started
            # may not have one here yet (or one retired may be gone): the batch's own.
            result = self.embed(work, self.models.get(work.model.name, work.model))
            self._metrics.stage_seconds.labels("inference").observe(time.perf_counter() - started)
            self._metrics.batch_size.labels(work.model.name).observe(len(work.items))
            self._metrics.batch_tokens.labels(work.model.name).observe(work.padded_tokens)
            self._heartbeat.idle()
            if result.items:
                put(self._results, result, self._abandon)

    def embed(self, work: WorkBatch, model: LoadedModel) -> ResultBatch:
        """Embed a batch with ``model`` (this thread's instance of ``work.model``)."""
        try:
            return ResultBatch(model, work.items, *self._run_pieces(model, work.items))
        except Exception as err:
            log.warning("batch of %d failed (%s); retrying items one by one",
                        len(work.items), describe(err))
        good: list[Item] = []
        vectors: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        failed: list[tuple[Item, str, str]] = []
        for item in work.items:
            try:
                pooled, item_tokens = _run(model, [item.prepared])
            except ModelError as err:
                failed.append((item, "model_error", str(err)))
                continue
            except Exception as err:
                failed.append((item, "internal_error", describe(err)))
                continue
            finally:
                self._heartbeat.beat()
            vectors.append(pooled[0])
            tokens.extend(item_tokens or [])
            good.append(item)
        if failed and not good and not self._model_works(model):
            raise ModelUnavailable(
                f"model {model.name} fails on a known-good input too ({failed[0][2]}); "
                "stopping rather than dead-letter the events"
            )
        rejected: set[Position] = set()
        for item, reason, detail in failed:
            if position(item.event.record) not in rejected:  # a document is rejected once
                rejected.add(position(item.event.record))
                self._reject(item.event.record, reason, detail)
        keep = [i for i, item in enumerate(good) if position(item.event.record) not in rejected]
        dim = model.manifest.dimension
        stacked = np.stack([vectors[i] for i in keep]) if keep else np.zeros((0, dim), np.float32)
        kept_tokens = [tokens[i] for i in keep] if model.token_mode else None
        return ResultBatch(model, [good[i] for i in keep], stacked, kept_tokens)

    def _run_pieces(
        self, model: LoadedModel, items: list[Item]
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Run ``items`` in pieces within the batch budget (most batches are one piece)."""
        pieces: list[list[Item]] = [[]]
        for item in items:
            piece = pieces[-1]
            longest = max([item.prepared.cost, *(i.prepared.cost for i in piece)])
            if piece and (len(piece) >= self._max_items
                          or (len(piece) + 1) * longest > self._max_tokens):
                pieces.append([])
            pieces[-1].append(item)
        results = [_run(model, [i.prepared for i in piece]) for piece in pieces]
        if len(results) == 1:
            return results[0]
        vectors = np.concatenate([r[0] for r in results])
        tokens = None if results[0][1] is None else [t for r in results for t in r[1] or []]
        return vectors, tokens

    def _model_works(self, model: LoadedModel) -> bool:
        """Run the model's probe input; True when it works (or there is no probe)."""
        if model.name not in self._probes:
            try:
                self._probes[model.name] = probe_input(model)
            except Exception:
                self._probes[model.name] = None
        probe = self._probes[model.name]
        if probe is None:
            return True
        try:
            _run(model, [probe])
        except Exception as err:
            log.error("model %s fails on its probe input: %s", model.name, describe(err))
            return False
        return True


def _run(
    model: LoadedModel, prepared: list[Prepared]
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    if model.token_mode:
        return model.embed_prepared_tokens(prepared)
    return model.embed_prepared(prepared), None
