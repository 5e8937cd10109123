"""The model runtime interface: everything the worker asks of a model.

Implementations sit beside this module (``onnx.py``) and are chosen by name
through :mod:`embedstream.runtime.registry`, never by an if/elif chain.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs one exported model on one device.

    Contract: ``embed`` takes the graph inputs of a whole batch (as produced
    by the model's preprocessor) and returns a float32 array of shape
    ``[batch, dimension]``. It may be called from several threads at once
    (the worker's inference threads share one backend per model); it may
    block (the worker runs it off the consuming thread). It raises
    :class:`embedstream.errors.ModelError` when the model fails.
    """

    @property
    def provider(self) -> str:
        """The execution provider in use, e.g. ``CPUExecutionProvider``."""
        ...

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """The named graph outputs (float32); used by token-mode models."""
        ...


class BackendFactory(Protocol):
    def __call__(
        self, onnx_path: str, *, providers: list[str], threads: int
    ) -> Backend: ...
