"""The fake text model and worker harness of the pipeline's unit tests.

The tokenizer is a real ``tokenizers`` WordLevel model; the backend is a fake
that derives a vector from the token ids and fails on the token ``poison``.
The worker runs with the in-memory source, sink and dead letters of
:mod:`embedstream.testing`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from embedstream.envelope import RawRecord, encode
from embedstream.errors import ModelError
from embedstream.metrics import Metrics
from embedstream.models.manifest import Manifest
from embedstream.preprocess.text import TextPreprocessor
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings
from embedstream.testing import MemoryDeadLetters, MemorySink, MemorySource
from embedstream.worker.pipeline import Worker

WORDS = ["[PAD]", "[UNK]", "poison", *[f"w{i}" for i in range(50)]]
DIM = 8


class FakeBackend:
    provider = "FakeProvider"

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.calls += 1
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if (ids == WORDS.index("poison")).any():
            raise ModelError("poisoned input")
        out = np.zeros((ids.shape[0], DIM), np.float32)
        for row in range(ids.shape[0]):
            for tok in ids[row][mask[row] == 1]:
                out[row, tok % DIM] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_model(tmp_path: Path) -> LoadedModel:
    """A text model: WordLevel tokenizer over ``WORDS``, max length 6, and a FakeBackend."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    manifest = Manifest(
        name="fake", modality="text", dimension=DIM, pooling="mean", normalize=True,
        inputs=["input_ids", "attention_mask"], tokenizer_files=["tokenizer.json"],
        max_length=6, opset=17, sha256="-",
    )
    return LoadedModel(manifest, tmp_path, FakeBackend(), TextPreprocessor(manifest, tmp_path))


def text_records(texts: list[str], partition: int = 0, start: int = 0) -> list[RawRecord]:
    return [
        RawRecord("embedstream.text", partition, start + i, None,
                  encode(f"p{partition}-{start + i}", text=t), int(time.time() * 1000))
        for i, t in enumerate(texts)
    ]


def make_worker(model: LoadedModel, records: list[RawRecord], ledger=None, **overrides):
    """A worker over in-memory parts: (worker, source, sink, dead letters)."""
    # Commits every 50 ms rather than every second: the tests wait for them.
    settings = Settings(**{"batch_max_items": 4, "batch_max_wait_ms": 5, "shutdown_timeout_s": 5,
                           "commit_interval_ms": 50,
                           **overrides})
    sink, dlq = MemorySink(), MemoryDeadLetters()
    holder: dict[str, MemorySource] = {}

    def factory(listener):
        holder["source"] = MemorySource(records, listener)
        return holder["source"]

    worker = Worker(settings, {"fake": model}, factory, sink, dlq, Metrics(), ledger=ledger)
    return worker, holder["source"], sink, dlq


def run_until(worker: Worker, condition, timeout: float = 10.0, stop_grace: float = 10.0) -> int:
    """Run the worker until ``condition`` holds (or ``timeout``), then stop it.

    ``stop_grace`` bounds how long stopping may take; it is generous because a
    loaded CI machine can stall a thread for a while, and the tests that care
    how fast a stop is measure it themselves."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()))
    thread.start()
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    thread.join(stop_grace)
    assert result, "worker did not stop"
    return result[0]


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0
