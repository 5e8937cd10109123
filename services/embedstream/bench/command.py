"""One bench run: the same inputs through every row, in one process, interleaved.

Each round runs every row in turn (peer, raw ORT per precision, then the
pipeline rows); each row keeps its best round, the least disturbed by other
load on the machine, and the JSON keeps every round's time. Quality is the
cosine to the fp32 PyTorch reference (the peer's own vectors). What differs
per modality (texts, images, audio clips) is in :mod:`.modalities`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.bench.inputs import file_texts, generated_texts
from embedstream.bench.modalities import MODALITIES, Modality, Work, model_dirs
from embedstream.bench.pipeline import bench_stack, run_pipeline, stack_pids
from embedstream.bench.report import Report, Row
from embedstream.bench.rows import OrtRow, Runner, Timed
from embedstream.bench.soak import SoakConfig, run_soak
from embedstream.errors import BenchError
from embedstream.runtime.onnx import default_threads
from embedstream.settings import Settings
from embedstream.worker.service import instances_per_process

log = logging.getLogger(__name__)

ROWS = MODALITIES["text"].rows


@dataclass(frozen=True, slots=True)
class BenchConfig:
    inputs: list[Any]
    """Texts, or encoded image / audio files."""
    source: str
    batch_size: int
    threads: int
    rows: tuple[str, ...]
    rounds: int
    latency_s: float
    model: str
    modality: str = "text"

    @property
    def spec(self) -> Modality:
        return MODALITIES[self.modality]


def run_bench_command(settings: Settings, args: argparse.Namespace) -> int:
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the worker process and the
    # embedded stack the bench started are stopped by their ``finally`` blocks.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.clients:
        from embedstream.bench.clients import run_clients_command

        return run_clients_command(settings, args)
    if getattr(args, "embeddings", False):
        from embedstream.bench.embeddings import run_embeddings_command

        return run_embeddings_command(settings, args)
    if args.store:
        from embedstream.bench.store import run_store_command

        return run_store_command(settings, args)
    if args.soak is not None:
        return _soak_command(settings, args)
    if args.memory:
        return _memory_command(settings, args)
    if args.documents is not None:
        return _documents_command(settings, args)
    config = _config(settings, args)
    report = run_bench(settings, config)
    print(report.table())
    print()
    if breakdown := report.breakdown_text():
        print(breakdown)
        print()
    print(report.targets_text())
    if args.json:
        report.write_json(args.json)
        print(f"\nwrote {args.json}")
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _soak_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.modality != "text":
        raise BenchError("--soak runs text events; leave out --modality")
    if args.soak <= 0 or args.soak_rate <= 0 or args.soak_sample_s <= 0:
        raise BenchError("--soak, --soak-rate and --soak-sample-s must be positive")
    count = max(1, int(args.soak * args.soak_rate))
    if args.file:
        own = file_texts(args.file)
        texts = [own[i % len(own)] for i in range(count)]
    else:
        texts = generated_texts(count, args.seed)
    model = args.model or settings.default_text_model
    model_dirs(settings, MODALITIES["text"], model, ("pipeline-fp32",))
    config = SoakConfig(
        texts=texts, model=model, rate=args.soak_rate, duration_s=args.soak,
        sample_s=args.soak_sample_s, warmup_s=min(60.0, args.soak / 5), batch_size=args.batch_size,
        threads=args.threads or settings.intra_op_threads or default_threads(),
    )
    result = run_soak(settings, config)
    target = result.target()
    print(result.summary())
    print(f"[{'met ' if target['met'] else 'MISS'}] {target['target']}: {target['figure']}")
    if args.json:
        data = {"setup": {"model": model, "rate": config.rate, "duration_s": config.duration_s,
                          "sample_s": config.sample_s, "warmup_s": config.warmup_s,
                          "threads": config.threads, "batch_size": config.batch_size},
                "soak": result.as_dict(), "targets": [target]}
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def _documents_command(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.bench.documents import MODES, generated_documents, run_documents, table

    if args.modality != "text" or args.documents <= 0:
        raise BenchError("--documents N runs N (> 0) text documents; leave out --modality")
    model = args.model or settings.default_text_model
    model_dirs(settings, MODALITIES["text"], model, ("pipeline-fp32",))
    if args.file:
        documents = file_texts(args.file, args.documents)
    else:
        documents = generated_documents(args.documents, args.seed)
    threads = args.threads or settings.intra_op_threads or default_threads()
    runs = []
    with bench_stack("documents") as stack:
        local = settings.model_copy(update={"kafka_bootstrap": stack.bootstrap,
                                            "redis_url": stack.redis_url})
        for mode in MODES:
            log.info("documents: %d through a worker with text_overflow=%s", len(documents), mode)
            runs.append(run_documents(local, model, documents, mode, threads=threads,
                                      batch_size=args.batch_size))
    print(table(runs))
    if args.json:
        data = {"setup": {"model": model, "documents": len(documents), "threads": threads,
                          "batch_size": args.batch_size,
                          "source": str(args.file) if args.file else f"generated, seed {args.seed}"},
                "documents": [r.as_dict() for r in runs]}
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def _memory_command(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.bench.memory import MemoryConfig, per_model_text, run_memory, table

    if args.modality != "text":
        raise BenchError("--memory compares text workers with sentence-transformers; "
                         "leave out --modality")
    model = args.model or settings.default_text_model
    model_dirs(settings, MODALITIES["text"], model, ("ort-fp32",))
    config = MemoryConfig(
        model_dir=settings.model_dir, model=model,
        threads=args.threads or settings.intra_op_threads or default_threads(),
        batch_size=MODALITIES["text"].smoke_batch if args.smoke else args.batch_size,
        texts=MODALITIES["text"].smoke_count if args.smoke else args.texts, seed=args.seed,
        all_models=args.memory_models == "all",
    )
    rows, targets = run_memory(config)
    print(table(rows))
    if costs := per_model_text(rows):
        print()
        print(costs)
    print()
    for t in targets:
        print(f"[{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['figure']}")
    if args.json:
        from dataclasses import asdict

        data = {"setup": {"model": model, "threads": config.threads, "texts": config.texts,
                          "batch_size": config.batch_size, "seed": config.seed},
                "rows": [asdict(r) for r in rows], "targets": targets}
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def _config(settings: Settings, args: argparse.Namespace) -> BenchConfig:
    spec = MODALITIES[args.modality]
    count = spec.smoke_count if args.smoke else getattr(args, spec.count_arg)
    rows = tuple(args.rows or spec.rows)
    unknown = sorted(set(rows) - set(spec.rows))
    if unknown:
        raise BenchError(f"unknown {args.modality} bench rows {unknown}; "
                         f"known: {', '.join(spec.rows)}")
    if args.file:
        inputs, source = spec.read_file(args.file, count if args.smoke else None), str(args.file)
    else:
        inputs, source = spec.generate(count, args.seed), f"generated (seed {args.seed})"
    return BenchConfig(
        inputs=inputs, source=source,
        batch_size=spec.smoke_batch if args.smoke else args.batch_size,
        threads=args.threads or settings.intra_op_threads or default_threads(),
        rows=rows, rounds=1 if args.smoke else max(1, args.rounds),
        latency_s=3.0 if args.smoke else args.latency_s,
        model=args.model or spec.default_model(settings), modality=args.modality,
    )


def run_bench(settings: Settings, config: BenchConfig) -> Report:
    fp32_dir, int8_dir = model_dirs(settings, config.spec, config.model, config.rows)
    runners: dict[str, Runner] = {}
    if "peer" in config.rows:
        runners["peer"] = config.spec.peer(fp32_dir, config.threads, config.batch_size)
    ort_fp32 = OrtRow(fp32_dir, config.threads, config.batch_size, config.modality)
    if "ort-fp32" in config.rows:
        runners["ort-fp32"] = ort_fp32
    if "ort-int8" in config.rows:
        runners["ort-int8"] = OrtRow(int8_dir, config.threads, config.batch_size, config.modality)
    work = config.spec.measure(ort_fp32.model, config.inputs)

    timings: dict[str, list[Timed]] = {name: [] for name in runners}
    for runner in runners.values():  # warm-up: first-call allocations, lazy init
        runner.run(config.inputs[: config.batch_size])
    pipeline_runs: dict[str, list[Any]] = {}
    for _ in range(config.rounds):
        _round(runners, config.inputs, timings)
        for name, result in _pipelines(settings, config, int8_dir).items():
            pipeline_runs.setdefault(name, []).append(result)
    pipelines = {n: min(runs, key=lambda r: r.seconds) for n, runs in pipeline_runs.items()}

    reference = timings["peer"][0].vectors if "peer" in timings else None
    rows: list[Row] = []
    for name, runs in timings.items():
        best = min(runs, key=lambda t: t.seconds)
        row = Row(name, len(config.inputs), best.seconds, work.tokens, work.audio_seconds,
                  runs_s=[round(t.seconds, 3) for t in runs])
        _quality(row, best.vectors, reference)
        rows.append(row)
    for name, result in pipelines.items():
        row = Row(name, result.items, result.seconds, work.tokens, work.audio_seconds,
                  runs_s=[round(r.seconds, 3) for r in pipeline_runs[name]],
                  offered_per_s=result.offered_per_s, achieved_per_s=result.achieved_per_s,
                  batch_fill=result.mean_batch / config.batch_size,
                  peak_rss_mb=result.peak_rss_mb, breakdown=dict(result.breakdown))
        raw = runners.get(name.replace("pipeline-", "ort-"))
        if isinstance(raw, OrtRow) and config.modality == "text" and row.breakdown:
            row.breakdown["raw_padded_tokens"] = raw.padded_cost
        row.p50_ms, row.p95_ms, row.p99_ms = (
            float(np.percentile(result.latencies_ms, q)) for q in (50, 95, 99))
        _quality(row, result.vectors, reference)
        rows.append(row)
    by_name = {r.row: r for r in rows}
    if "peer" in by_name:
        for row in rows:
            row.vs_peer = row.items_per_s / by_name["peer"].items_per_s
    report = Report(setup=_setup(settings, config, work, timings), rows=rows)
    report.targets = _targets(by_name, settings, config)
    return report


def _round(runners: dict[str, Runner], inputs: list[Any],
           timings: dict[str, list[Timed]]) -> None:
    for name, runner in runners.items():
        timings[name].append(runner.run(inputs))
        log.info("%s: %.2fs", name, timings[name][-1].seconds)


def _pipelines(settings: Settings, config: BenchConfig, int8_dir: Path) -> dict[str, Any]:
    wanted = [r for r in config.rows if r.startswith("pipeline-")]
    if not wanted:
        return {}
    results = {}
    with bench_stack("bench") as stack:
        base = settings.model_copy(update={
            "kafka_bootstrap": stack.bootstrap, "redis_url": stack.redis_url,
        })
        for row in wanted:
            model = int8_dir.name if row.endswith("int8") else config.model
            results[row] = run_pipeline(
                base, model, config.inputs, modality=config.modality, threads=config.threads,
                batch_size=config.batch_size, latency_s=config.latency_s,
                stack_pids=stack_pids(stack),
            )
            log.info("%s: %.2fs", row, results[row].seconds)
    return results


def _quality(row: Row, vectors: np.ndarray, reference: np.ndarray | None) -> None:
    if reference is None:
        return
    from embedstream.export.optimize import cosine_rows

    cosines = cosine_rows(vectors, reference)
    row.cos_min, row.cos_mean = float(cosines.min()), float(cosines.mean())


def _setup(
    settings: Settings, config: BenchConfig, work: Work, timings: dict[str, list[Timed]]
) -> dict[str, Any]:
    import onnxruntime

    setup = {
        "modality": config.modality, "model": config.model, **work.facts,
        "inputs": config.source, "batch_size": config.batch_size, "threads": config.threads,
        "batch_max_wait_ms": settings.batch_max_wait_ms,
        "batch_max_tokens": settings.batch_max_tokens,
        "inference_instances": instances_per_process(settings, config.threads),
        "rounds": config.rounds,
        "latency_run_s": config.latency_s, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
        "reference": config.spec.reference,
        "timing": "in-process rows time preprocessing and inference together",
    }
    if timings.get("ort-fp32"):  # how much of the raw row's time was preprocessing
        best = min(timings["ort-fp32"], key=lambda t: t.seconds)
        setup["ort_fp32_preprocess_s"] = round(best.prepare_seconds or 0.0, 3)
        setup["ort_fp32_s"] = round(best.seconds, 3)
    return setup


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
