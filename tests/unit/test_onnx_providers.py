"""Execution providers: a session that cannot get the providers it was configured with
refuses to start instead of quietly running on the CPU, and the provider it reports
(``embedstream_model_info``'s ``provider`` label) is the one it really runs on.

This machine has no GPU and the CPU onnxruntime build. Asked for the CUDA provider, that
build does what onnxruntime-gpu does when the CUDA libraries fail to load: it warns and
runs the session on the CPU. So listing CUDA as available (as onnxruntime-gpu does
whether or not CUDA loads) reproduces the silent fallback faithfully.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from embedstream.errors import ConfigError
from embedstream.runtime import onnx as ort_backend
from embedstream.runtime.loader import load_model

# The CPU build warns when asked for a provider it lacks, then falls back: the fallback
# is what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider")

@pytest.fixture
def identity_model(tmp_path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["embedding"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny-model" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    return path


@pytest.fixture
def gpu_build_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu on a node where CUDA does not load: GPU providers listed, CPU used."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.usefixtures("gpu_build_without_cuda")
@pytest.mark.parametrize("requested", [["CUDAExecutionProvider"],
                                       ["TensorrtExecutionProvider", "CUDAExecutionProvider"]])
def test_explicit_gpu_providers_that_do_not_start_are_a_configuration_error(
        identity_model: Path, requested: list[str]):
    with pytest.raises(ConfigError) as caught:
        ort_backend.OrtBackend(str(identity_model), providers=requested, threads=1)
    message = str(caught.value)
    assert str(requested[0]) in message and "CPUExecutionProvider" in message
    assert "refusing to fall back" in message


@pytest.mark.usefixtures("gpu_build_without_cuda")
def test_automatic_choice_reports_the_provider_it_really_got(identity_model: Path):
    # No providers configured: the best available is tried and whatever starts is used,
    # and the backend says which one that is (the model_info metric's provider label).
    backend = ort_backend.OrtBackend(str(identity_model), providers=[], threads=1)
    assert ort_backend.choose_providers([])[0] == "TensorrtExecutionProvider"
    assert backend.provider == "CPUExecutionProvider"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.array_equal(backend.embed({"x": x}), x)


def test_a_provider_missing_from_the_build_is_a_configuration_error(identity_model: Path):
    with pytest.raises(ConfigError, match="not available in this onnxruntime build"):
        ort_backend.OrtBackend(str(identity_model), providers=["CUDAExecutionProvider"], threads=1)


def test_explicit_cpu_provider_starts(identity_model: Path):
    backend = ort_backend.OrtBackend(str(identity_model), providers=["CPUExecutionProvider"],
                                     threads=1)
    assert backend.provider == "CPUExecutionProvider"


def test_the_loader_passes_the_refusal_on(identity_model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ort_backend.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("embedstream.runtime.loader.load_manifest", lambda d: _Manifest(d))
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        load_model(identity_model.parent, providers=["CUDAExecutionProvider"], threads=1)


class _Manifest:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def onnx_path(self, directory: Path) -> Path:
        return directory / "model.onnx"


def test_tensorrt_engines_are_cached_outside_the_model_directory(identity_model: Path):
    options = ort_backend.provider_options("TensorrtExecutionProvider", str(identity_model))
    cache = Path(options["trt_engine_cache_path"])
    assert cache.is_dir()
    assert identity_model.parent not in cache.parents and cache != identity_model.parent
    assert cache == Path(tempfile.gettempdir()) / "embedstream-trt" / "tiny-model"


def test_an_unwritable_engine_cache_is_a_configuration_error(
        identity_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(ort_backend.tempfile, "gettempdir", lambda: str(blocker))
    with pytest.raises(ConfigError, match=r"engine cache .* is not writable"):
        ort_backend.provider_options("TensorrtExecutionProvider", str(identity_model))

