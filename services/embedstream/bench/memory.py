"""``embedstream bench --memory``: what a process holds to serve its models, beside the peer.

Every row runs in a fresh process, so the resident memory (RSS) it reports is
its own: the runtime's libraries, the weights, and the activations the largest
batch left behind. Rows:

* ``peer``: sentence-transformers on torch (the same threads), after it ran the
  worker's warm-up batch (``--batch-size`` texts at the model's token limit),
  then after embedding the bench texts in batches of ``--batch-size``;
* ``worker``: the models exactly as a worker process loads them
  (:func:`embedstream.worker.service.load_instances`: its threads, inference
  instances, shared sessions and warm-up, with the worker's imports), then the
  bench texts through its inference threads side by side, each taking the next
  cost-sorted batch as the worker's inference stage does;
* ``worker-1``: the same with one inference instance holding all the threads;
* with ``--memory-models all``, one ``model:NAME`` row per model in the model
  directory (that model alone in a worker process) and ``worker-all`` (every
  model in one process: what a worker configured with no model list costs,
  and how long it takes to be ready).

Columns: RSS after loading, after the warm-up (``ready``), after the texts,
the peak (``VmHWM``), texts/s of the pass (tokenizing included) and the
ready RSS as a share of the peer's.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedstream.bench.report import columns_table
from embedstream.errors import BenchError

log = logging.getLogger(__name__)

_CHILD_TIMEOUT_S = 900.0


@dataclass(slots=True)
class MemoryRow:
    row: str
    models: list[str]
    threads: int
    instances: int | None = None
    load_mb: float | None = None
    ready_mb: float | None = None
    """After the warm-up batch: what an idle, ready worker holds."""
    after_texts_mb: float | None = None
    peak_mb: float | None = None
    texts_per_s: float | None = None
    ready_s: float | None = None
    """Seconds from the start of loading to the end of the warm-up."""
    vs_peer: float | None = None
    """``ready_mb`` / the peer's."""
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    model_dir: Path
    model: str
    threads: int
    batch_size: int
    texts: int
    seed: int
    all_models: bool = False


def run_memory(config: MemoryConfig) -> tuple[list[MemoryRow], list[dict[str, Any]]]:
    """Every row in its own process, one after the other; the rows and the targets."""
    from embedstream.models.manifest import find_models

    found = sorted(find_models(config.model_dir))
    if config.model not in found:
        raise BenchError(f"model {config.model} not found in {config.model_dir}")
    plan: list[tuple[str, list[str]]] = [
        ("peer", [config.model]), ("worker", [config.model]), ("worker-1", [config.model])]
    if config.all_models:
        plan += [(f"model:{name}", [name]) for name in found]
        plan.append(("worker-all", []))
    rows = [_child(config, name, models) for name, models in plan]
    peer = rows[0]
    for row in rows:
        if peer.ready_mb and row.ready_mb:
            row.vs_peer = row.ready_mb / peer.ready_mb
    return rows, _targets(rows)


def _child(config: MemoryConfig, row: str, models: list[str]) -> MemoryRow:
    cmd = [sys.executable, "-m", "embedstream.bench.memory", row,
           "--model-dir", str(config.model_dir), "--models", json.dumps(models),
           "--threads", str(config.threads), "--batch-size", str(config.batch_size),
           "--texts", str(config.texts), "--seed", str(config.seed)]
    log.info("memory row %s", row)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"memory row {row} took over {_CHILD_TIMEOUT_S:.0f}s") from err
    if proc.returncode != 0:
        raise BenchError(f"memory row {row} failed: {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return MemoryRow(**data)


def _targets(rows: list[MemoryRow]) -> list[dict[str, Any]]:
    by = {r.row: r for r in rows}
    peer, worker = by["peer"], by["worker"]
    if not (peer.ready_mb and worker.ready_mb and peer.texts_per_s and worker.texts_per_s):
        return []
    return [{
        "target": "worker RSS after warm-up <= peer's after the same batch, at >= its rate",
        "met": worker.ready_mb <= peer.ready_mb and worker.texts_per_s >= peer.texts_per_s,
        "figure": f"{worker.ready_mb:.0f} MB vs {peer.ready_mb:.0f} MB "
                  f"({worker.ready_mb / peer.ready_mb:.2f}x), "
                  f"{worker.texts_per_s:.1f} vs {peer.texts_per_s:.1f} texts/s "
                  f"({worker.texts_per_s / peer.texts_per_s:.2f}x)",
    }]


_COLUMNS = (("row", "row", "{}"), ("threads", "threads", "{}"),
            ("instances", "instances", "{}"), ("load MB", "load_mb", "{:.0f}"),
            ("ready MB", "ready_mb", "{:.0f}"), ("after texts MB", "after_texts_mb", "{:.0f}"),
            ("peak MB", "peak_mb", "{:.0f}"), ("texts/s", "texts_per_s", "{:.1f}"),
            ("ready s", "ready_s", "{:.1f}"), ("x peer RSS", "vs_peer", "{:.2f}"))


def table(rows: list[MemoryRow]) -> str:
    return columns_table(rows, _COLUMNS)


def per_model_text(rows: list[MemoryRow]) -> str:
    """What each model added when loaded and when warmed up (the worker-all row's log)."""
    lines = []
    for row in rows:
        for name, cost in row.per_model.items():
            lines.append(f"{row.row}: {name}: loading +{cost['load_mb']:.0f} MB, "
                         f"warm-up +{cost['warmup_mb']:.0f} MB")
    return "\n".join(lines)


# --- the child process: one row -------------------------------------------------------


def _rss() -> float:
    from embedstream.runtime.memory import rss_mb

    return rss_mb() or float("nan")


def _peer(args: argparse.Namespace, texts: list[str]) -> MemoryRow:
    import torch

    from embedstream.export.parity import reference_model
    from embedstream.models.manifest import find_models, load_manifest
    from embedstream.runtime.warmup import _texts as warmup_texts

    manifest = load_manifest(find_models(args.model_dir)[args.models[0]])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = reference_model(manifest.source, manifest)
    row = MemoryRow("peer", args.models, args.threads, load_mb=_rss())
    model.encode(warmup_texts(args.batch_size), batch_size=args.batch_size,
                 show_progress_bar=False)
    row.ready_s, row.ready_mb = time.perf_counter() - started, _rss()
    begun = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
    row.texts_per_s = len(texts) / (time.perf_counter() - begun)
    row.after_texts_mb = _rss()
    return row


def _worker(args: argparse.Namespace, texts: list[str]) -> MemoryRow:
    from embedstream.runtime.memory import rss_mb
    from embedstream.settings import Settings
    from embedstream.worker import service  # the worker's own imports, as it pays them

    instances = 1 if args.row == "worker-1" else 0
    overrides: dict[str, Any] = {
        "model_dir": args.model_dir, "models": args.models, "intra_op_threads": args.threads,
        "batch_max_items": args.batch_size, "inference_instances": instances}
    settings = Settings(**overrides)
    started, before = time.perf_counter(), rss_mb() or 0.0
    sets = service.load_instances(settings)
    models = sets[0]
    row = MemoryRow(args.row, sorted(models), args.threads, instances=len(sets),
                    ready_mb=rss_mb(), ready_s=time.perf_counter() - started)
    row.per_model = {name: {"load_mb": m.load_mb or 0.0, "warmup_mb": m.warmup_mb or 0.0}
                     for name, m in models.items()}
    row.load_mb = before + sum(cost["load_mb"] for cost in row.per_model.values())
    if texts and len(models) == 1 and models[args.models[0]].modality == "text":
        row.texts_per_s = _pass(sets, args.models[0], texts, args.batch_size)
        row.after_texts_mb = rss_mb()
    return row


def _pass(sets: list[dict[str, Any]], name: str, texts: list[str], batch_size: int) -> float:
    """Texts/s of tokenizing ``texts`` and embedding them on one thread per model set."""
    from embedstream.bench.rows import prepare_inputs

    started = time.perf_counter()
    model = sets[0][name]
    items = prepare_inputs(model.preprocessor, texts, name)
    items.sort(key=lambda item: item.cost)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(models: dict[str, Any]) -> None:
        while True:
            with lock:
                if not batches or errors:
                    return
                batch = batches.pop()
            try:
                models[name].embed_prepared(batch)
            except BaseException as err:  # reported by the caller
                errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in sets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"the worker's models failed: {errors[0]}")
    return len(texts) / (time.perf_counter() - started)


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="embedstream.bench.memory")
    parser.add_argument("row")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--models", type=json.loads, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--texts", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from embedstream.bench.inputs import generated_texts
    from embedstream.runtime.memory import peak_rss_mb

    texts = generated_texts(args.texts, args.seed) if args.texts else []
    row = _peer(args, texts) if args.row == "peer" else _worker(args, texts)
    row.peak_mb = peak_rss_mb()
    print(json.dumps(asdict(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
