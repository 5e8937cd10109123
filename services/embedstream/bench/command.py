"""One bench run: the same texts through every row, in one process, interleaved.

Each round runs every row in turn (peer, raw ORT per precision, then the
pipeline rows); each row keeps its best round, the least disturbed by other
load on the machine, and the JSON keeps every round's time. Quality is the
cosine to the fp32 PyTorch reference (the peer's own vectors).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstream import devstack
from embedstream.bench.inputs import file_texts, generated_texts
from embedstream.bench.pipeline import run_pipeline
from embedstream.bench.report import Report, Row
from embedstream.bench.rows import OrtRow, PeerRow, Timed, prepare_texts
from embedstream.errors import BenchError
from embedstream.models.manifest import find_models
from embedstream.runtime.onnx import default_threads
from embedstream.settings import Settings

log = logging.getLogger(__name__)

ROWS = ("peer", "ort-fp32", "ort-int8", "pipeline-fp32", "pipeline-int8")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    texts: list[str]
    source: str
    batch_size: int
    threads: int
    rows: tuple[str, ...]
    rounds: int
    latency_s: float
    model: str


def run_bench_command(settings: Settings, args: argparse.Namespace) -> int:
    if getattr(args, "clients", False):
        from embedstream.bench.clients import run_clients_command

        return run_clients_command(settings, args)
    config = _config(settings, args)
    report = run_bench(settings, config)
    print(report.table())
    print()
    print(report.targets_text())
    if args.json:
        report.write_json(args.json)
        print(f"\nwrote {args.json}")
    return 0


def _config(settings: Settings, args: argparse.Namespace) -> BenchConfig:
    count = 48 if args.smoke else args.texts
    rows = tuple(args.rows or ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise BenchError(f"unknown bench rows {unknown}; known: {', '.join(ROWS)}")
    if args.file:
        texts, source = file_texts(args.file, count if args.smoke else None), str(args.file)
    else:
        texts, source = generated_texts(count, args.seed), f"generated (seed {args.seed})"
    return BenchConfig(
        texts=texts, source=source,
        batch_size=16 if args.smoke else args.batch_size,
        threads=args.threads or settings.intra_op_threads or default_threads(),
        rows=rows, rounds=1 if args.smoke else max(1, args.rounds),
        latency_s=3.0 if args.smoke else args.latency_s,
        model=args.model or settings.default_text_model,
    )


def run_bench(settings: Settings, config: BenchConfig) -> Report:
    fp32_dir, int8_dir = _model_dirs(settings, config)
    runners: dict[str, Any] = {}
    if "peer" in config.rows:
        runners["peer"] = PeerRow(fp32_dir, config.threads, config.batch_size)
    ort_fp32 = OrtRow(fp32_dir, config.threads, config.batch_size)
    if "ort-fp32" in config.rows:
        runners["ort-fp32"] = ort_fp32
    if "ort-int8" in config.rows:
        runners["ort-int8"] = OrtRow(int8_dir, config.threads, config.batch_size)
    tokens = sum(item.cost for item in prepare_texts(ort_fp32.model, config.texts))

    timings: dict[str, list[Timed]] = {name: [] for name in runners}
    for runner in runners.values():  # warm-up: first-call allocations, lazy init
        runner.run(config.texts[: config.batch_size])
    pipeline_runs: dict[str, list[Any]] = {}
    for _ in range(config.rounds):
        _round(runners, config.texts, timings)
        for name, result in _pipelines(settings, config, int8_dir).items():
            pipeline_runs.setdefault(name, []).append(result)
    pipelines = {n: min(runs, key=lambda r: r.seconds) for n, runs in pipeline_runs.items()}

    reference = timings["peer"][0].vectors if "peer" in timings else None
    rows: list[Row] = []
    for name, runs in timings.items():
        best = min(runs, key=lambda t: t.seconds)
        row = Row(name, len(config.texts), best.seconds, tokens,
                  runs_s=[round(t.seconds, 3) for t in runs])
        _quality(row, best.vectors, reference)
        rows.append(row)
    for name, result in pipelines.items():
        row = Row(name, result.items, result.seconds, tokens,
                  runs_s=[round(r.seconds, 3) for r in pipeline_runs[name]],
                  offered_per_s=result.offered_per_s, achieved_per_s=result.achieved_per_s,
                  batch_fill=result.mean_batch / config.batch_size,
                  peak_rss_mb=result.peak_rss_mb)
        row.p50_ms, row.p95_ms, row.p99_ms = (
            float(np.percentile(result.latencies_ms, q)) for q in (50, 95, 99))
        _quality(row, result.vectors, reference)
        rows.append(row)
    by_name = {r.row: r for r in rows}
    if "peer" in by_name:
        for row in rows:
            row.vs_peer = row.items_per_s / by_name["peer"].items_per_s
    report = Report(setup=_setup(settings, config, tokens), rows=rows)
    report.targets = _targets(by_name, settings, config)
    return report


def _model_dirs(settings: Settings, config: BenchConfig) -> tuple[Path, Path]:
    if config.model not in find_models(settings.model_dir):
        from embedstream.export import DEFAULT_TEXT_NAME, default_text_checkpoint, export_text_model

        if config.model != DEFAULT_TEXT_NAME:
            raise BenchError(f"model {config.model} not found in {settings.model_dir}: export it")
        export_text_model(default_text_checkpoint(), settings.model_dir, config.model)
    found = find_models(settings.model_dir)
    fp32_dir = found[config.model]
    int8_name = f"{config.model}-int8"
    needs_int8 = any(r.endswith("int8") for r in config.rows)
    if needs_int8 and int8_name not in found:
        from embedstream.export.optimize import quantize_int8

        log.info("quantizing %s to int8 (first run only)", config.model)
        quantize_int8(fp32_dir, int8_name)
    return fp32_dir, settings.model_dir / int8_name


def _round(runners: dict[str, Any], texts: list[str], timings: dict[str, list[Timed]]) -> None:
    for name, runner in runners.items():
        timings[name].append(runner.run(texts))
        log.info("%s: %.2fs", name, timings[name][-1].seconds)


def _pipelines(settings: Settings, config: BenchConfig, int8_dir: Path) -> dict[str, Any]:
    wanted = [r for r in config.rows if r.startswith("pipeline-")]
    if not wanted:
        return {}
    cfg = devstack.DevStackConfig.on_free_ports(Path(".devstack") / "bench")
    results = {}
    with devstack.embedded_stack(cfg):
        base = settings.model_copy(update={
            "kafka_bootstrap": cfg.bootstrap, "redis_url": cfg.redis_url,
        })
        for row in wanted:
            model = int8_dir.name if row.endswith("int8") else config.model
            results[row] = run_pipeline(
                base, model, config.texts, threads=config.threads,
                batch_size=config.batch_size, latency_s=config.latency_s,
            )
            log.info("%s: %.2fs", row, results[row].seconds)
    return results


def _quality(row: Row, vectors: np.ndarray, reference: np.ndarray | None) -> None:
    if reference is None:
        return
    from embedstream.export.optimize import cosine_rows

    cosines = cosine_rows(vectors, reference)
    row.cos_min, row.cos_mean = float(cosines.min()), float(cosines.mean())


def _setup(settings: Settings, config: BenchConfig, tokens: int) -> dict[str, Any]:
    import onnxruntime

    return {
        "model": config.model, "texts": len(config.texts), "inputs": config.source,
        "tokens": tokens, "mean_tokens": round(tokens / len(config.texts), 1),
        "batch_size": config.batch_size, "threads": config.threads,
        "batch_max_wait_ms": settings.batch_max_wait_ms, "rounds": config.rounds,
        "latency_run_s": config.latency_s, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
        "reference": "peer (sentence-transformers fp32)",
    }


def _targets(rows: dict[str, Row], settings: Settings, config: BenchConfig) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def target(text: str, met: bool, figure: str) -> None:
        out.append({"target": text, "met": bool(met), "figure": figure})

    peer, pipe = rows.get("peer"), rows.get("pipeline-fp32")
    if peer and pipe and pipe.cos_min is not None:
        target("pipeline fp32 >= 1.0x peer, cosine >= 0.9999",
               pipe.items_per_s >= peer.items_per_s and pipe.cos_min >= 0.9999,
               f"{pipe.items_per_s / peer.items_per_s:.2f}x, min cosine {pipe.cos_min:.6f}")
    for precision in ("fp32", "int8"):
        raw, full = rows.get(f"ort-{precision}"), rows.get(f"pipeline-{precision}")
        if raw and full:
            ratio = full.items_per_s / raw.items_per_s
            target(f"pipeline {precision} >= 0.9x raw ORT {precision}", ratio >= 0.9,
                   f"{ratio:.2f}x")
    int8 = rows.get("ort-int8")
    if peer and int8 and int8.cos_min is not None and int8.cos_mean is not None:
        target("ORT int8 >= 1.5x peer, mean cosine >= 0.99, min >= 0.98",
               int8.items_per_s >= 1.5 * peer.items_per_s and int8.cos_mean >= 0.99
               and int8.cos_min >= 0.98,
               f"{int8.items_per_s / peer.items_per_s:.2f}x, mean {int8.cos_mean:.4f}, "
               f"min {int8.cos_min:.4f}")
    for precision in ("fp32", "int8"):
        raw, full = rows.get(f"ort-{precision}"), rows.get(f"pipeline-{precision}")
        if raw and full and full.p99_ms is not None:
            batch_ms = 1000 * config.batch_size / raw.items_per_s
            bound = settings.batch_max_wait_ms + 2 * batch_ms
            target(f"pipeline {precision} p99 at half load <= max wait + 2 full batches",
                   full.p99_ms <= bound, f"p99 {full.p99_ms:.0f} ms, bound {bound:.0f} ms "
                   f"({settings.batch_max_wait_ms} + 2 x {batch_ms:.0f})")
    return out
