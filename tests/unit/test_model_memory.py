"""Memory per worker: a process's inference threads share each model's session, the
sessions share one CPU arena, and what each model costs is measured and logged.

A real (tiny) ONNX text model: an embedding table, mean pooled over the mask.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from embedstream.models.manifest import Manifest, file_sha256
from embedstream.runtime.onnx import OrtBackend
from embedstream.settings import Settings
from embedstream.worker import service
from support.pipeline import DIM, WORDS, fake_model


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A model root holding ``tiny``: WordLevel tokenizer, mean-pooled embedding table."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    fake_model(folder)  # writes tokenizer.json
    table = np.random.default_rng(0).normal(size=(len(WORDS), DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    Manifest(name="tiny", modality="text", dimension=DIM, pooling="mean", normalize=False,
             inputs=["input_ids", "attention_mask"], tokenizer_files=["tokenizer.json"],
             max_length=6, opset=17, sha256=file_sha256(folder / "model.onnx")).write(folder)
    return tmp_path


def _settings(root: Path, **overrides: object) -> Settings:
    values = {"model_dir": root, "models": ["tiny"], "intra_op_threads": 2, **overrides}
    return Settings(**values)


def test_inference_threads_share_one_session_per_model_warmed_once(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    warmed: list[str] = []
    real_warm_up = service.warm_up

    def counting(model, max_items, max_tokens):  # type: ignore[no-untyped-def]
        warmed.append(model.name)
        return real_warm_up(model, max_items, max_tokens)

    monkeypatch.setattr(service, "warm_up", counting)
    caplog.set_level(logging.INFO)
    sets = service.load_instances(_settings(tiny_root, inference_instances=3))
    assert len(sets) == 3 and all(list(s) == ["tiny"] for s in sets)
    assert sets[0] is not sets[1]  # one dict per inference thread ...
    assert sets[1]["tiny"] is sets[0]["tiny"] and sets[2]["tiny"].backend is sets[0]["tiny"].backend
    assert warmed == ["tiny"]  # ... and one session, so one warm-up
    model = sets[0]["tiny"]
    assert model.load_mb is not None and model.load_mb >= 0
    assert model.warmup_mb is not None and model.warmup_mb >= 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("model tiny loaded (text, 8-d): +") and "MB (RSS" in m
               for m in messages), messages
    assert any(m.startswith("1 model(s) ready in ") and "3 inference thread(s)" in m
               and "sharing one session per model" in m for m in messages), messages


def test_on_a_gpu_each_inference_thread_keeps_sessions_of_its_own(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch):
    # Instances on a GPU are for overlapping one's copies with another's kernels.
    monkeypatch.setattr(service, "on_gpu", lambda settings: True)
    sets = service.load_instances(_settings(tiny_root, inference_instances=2))
    assert sets[0]["tiny"].backend is not sets[1]["tiny"].backend
    assert sets[0]["tiny"].warmup_mb is not None and sets[1]["tiny"].warmup_mb is not None


def test_without_warm_up_nothing_is_warmed(tiny_root: Path):
    sets = service.load_instances(_settings(tiny_root, inference_instances=2, warmup=False))
    assert sets[0]["tiny"].warmup_mb is None


def test_one_session_gives_the_same_vectors_to_threads_running_at_once(tiny_root: Path):
    backend = OrtBackend(str(tiny_root / "tiny" / "model.onnx"), providers=[], threads=1)
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(40):
        ids = rng.integers(0, len(WORDS), size=(int(rng.integers(1, 9)), int(rng.integers(1, 7))))
        feeds.append({"input_ids": ids.astype(np.int64),
                      "attention_mask": np.ones_like(ids, dtype=np.int64)})
    expected = [backend.embed(feed) for feed in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(indices: range) -> None:
        try:
            for _ in range(5):
                for i in indices:
                    results[i] = backend.embed(feeds[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(range(k, 40, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for i, vectors in enumerate(expected):
        assert np.array_equal(results[i], vectors)


def test_sessions_of_different_models_open_beside_the_shared_arena(tiny_root: Path):
    # The arena is registered once per process; every later session uses it.
    path = str(tiny_root / "tiny" / "model.onnx")
    first = OrtBackend(path, providers=["CPUExecutionProvider"], threads=1)
    second = OrtBackend(path, providers=["CPUExecutionProvider"], threads=1)
    feed = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])}
    assert np.array_equal(first.embed(feed), second.embed(feed))


def test_the_backend_is_a_setting_chosen_through_the_registry(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch):
    from embedstream.errors import ConfigError
    from embedstream.runtime import registry
    from embedstream.runtime.loader import load_configured

    with pytest.raises(ConfigError, match=r"unknown backend 'tensorflow'; known: \['onnxruntime'\]"):
        load_configured(_settings(tiny_root, backend="tensorflow"), ["tiny"])
    opened: list[str] = []

    class Recording(OrtBackend):
        def __init__(self, path: str, **kwargs: Any) -> None:
            opened.append(path)
            super().__init__(path, **kwargs)

    monkeypatch.setitem(registry.BACKENDS, "recording", Recording)
    models = load_configured(_settings(tiny_root, backend="recording"), ["tiny"])
    assert opened == [str(tiny_root / "tiny" / "model.onnx")]
    assert isinstance(models["tiny"].backend, Recording)
    assert models["tiny"].embed_texts(["w1 w2"]).shape == (1, DIM)
