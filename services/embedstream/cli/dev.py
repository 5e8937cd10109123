"""``embedstream dev up|down|status`` (the embedded stack) and ``embedstream demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from embedstream.cli.flags import add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--broker-port", type=int, default=9092)
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--redis-shards", type=int, default=1,
                        help="up: a Redis Cluster of this many masters (ports --redis-port, +1, "
                        "...; cluster bus ports 10000 above); 1 (default): one server")
    parser.add_argument("--state-dir", type=Path, default=Path(".devstack"),
                        help="pid files, data and logs (default .devstack)")


def run_dev(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream import devstack

    cfg = devstack.DevStackConfig.with_shards(
        args.redis_shards, broker_port=args.broker_port, redis_port=args.redis_port,
        state_dir=args.state_dir,
    )
    if args.action == "up":
        status = devstack.up(cfg)
    elif args.action == "down":
        devstack.down(cfg)
        status = devstack.status(cfg)
    else:
        status = devstack.status(cfg)
    print(status.format())
    if args.action == "down":
        return 0
    return 0 if status.ok else 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=300, help="sample events to send")
    add_settings_flags(parser, ("model_dir",))


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.demo import run_demo

    return run_demo(settings, events=args.events)


COMMANDS = (
    Command("dev", "the embedded development stack (broker + Redis)", add_dev_arguments, run_dev),
    Command("demo", "run the whole pipeline end to end on the embedded stack",
            add_demo_arguments, run_demo),
)
