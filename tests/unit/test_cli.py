"""The command line: every command comes from the registry, every setting has one
flag (named after its field, documented with its variable), and only those flags
are taken for settings."""

from __future__ import annotations

import argparse

import pytest
from pydantic import SecretStr

from embedstream.cli import main
from embedstream.cli.app import COMMANDS, build_parser
from embedstream.cli.flags import setting_dest, settings_from_args
from embedstream.settings import Settings


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _secret(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return annotation in (SecretStr, SecretStr | None) or "SecretStr" in str(annotation)


@pytest.mark.parametrize("service", ["worker", "gateway"])
def test_every_setting_but_the_secrets_is_a_flag_of_the_services(service):
    options = _subparser(build_parser(), service)._option_string_actions
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if _secret(name):
            assert flag not in options, f"{flag} would show a secret in ps"
            continue
        assert flag in options, flag
        action = options[flag]
        assert action.dest == setting_dest(name)
        assert f"EMBEDSTREAM_{name.upper()}" in action.help
        assert (field.description or "")[:30].replace("%", "%%") in action.help


def test_a_flag_overrides_the_environment_and_an_unset_flag_leaves_it(monkeypatch):
    monkeypatch.setenv("EMBEDSTREAM_BATCH_MAX_ITEMS", "7")
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["worker"])).batch_max_items == 7
    settings = settings_from_args(parser.parse_args(["worker", "--batch-max-items", "9"]))
    assert settings.batch_max_items == 9


def test_a_setting_given_before_the_command_is_kept(monkeypatch):
    monkeypatch.delenv("EMBEDSTREAM_LOG_LEVEL", raising=False)
    parser = build_parser()
    for argv in (["--log-level", "DEBUG", "worker"], ["worker", "--log-level", "DEBUG"],
                 ["--log-level", "DEBUG", "search", "q"]):
        assert settings_from_args(parser.parse_args(argv)).log_level == "DEBUG", argv
    assert settings_from_args(parser.parse_args(["worker"])).log_level == "INFO"


def test_flags_of_each_kind_of_setting_parse_to_the_field():
    args = build_parser().parse_args([
        "worker", "--providers", "CUDAExecutionProvider,CPUExecutionProvider",
        "--no-store-text", "--index-algorithm", "FLAT", "--model-dir", "/tmp/m",
        "--batch-max-wait-ms", "12", "--redis-socket-timeout-s", "2.5",
    ])
    settings = settings_from_args(args)
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.store_text is False
    assert settings.index_algorithm == "FLAT"
    assert str(settings.model_dir) == "/tmp/m"
    assert settings.batch_max_wait_ms == 12
    assert settings.redis_socket_timeout_s == 2.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--index-algorithm", "IVF"])


def test_an_invalid_value_is_a_clear_error_naming_the_setting():
    args = build_parser().parse_args(["worker", "--batch-max-items", "0"])
    with pytest.raises(SystemExit, match="batch_max_items"):
        settings_from_args(args)


def test_a_commands_own_argument_is_never_taken_for_a_setting(monkeypatch):
    # ``search --model`` is the model to search, not a setting; ``bench --batch-size``
    # is the bench's own. Neither may leak into Settings.
    monkeypatch.delenv("EMBEDSTREAM_MODELS", raising=False)
    args = build_parser().parse_args(["search", "q", "--model", "other"])
    assert settings_from_args(args).models == []
    assert all(not k.startswith(setting_dest("")) or v is None
               for k, v in vars(args).items())


def test_the_gateways_short_flags_set_their_settings():
    args = build_parser().parse_args(["gateway", "--host", "0.0.0.0", "--port", "9001",
                                      "--allow-anonymous", "--no-search"])
    settings = settings_from_args(args)
    assert (settings.gateway_host, settings.gateway_port) == ("0.0.0.0", 9001)
    assert settings.gateway_allow_anonymous is True
    assert settings.gateway_search is False


def test_every_registered_command_parses_and_runs_its_own_function():
    parser = build_parser()
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names))
    for command in COMMANDS:
        sub = _subparser(parser, command.name)
        assert sub.get_default("run") is command.run, command.name
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command.name, "--help"])
        assert exit_info.value.code == 0


def test_main_dispatches_through_the_registry(capsys):
    assert main(["api-key", "--scopes", "search", "--tenant", "acme", "--plain"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].removeprefix("key:  ")
    assert f"line: {key} scopes=search tenant=acme" in out
