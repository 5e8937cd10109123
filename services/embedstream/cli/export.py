"""``embedstream export``, ``quantize`` and ``finetune``: make model directories.

The work is in :mod:`embedstream.export`; these print what was made and what to
type next.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from embedstream.cli.flags import add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?",
                        help="text: sentence-transformers / transformers checkpoint dir (default: "
                        "all-MiniLM-L6-v2); image/audio: weights file or transformers dir "
                        "(default: EfficientNet-Lite0 / aiSFX); wordvec: the vectors file")
    parser.add_argument("--kind", choices=["text", "image", "audio", "wordvec"], default="text",
                        help="model family to export (default text)")
    parser.add_argument("--family", help="image: efficientnet-lite | transformers; "
                        "audio: aisfx | transformers")
    parser.add_argument("--format", dest="fmt", default="word2vec",
                        help="wordvec: word2vec | word2vec-text | glove | fasttext | gensim | spacy")
    parser.add_argument("--sif", type=float,
                        help="wordvec: SIF weighting with this 'a' (e.g. 1e-3)")
    parser.add_argument("--name", help="model name (default all-minilm-l6-v2 for the default)")
    parser.add_argument("--pooling", choices=["mean", "cls", "max"], help="override pooling")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    parser.add_argument("--max-length", type=int, help="override the token limit")
    parser.add_argument("--token-mode", action="store_true",
                        help="text: also output per-token contextual vectors (stored beside the "
                        "pooled one as token_embeddings)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model dir")
    parser.add_argument("--no-optimize", action="store_true",
                        help="keep the exporter's graph (default: fuse it for ONNX Runtime)")
    add_settings_flags(parser, ("model_dir",))


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


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="name of an fp32 model under --model-dir")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8",
                           help="int8 dynamic, per-channel weights, for CPUs (the default)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 weights and activations, for GPUs")
    parser.set_defaults(precision="int8")
    parser.add_argument("--name", help="new model name (default <model>-int8 / -fp16)")
    parser.add_argument("--force", action="store_true",
                        help="keep the result even below the gate (int8: mean cosine 0.99, "
                        "min 0.98; fp16: 0.9999, 0.999)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model dir")
    add_settings_flags(parser, ("model_dir",))


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


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=Path, required=True,
                        help='JSONL of {"query": ..., "positive": ...} (optional "negative", '
                        '"group")')
    parser.add_argument("--name", required=True, help="name of the new model directory")
    parser.add_argument("--base", help="sentence-transformers / transformers checkpoint to "
                        "adapt (default: all-MiniLM-L6-v2)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="pairs per step; the rest of the batch are the negatives "
                        "(default 32)")
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="default 2e-5")
    parser.add_argument("--warmup-ratio", type=float, default=0.1,
                        help="share of the steps warming the learning rate up (default 0.1)")
    parser.add_argument("--max-length", type=int,
                        help="token limit for training, measuring and the exported model "
                        "(default: the base's); lower is faster")
    parser.add_argument("--eval-size", type=float, default=0.1,
                        help="held-out pairs: a share below 1, else a count (default 0.1)")
    parser.add_argument("--eval-pairs", type=Path,
                        help="measure on this pairs file instead of a held-out split")
    parser.add_argument("--seed", type=int, default=13,
                        help="seed of the split and of the training (default 13)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: the cores this process may "
                        "use); fewer can be faster on a busy machine")
    parser.add_argument("--force", action="store_true",
                        help="write the model even if it ranks worse than the base (MRR@10)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model dir")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_flags(parser, ("model_dir",))


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


COMMANDS = (
    Command("export", "export a checkpoint to an ONNX model directory",
            add_export_arguments, export_model),
    Command("quantize", "derive an int8 (CPU) or fp16 (GPU) model, with a quality gate",
            add_quantize_arguments, quantize_model),
    Command("finetune", "adapt a text model to your pairs, measure it, export it (ONNX)",
            add_finetune_arguments, finetune_model),
)
