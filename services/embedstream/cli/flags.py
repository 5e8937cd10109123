"""Command-line flags derived from :class:`~embedstream.settings.Settings`.

Every setting has one name, one flag, one environment variable and one
description: the field ``batch_max_items`` is ``--batch-max-items`` and
``EMBEDSTREAM_BATCH_MAX_ITEMS``, and its help is the field's description. A
command adds the settings it uses (the services add all of them); a flag that is
set overrides the environment, an unset one leaves it in force.

Secrets (``SecretStr`` fields) get no flag: a command line is visible to every
user of the machine (``ps``). They come from the environment or from
``EMBEDSTREAM_<NAME>_FILE``.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from embedstream.settings import Settings

# The namespace attribute of a settings flag: "setting:<field>", so a command's own
# arguments (``--model``, ``--json``...) can never be taken for a setting.
_DEST = "setting:"

# The settings most commands share: where the broker and Redis are, where the models are
# and how they run.
CONNECTION = ("kafka_bootstrap", "redis_url")
MODELS = ("model_dir", "providers", "intra_op_threads", "inference_instances")


def setting_dest(name: str) -> str:
    """The argparse destination of the setting ``name``'s flag."""
    return _DEST + name


def _flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser,
                       names: Iterable[str] | None = None) -> None:
    """Add a flag for each setting in ``names`` (default: every setting but secrets)."""
    fields = Settings.model_fields
    wanted = list(fields) if names is None else list(names)
    group = parser.add_argument_group(
        "settings", "each overrides its EMBEDSTREAM_* environment variable (README: Configuration)")
    for name in wanted:
        field = fields[name]  # KeyError: a command names a setting that does not exist
        if _is_secret(field.annotation):
            if names is not None:
                raise ValueError(f"{name} is a secret: it has no flag")
            continue
        group.add_argument(_flag_of(name), dest=setting_dest(name), **_argument(name, field))


def add_setting_alias(parser: argparse.ArgumentParser, flag: str, name: str,
                      **kwargs: Any) -> None:
    """A command's own spelling of a setting (``gateway --port``); it sets the same field."""
    field = Settings.model_fields[name]
    options = {**_argument(name, field), **kwargs}
    parser.add_argument(flag, dest=setting_dest(name), **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the settings flags that were given."""
    overrides = {key[len(_DEST):]: value for key, value in vars(args).items()
                 if key.startswith(_DEST)}
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise SystemExit(f"embedstream: invalid settings:\n{err}") from err


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    annotation = _unwrap_optional(field.annotation)
    help_text = (field.description or "").replace("%", "%%")
    default = field.default if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
    options: dict[str, Any] = {
        "help": f"{help_text} [EMBEDSTREAM_{name.upper()}; default {_show(default)}]",
        # An unset flag leaves no attribute: the environment stays in force, and a
        # subcommand's unset flag cannot undo the same flag given before the command.
        "default": argparse.SUPPRESS,
    }
    origin = typing.get_origin(annotation)
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        options["choices"] = list(typing.get_args(annotation))
        options["metavar"] = "{" + ",".join(str(c) for c in options["choices"]) + "}"
    elif origin is list:
        options["type"] = _comma_list
        options["metavar"] = "A,B,..."
    elif origin is dict:
        options["type"] = _json_object
        options["metavar"] = "JSON"
    elif annotation in _SCALARS:
        options["type"] = annotation
        options["metavar"] = _SCALARS[annotation]
    else:
        options["metavar"] = "TOPIC" if name.startswith("topic_") else name.rsplit("_", 1)[-1].upper()
    return options


_SCALARS: dict[Any, str] = {int: "N", float: "X", Path: "PATH"}  # type -> metavar


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_secret(annotation: Any) -> bool:
    annotation = _unwrap_optional(annotation)
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def _show(default: Any) -> str:
    if default is None or default == [] or default == {}:
        return "unset"
    if isinstance(default, list):
        return ",".join(str(v) for v in default)
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)
