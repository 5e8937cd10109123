"""Backends by name. Configuration picks one; new runtimes register here."""

from __future__ import annotations

from embedstream.errors import ConfigError
from embedstream.runtime.base import BackendFactory
from embedstream.runtime.onnx import OrtBackend

BACKENDS: dict[str, BackendFactory] = {"onnxruntime": OrtBackend}


def get_backend_factory(name: str) -> BackendFactory:
    try:
        return BACKENDS[name]
    except KeyError as err:
        raise ConfigError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from err
