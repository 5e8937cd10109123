"""``embedstream gateway`` (the HTTP ingest and search service) and ``embedstream api-key``."""

from __future__ import annotations

import argparse

from embedstream.cli.flags import add_setting_alias, add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    # The short spellings the README, compose and the chart use; each sets its setting.
    add_setting_alias(parser, "--host", "gateway_host")
    add_setting_alias(parser, "--port", "gateway_port")
    add_setting_alias(parser, "--api-keys-file", "gateway_api_keys_file")
    add_setting_alias(parser, "--allow-anonymous", "gateway_allow_anonymous",
                      action="store_const", const=True,
                      help="serve a non-loopback address without API keys, on purpose "
                      "[EMBEDSTREAM_GATEWAY_ALLOW_ANONYMOUS]")
    add_setting_alias(parser, "--no-search", "gateway_search", action="store_const", const=False,
                      help="ingest only: load no models [EMBEDSTREAM_GATEWAY_SEARCH=false]")
    add_settings_flags(parser)  # a service: every setting is a flag


def run_gateway(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from embedstream.gateway import run_gateway
    except ImportError as err:
        raise SystemExit(
            f"embedstream: the gateway needs the 'gateway' extra "
            f"(pip install 'embedstream[gateway]'): {err}"
        ) from err
    return run_gateway(settings)


def add_api_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scopes", default="ingest,search",
                        help="comma-separated: ingest, search, admin (default ingest,search)")
    parser.add_argument("--tenant", help="bind the key to this tenant")
    parser.add_argument("--name", help="a label for logs (never the key)")
    parser.add_argument("--rate", type=float, help="requests per second (default: the gateway's)")
    parser.add_argument("--plain", action="store_true",
                        help="print the line with the key itself instead of its salted hash")


def make_api_key(settings: Settings, args: argparse.Namespace) -> int:
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


COMMANDS = (
    Command("gateway", "HTTP ingest gateway, search API and search page",
            add_gateway_arguments, run_gateway),
    Command("api-key", "make a gateway API key and its keys-file line",
            add_api_key_arguments, make_api_key),
)
