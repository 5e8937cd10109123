"""``embedstream worker``: consume events, embed them, store them in Redis."""

from __future__ import annotations

import argparse

from embedstream.cli.flags import add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser)  # a service: every setting is a flag


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.worker.service import run_pool

    return run_pool(settings)


COMMANDS = (Command("worker", "consume events, embed them, store them in Redis",
                    add_arguments, run),)
