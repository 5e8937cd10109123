"""Model runtime: the backends that run a model (ONNX Runtime, by name through
:mod:`.registry`), model loading and warm-up. Preprocessing is :mod:`embedstream.preprocess`."""

from embedstream.runtime.loader import LoadedModel, load_model, load_models

__all__ = ["LoadedModel", "load_model", "load_models"]
