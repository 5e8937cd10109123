"""``embedstream rollout ...`` and ``embedstream models announce``: thin over
:mod:`embedstream.rollout.lifecycle`.

Exit codes: 0 done, 2 refused (wrong state, unknown model, workers not answering).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from embedstream.cli.flags import CONNECTION, add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_rollout_arguments(rollout: argparse.ArgumentParser) -> None:
    actions = rollout.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="serve NEW beside OLD (dual writes) and backfill "
                               "OLD's history into NEW")
    start.add_argument("new", help="the new model (in the model store)")
    start.add_argument("--replaces", required=True, metavar="OLD", help="the model it replaces")
    start.add_argument("--no-backfill", action="store_true",
                       help="record and announce only; run 'rollout backfill NEW' elsewhere "
                       "(a Kubernetes Job, say)")
    start.add_argument("--promote", action="store_true",
                       help="promote NEW as soon as the backfill is done")
    backfill = actions.add_parser("backfill", help="run (or resume) the backfill of NEW")
    backfill.add_argument("new")
    for p in (start, backfill):
        p.add_argument("--rate", type=float,
                       help="most records/s the backfill re-embeds, 0: no limit "
                       "[EMBEDSTREAM_ROLLOUT_BACKFILL_RATE]")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    status = actions.add_parser("status", help="rollouts: state, progress, who and when")
    status.add_argument("new", nargs="?", help="only this rollout")
    status.add_argument("--json", action="store_true", help="print JSON")
    promote = actions.add_parser("promote", help="answer queries for OLD from NEW (atomic); "
                                 "stop dual writes; OLD's vectors go after the grace period")
    promote.add_argument("new")
    promote.add_argument("--force", action="store_true",
                         help="promote before the backfill finished (a partial index)")
    abort = actions.add_parser("abort", help="stop a rollout under way and drop NEW's vectors")
    abort.add_argument("new")
    for p in (start, backfill, status, promote, abort):
        add_settings_flags(p, (*CONNECTION, "model_dir"))


def add_models_arguments(models: argparse.ArgumentParser) -> None:
    what = models.add_subparsers(dest="action", required=True)
    announce = what.add_parser("announce", help="serve a model of the store on every running "
                               "worker, without a restart")
    announce.add_argument("name")
    add_settings_flags(announce, (*CONNECTION, "model_dir"))


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.rollout import lifecycle
    from embedstream.sinks.redis import connect

    client = connect(settings.redis)
    try:
        if args.command == "models":
            generation = lifecycle.announce(settings, client, args.name)
            print(f"{args.name} announced (generation {generation}); every live worker serves it")
            return 0
        if args.action == "start":
            return _start(settings, client, args)
        if args.action == "backfill":
            return _backfill(settings, args.new, args.rate, not args.no_progress)
        if args.action == "promote":
            record = lifecycle.promote(settings, client, args.new, force=args.force)
            print(f"promoted {record['new']}: queries for {record['old']} answer from "
                  f"{record['new']}; {record['old']}'s vectors go at "
                  f"{_when(record['drop_old_after'])}")
            return 0
        if args.action == "abort":
            record = lifecycle.abort(settings, client, args.new)
            print(f"aborted {record['new']}: {record['old']} serves alone; "
                  f"{record['new']}'s vectors dropped")
            return 0
        return _status(settings, client, args.new, args.json)
    finally:
        client.close()


def _start(settings: Settings, client: Any, args: argparse.Namespace) -> int:
    from embedstream.rollout import lifecycle

    record = lifecycle.start(settings, client, args.new, args.replaces)
    print(f"rollout of {args.new} replacing {args.replaces} started: every live worker "
          "embeds new events with both", file=sys.stderr)
    if args.no_backfill:
        print(f"run 'embedstream rollout backfill {args.new}' to re-embed the history")
        return 0
    code = _backfill(settings, record["new"], args.rate, not args.no_progress)
    if code == 0 and args.promote:
        promoted = lifecycle.promote(settings, client, args.new)
        print(f"promoted {promoted['new']}")
    return code


def _backfill(settings: Settings, new: str, rate: float | None, show: bool) -> int:
    from tqdm import tqdm

    from embedstream.rollout.backfill import run_backfill

    with tqdm(unit="rec", desc=f"backfilling {new}", disable=not show, file=sys.stderr) as bar:
        def tick(p: dict[str, Any]) -> None:
            bar.total = p["total"]
            bar.n = p["backfilled"]
            bar.refresh()

        result = run_backfill(settings, new, rate=rate, on_tick=tick)
    print(f"backfill of {new}: {result.backfilled}/{result.total} records, "
          f"{result.seconds:.1f}s; rollout {result.state}")
    return 0 if result.state in ("ready", "promoted") else 1


def _status(settings: Settings, client: Any, new: str | None, as_json: bool) -> int:
    from embedstream.rollout import lifecycle
    from embedstream.rollout.lifecycle import drop_due
    from embedstream.rollout.state import read_control

    drop_due(settings, client, read_control(client, settings.key_prefix))
    rollouts = [r for r in lifecycle.summaries(settings, client) if new in (None, r["new"])]
    if new is not None and not rollouts:
        print(f"embedstream: no rollout of {new}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(rollouts[0] if new else rollouts, indent=2))
        return 0
    if not rollouts:
        print("no rollouts")
    for r in rollouts:
        eta = "" if r["eta_s"] in (None, 0) else f", ETA {r['eta_s']:.0f}s"
        print(f"{r['new']} replacing {r['old']} ({r['modality']}): {r['state']}; backfilled "
              f"{r['backfilled']}/{r['total']} at {r['rate']}/s{eta}")
        for h in r["history"]:
            extra = {k: v for k, v in h.items() if k not in ("action", "by", "at")}
            print(f"  {_when(h['at'])}  {h['action']:<10} by {h['by']}"
                  + (f" {extra}" if extra else ""))
        if r["state"] == "promoted":
            print(f"  {r['old']}'s vectors: " + ("dropped" if r["old_dropped"]
                                                 else f"kept until {_when(r['drop_old_after'])}"))
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


COMMANDS = (
    Command("rollout", "put a new model into the running pipeline: dual writes, backfill, "
            "atomic promotion", add_rollout_arguments, run),
    Command("models", "the model set of running workers", add_models_arguments, run),
)
