"""``embedstream produce text|image|audio``: publish events to Kafka."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from embedstream.cli.flags import CONNECTION, add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    produce_sub = parser.add_subparsers(dest="modality", required=True)
    text = produce_sub.add_parser("text", help="plain lines or JSONL envelopes")
    text.add_argument("path", help="file to read, or - for standard input")
    text.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_flags(text, CONNECTION)
    for modality in ("image", "audio"):
        files = produce_sub.add_parser(modality, help=f"{modality} files and directories (recursive)")
        files.add_argument("paths", nargs="+", help="files, or directories to walk")
        files.add_argument("--form", choices=["inline", "raw", "uri"], default="inline",
                           help="inline: base64 in the envelope (default); raw: the record value "
                           "is the file; uri: a file:// claim check (the worker needs uri_roots)")
        files.add_argument("--model", help=f"model to embed with (default: the {modality} default)")
        files.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_settings_flags(files, CONNECTION)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.modality == "text":
        return produce_text(settings, args.path, progress=not args.no_progress)
    return produce_files(settings, args.modality, args.paths, form=args.form,
                         model=args.model, progress=not args.no_progress)


def produce_text(settings: Settings, path: str, *, progress: bool = True) -> int:
    from tqdm import tqdm

    from embedstream.producer import Producer, produce_lines, read_text_events

    stream = sys.stdin if path == "-" else Path(path).open(encoding="utf-8")  # noqa: SIM115
    try:
        with (
            Producer(settings.kafka) as producer,
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
        Producer(settings.kafka) as producer,
        tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr,
             desc=f"producing {modality}") as bar,
    ):
        ids = produce_files(producer, modality, files, form=form, model=model, progress=bar)
        failed = producer.failed
    print(f"sent {len(ids) - failed} {modality} events ({form}) to {settings.topic_for(modality)}"
          + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


COMMANDS = (Command("produce", "publish events to Kafka", add_arguments, run),)
