"""Model runtime: backends (ONNX Runtime), preprocessing, and model loading."""

from embedstream.runtime.loader import LoadedModel, load_model, load_models

__all__ = ["LoadedModel", "load_model", "load_models"]
