"""``embedstream replay dlq|topic``: re-drive dead letters, re-embed a topic range."""

from __future__ import annotations

import argparse

from embedstream.cli.flags import CONNECTION, add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    replay_sub = parser.add_subparsers(dest="what", required=True)
    redrive = replay_sub.add_parser("dlq", help="publish dead letters back to their source topics")
    redrive.add_argument("--reason", action="append", help="only this reason (repeatable)")
    redrive.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    add_settings_flags(redrive, CONNECTION)
    reembed = replay_sub.add_parser("topic", help="re-publish a topic range for another model")
    reembed.add_argument("topic", help="input topic to read")
    reembed.add_argument("--model", required=True, help="model (version) to embed with")
    reembed.add_argument("--partition", type=int, action="append", help="default: all")
    reembed.add_argument("--from-offset", type=int, default=0)
    reembed.add_argument("--to-offset", type=int, help="exclusive; default: the end")
    add_settings_flags(reembed, CONNECTION)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.replay import redrive_dead_letters, reembed_range

    if args.what == "dlq":
        report = redrive_dead_letters(
            settings.kafka, reasons=set(args.reason or ()), dry_run=args.dry_run
        )
        verb = "would re-drive" if args.dry_run else "re-drove"
        count = sum(report.by_reason.values())
        print(f"{verb} {count} dead letters from {settings.topic_dlq}"
              f" ({', '.join(f'{r}: {n}' for r, n in sorted(report.by_reason.items())) or 'none'});"
              f" {report.skipped} skipped (other reasons), {report.already} re-driven before"
              + (f", {report.unrecoverable} too large to copy and gone from their topic"
                 if report.unrecoverable else ""))
        return 0
    report = reembed_range(settings.kafka, args.topic, args.model, partitions=args.partition,
                           start=args.from_offset, end=args.to_offset)
    print(f"re-published {report.published} events of {args.topic} for model {args.model};"
          f" {report.skipped} skipped (not envelopes)")
    return 0


COMMANDS = (Command("replay", "re-drive dead letters, re-embed a topic range",
                    add_arguments, run),)
