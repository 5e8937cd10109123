"""The small commands: produce, search, export, dev. Each returns an exit code.

The worker and demo have modules of their own; this module keeps the CLI
thin and testable (every function takes settings, never reads the env).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from embedstream.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from embedstream.runtime.loader import LoadedModel


def produce_text(settings: Settings, path: str, *, progress: bool = True) -> int:
    from tqdm import tqdm

    from embedstream.producer import Producer, produce_lines, read_text_events

    stream = sys.stdin if path == "-" else Path(path).open(encoding="utf-8")  # noqa: SIM115
    try:
        with (
            Producer(settings) as producer,
            tqdm(unit="ev", disable=not progress, file=sys.stderr, desc="producing") as bar,
        ):
            sent = produce_lines(producer, read_text_events(stream), bar)
            failed = producer.failed
    finally:
        if stream is not sys.stdin:
            stream.close()
    print(f"sent {sent - failed} events to {settings.topic_text}"
          + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


def produce_files(
    settings: Settings, modality: Literal["image", "audio"], paths: list[str], *,
    form: Literal["inline", "raw", "uri"], model: str | None, progress: bool = True,
) -> int:
    from tqdm import tqdm

    from embedstream.producer import Producer, find_files, produce_files

    files = find_files(paths, modality)
    with (
        Producer(settings) as producer,
        tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr,
             desc=f"producing {modality}") as bar,
    ):
        ids = produce_files(producer, modality, files, form=form, model=model, progress=bar)
        failed = producer.failed
    print(f"sent {len(ids) - failed} {modality} events ({form}) to {settings.topic_for(modality)}"
          + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


def search_text(
    settings: Settings, query: str, *, k: int, model: str | None, as_json: bool,
    all_chunks: bool = False,
) -> int:
    name = model or settings.default_text_model
    return _search(settings, name, lambda m: _load(settings, m).embed_texts([query])[0],
                   repr(query), k, as_json, all_chunks)


def search_example(
    settings: Settings, modality: str, path: Path, *, k: int, model: str | None, as_json: bool,
    all_chunks: bool = False,
) -> int:
    """Search by example: embed an image or audio file with the model, find its neighbours."""
    name = model or (settings.default_image_model if modality == "image"
                     else settings.default_audio_model)
    data = path.read_bytes()

    def embed(served: str) -> np.ndarray:
        loaded = _load(settings, served)
        return (loaded.embed_images([data]) if modality == "image"
                else loaded.embed_audio([data]))[0]

    return _search(settings, name, embed, str(path), k, as_json, all_chunks)


def _load(settings: Settings, name: str) -> LoadedModel:
    from embedstream.runtime.loader import load_models
    from embedstream.runtime.preprocess import Limits

    return load_models(settings.model_dir, [name], providers=settings.providers,
                       threads=settings.intra_op_threads, limits=Limits.from_settings(settings))[name]


def _search(
    settings: Settings, name: str, embed: Callable[[str], np.ndarray], query: str, k: int,
    as_json: bool, all_chunks: bool,
) -> int:
    """Search ``name``'s vectors: the query embedded (``embed(model)``) with the model
    serving ``name`` now, which a promoted rollout may have changed."""
    from embedstream.rollout.query import search_serving
    from embedstream.sinks.redis import connect

    client = connect(settings)
    try:
        name, hits = search_serving(client, settings.key_prefix, name, embed, k,
                                    per_document=not all_chunks,
                                    cluster_search=settings.redis_cluster_search)
    finally:
        client.close()
    if as_json:
        print(json.dumps([{**h.fields, "id": h.id, "score": h.score, "chunk": h.chunk,
                           "chunks": h.chunks, "metadata": h.metadata} for h in hits],
                         indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"no stored items for model {name}")
        return 0
    kind = "chunks" if all_chunks else "documents"
    print(f"nearest {len(hits)} {kind} to {query} ({name}):")
    for rank, hit in enumerate(hits, start=1):
        label = hit.fields.get("text") or hit.metadata.get("path") or hit.id
        where = f" [{hit.id}, chunk {hit.chunk + 1}/{hit.chunks}]" if hit.chunks > 1 else ""
        print(f"{rank:>3}. {hit.score:.4f}  {label}{where}")
    return 0


def gateway(settings: Settings) -> int:
    try:
        from embedstream.gateway import run_gateway
    except ImportError as err:
        raise SystemExit(
            f"embedstream: the gateway needs the 'gateway' extra "
            f"(pip install 'embedstream[gateway]'): {err}"
        ) from err
    return run_gateway(settings)


def make_api_key(args: argparse.Namespace) -> int:
    """Print a new API key (give it to the client) and its keys-file line (for the
    gateway's keys file or Secret; the salted hash unless ``--plain``)."""
    from embedstream.gateway.auth import hash_key, new_key, parse_line

    key = new_key()
    options = [f"scopes={args.scopes}"]
    options += [f"{name}={value}" for name in ("tenant", "rate", "name")
                if (value := getattr(args, name)) is not None]
    line = " ".join([key if args.plain else hash_key(key), *options])
    parse_line(line, "the new key")  # the options are checked as the gateway will
    print(f"key:  {key}")
    print(f"line: {line}")
    return 0


def export_model(settings: Settings, args: argparse.Namespace) -> int:
    kind = getattr(args, "kind", "text")
    if kind != "text":
        return _export_other(settings, args, kind)
    from embedstream.export import default_text_checkpoint, export_text_model

    checkpoint = Path(args.checkpoint) if args.checkpoint else default_text_checkpoint()
    started = time.time()
    directory = export_text_model(
        checkpoint,
        settings.model_dir,
        args.name,
        pooling=args.pooling,
        normalize=False if args.no_normalize else None,
        max_length=args.max_length,
        opset=args.opset,
        overwrite=args.overwrite,
        token_mode=bool(getattr(args, "token_mode", False)),
        optimize=not args.no_optimize,
    )
    _print_export(checkpoint, directory, started)
    return 0


def _print_export(source: object, directory: Path, started: float) -> None:
    """Say what ``embedstream export`` did: wrote ``directory``, or found it already
    holding this very graph (its manifest predates the run: the export left it as it was)."""
    manifest = directory / "manifest.json"
    if manifest.stat().st_mtime < started:
        sha = json.loads(manifest.read_text(encoding="utf-8")).get("sha256", "")
        print(f"{directory} already holds this export of {source} (sha256 {sha[:12]}); "
              "nothing changed")
    else:
        print(f"exported {source} -> {directory}")


def quantize_model(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.export.optimize import convert_fp16, quantize_int8
    from embedstream.models.manifest import find_models

    source = find_models(settings.model_dir).get(args.model)
    if source is None:
        print(f"embedstream: no model {args.model!r} under {settings.model_dir}", file=sys.stderr)
        return 2
    derive = convert_fp16 if args.precision == "fp16" else quantize_int8
    directory, report = derive(source, args.name, force=args.force, overwrite=args.overwrite)
    print(f"quantized {args.model} -> {directory} ({args.precision}; cosine to fp32 mean "
          f"{report.mean_cosine:.4f}, min {report.min_cosine:.4f})")
    return 0


def finetune_model(settings: Settings, args: argparse.Namespace) -> int:
    """``embedstream finetune``: 0 when written, 3 when refused as worse than the base."""
    from embedstream.export.finetune import (
        REPORT_FILE,
        FinetuneRefused,
        FinetuneSettings,
        finetune,
        format_report,
    )

    config = FinetuneSettings(
        pairs=args.pairs, name=args.name, model_dir=settings.model_dir, base=args.base,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio, max_length=args.max_length, eval_size=args.eval_size,
        eval_pairs=args.eval_pairs, seed=args.seed, threads=args.threads, force=args.force,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    try:
        result = finetune(config)
    except FinetuneRefused as refused:
        print(json.dumps(refused.report, indent=2) if args.json else format_report(refused.report))
        print(f"embedstream: refused: {refused}.\nTo write it anyway, run:\n  "
              f"{_finetune_command(args)} --force", file=sys.stderr)
        return 3
    print(json.dumps(result.report, indent=2) if args.json else format_report(result.report))
    if not args.json:
        print(f"wrote {result.directory} (report: {result.directory / REPORT_FILE})")
    return 0


def _finetune_command(args: argparse.Namespace) -> str:
    """The command line that ran (``args.argv``, set by the CLI), for a suggestion."""
    import shlex

    argv = getattr(args, "argv", None) or ["finetune", "--pairs", str(args.pairs),
                                           "--name", args.name]
    return shlex.join(["embedstream", *argv])


def replay(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.replay import redrive_dead_letters, reembed_range

    if args.what == "dlq":
        report = redrive_dead_letters(
            settings, reasons=set(args.reason or ()), dry_run=args.dry_run
        )
        verb = "would re-drive" if args.dry_run else "re-drove"
        count = sum(report.by_reason.values())
        print(f"{verb} {count} dead letters from {settings.topic_dlq}"
              f" ({', '.join(f'{r}: {n}' for r, n in sorted(report.by_reason.items())) or 'none'});"
              f" {report.skipped} skipped (other reasons), {report.already} re-driven before"
              + (f", {report.unrecoverable} too large to copy and gone from their topic"
                 if report.unrecoverable else ""))
        return 0
    report = reembed_range(settings, args.topic, args.model, partitions=args.partition,
                           start=args.from_offset, end=args.to_offset)
    print(f"re-published {report.published} events of {args.topic} for model {args.model};"
          f" {report.skipped} skipped (not envelopes)")
    return 0


def _export_other(settings: Settings, args: argparse.Namespace, kind: str) -> int:
    started = time.time()
    if kind == "image":
        from embedstream.export.image import export_image_model

        directory = export_image_model(args.checkpoint, settings.model_dir, args.name,
                                       family=args.family or "efficientnet-lite",
                                       opset=args.opset, overwrite=args.overwrite)
    elif kind == "audio":
        from embedstream.export.audio import export_audio_model

        directory = export_audio_model(args.checkpoint, settings.model_dir, args.name,
                                       family=args.family or "aisfx", opset=args.opset,
                                       overwrite=args.overwrite)
    else:
        from embedstream.export.wordvec import export_wordvec_model

        if not args.checkpoint:
            raise SystemExit("embedstream export --kind wordvec: name the vectors file")
        directory = export_wordvec_model(args.checkpoint, settings.model_dir, args.name,
                                         fmt=args.fmt, sif=args.sif,
                                         normalize=not args.no_normalize, overwrite=args.overwrite)
    _print_export(args.checkpoint or kind + " default", directory, started)
    return 0


def dev(action: str, broker_port: int, redis_port: int, state_dir: Path,
        redis_shards: int = 1) -> int:
    from embedstream import devstack

    cfg = devstack.DevStackConfig.with_shards(
        redis_shards, broker_port=broker_port, redis_port=redis_port, state_dir=state_dir
    )
    if action == "up":
        status = devstack.up(cfg)
    elif action == "down":
        devstack.down(cfg)
        status = devstack.status(cfg)
    else:
        status = devstack.status(cfg)
    print(status.format())
    if action == "down":
        return 0
    return 0 if status.ok else 1
