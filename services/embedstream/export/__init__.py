"""Export checkpoints to ONNX model directories (``embedstream export``).

The only package that uses torch, transformers and sentence-transformers (the
``export`` extra); the worker never imports it. Importing this package is
cheap: the heavy modules load on first use of :func:`export_text_model`,
:func:`check_parity` or :class:`ParityReport`.

Output layout and graph contract: :mod:`embedstream.models.manifest`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from embedstream.export.checkpoint import DEFAULT_TEXT_NAME, default_text_checkpoint

if TYPE_CHECKING:
    from embedstream.export.parity import ParityReport, check_parity
    from embedstream.export.text import export_text_model

__all__ = [
    "DEFAULT_TEXT_NAME",
    "ParityReport",
    "check_parity",
    "default_text_checkpoint",
    "export_text_model",
]

_LAZY = {
    "export_text_model": "embedstream.export.text",
    "check_parity": "embedstream.export.parity",
    "ParityReport": "embedstream.export.parity",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
