"""The ``embedstream`` command: its parser, built from the command registry, and
``main``, the only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import sys

from embedstream import __version__
from embedstream.cli import bench, dev, export, gateway, produce, replay, rollout, search, worker
from embedstream.cli.flags import add_settings_flags, settings_from_args
from embedstream.cli.registry import Command
from embedstream.errors import EmbedstreamError

# Every command, in the order ``embedstream --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    *worker.COMMANDS, *produce.COMMANDS, *search.COMMANDS, *gateway.COMMANDS,
    *export.COMMANDS, *bench.COMMANDS, *replay.COMMANDS, *rollout.COMMANDS, *dev.COMMANDS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedstream",
        description="Real-time embeddings: Kafka events in, ONNX Runtime workers, Redis vectors out.",
    )
    parser.add_argument("--version", action="version", version=f"embedstream {__version__}")
    add_settings_flags(parser, ("log_level",))
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to suggest a command line back
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # kafka-python logs every connection at INFO; keep its warnings only.
        logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return int(args.run(settings, args) or 0)
    except EmbedstreamError as err:
        print(f"embedstream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
