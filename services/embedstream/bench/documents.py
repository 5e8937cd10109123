"""``embedstream bench --documents N``: long documents, chunked vs truncated, one run.

The same N documents (each several times the model's token limit: paragraphs of
the packaged sample sentences, or the user's own from ``--file``, one per line)
go through a real ``embedstream worker`` twice on one embedded stack: with
``text_overflow=chunk`` (every window a vector) and with ``truncate`` (the
first window only, what the pipeline did before chunking). Each run reports
documents/s and vectors/s (from the hashes' own write times, first write to
last), the real tokens of the stored windows (counted with the model's own
tokenizer), the padded tokens the model computed (``embedstream_batch_tokens``)
and their ratio. Chunking costs tokens in proportion to the text it embeds; the
padded/real ratio says what the batching of unequal windows wastes on top.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from embedstream.bench.pipeline import WorkerProcess, wait_stored
from embedstream.errors import BenchError
from embedstream.models.manifest import load_manifest
from embedstream.producer import Producer
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client
from embedstream.sinks.redis import connect

MODES = ("chunk", "truncate")


@dataclass(frozen=True, slots=True)
class DocumentsRun:
    mode: str
    documents: int
    vectors: int
    seconds: float
    real_tokens: int
    padded_tokens: float

    @property
    def documents_per_s(self) -> float:
        return self.documents / self.seconds

    @property
    def vectors_per_s(self) -> float:
        return self.vectors / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "documents_per_s": round(self.documents_per_s, 2),
                "vectors_per_s": round(self.vectors_per_s, 2),
                "padded_per_real": round(self.padded_tokens / max(1, self.real_tokens), 3)}


def generated_documents(count: int, seed: int = 7, sentences: tuple[int, int] = (60, 90)) -> list[str]:
    """``count`` unique documents of paragraphs (4-8 packaged sentences each), together
    ``sentences`` sentences long: about 4 to 8 MiniLM windows each."""
    text = resources.files("embedstream").joinpath("data/sample_sentences.txt").read_text("utf-8")
    pool = [line.strip() for line in text.splitlines() if line.strip()]
    rng = random.Random(seed)
    documents = []
    for i in range(count):
        picked = [rng.choice(pool) for _ in range(rng.randint(*sentences))]
        paragraphs, start = [], 0
        while start < len(picked):
            size = rng.randint(4, 8)
            paragraphs.append(" ".join(picked[start:start + size]))
            start += size
        documents.append(f"Document {i}.\n\n" + "\n\n".join(paragraphs))
    return documents


def run_documents(
    base: Settings, model: str, documents: list[str], mode: str, *, threads: int,
    batch_size: int, timeout_s: float = 600.0,
) -> DocumentsRun:
    """``documents`` through a fresh worker with ``text_overflow=mode``."""
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}")
    run = "d" + uuid.uuid4().hex[:8]
    settings = base.model_copy(update={
        "topic_text": f"{run}.text", "topic_dlq": f"{run}.dlq", "group_id": f"{run}-group",
        "key_prefix": run,
    })
    with Producer(settings.kafka, topics=[settings.topic_text]) as producer:
        for i, text in enumerate(documents):
            producer.send_text(text, id=f"doc-{i}")
        producer.flush()
    worker = WorkerProcess(settings, model, threads, batch_size, text_overflow=mode)
    try:
        wait_stored(worker, len(documents), timeout_s)
        padded = worker.scrape().get("embedstream_batch_tokens_sum", 0.0)
    finally:
        worker.stop()
    client = connect(settings.redis)
    try:
        texts, written = _stored(client, f"{run}:{model}:*")
    finally:
        client.close()
    # A stored text is the window's (chunk) or the whole text (truncate: the model saw
    # its first max_length tokens).
    manifest = load_manifest(settings.model_dir / model, verify=False)
    tokenizer = _tokenizer(settings.model_dir / model)
    real = sum(min(len(e.ids), manifest.max_length or len(e.ids))
               for e in tokenizer.encode_batch(texts))
    return DocumentsRun(mode, len(documents), len(texts), _span(written), real, padded)


def _stored(client: Client, pattern: str) -> tuple[list[str], list[float]]:
    """The text and write time of every stored window."""
    keys = list(client.scan_iter(pattern, count=10_000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, ["text", "created_at"])
    rows = pipe.execute()
    if any(text is None for text, _ in rows):
        raise BenchError("the bench needs the stored texts (EMBEDSTREAM_STORE_TEXT=true)")
    return [text.decode() for text, _ in rows], [float(stamp) for _, stamp in rows]


def _span(written: list[float]) -> float:
    """Seconds to store everything at the rate between the first write and the last
    (the first write marks the start, as in the pipeline row)."""
    first = min(written)
    after_first = sum(1 for t in written if t > first)
    if after_first == 0:
        raise BenchError("the documents run was too short to time; use more documents")
    return (max(written) - first) * len(written) / after_first


def _tokenizer(model_dir: Path) -> Tokenizer:
    manifest = load_manifest(model_dir, verify=False)
    tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer_files[0]))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def table(runs: list[DocumentsRun]) -> str:
    lines = [
        "| text_overflow | documents | vectors | documents/s | vectors/s | real tokens "
        "| padded tokens | padded/real |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        d = r.as_dict()
        lines.append(
            f"| {r.mode} | {r.documents} | {r.vectors} | {d['documents_per_s']:.1f} "
            f"| {d['vectors_per_s']:.1f} | {r.real_tokens:,} | {r.padded_tokens:,.0f} "
            f"| {d['padded_per_real']:.2f} |")
    by = {r.mode: r for r in runs}
    if set(by) == set(MODES):
        chunk, trunc = by["chunk"], by["truncate"]
        lines.append("")
        lines.append(
            f"chunking embeds {chunk.real_tokens / max(1, trunc.real_tokens):.1f}x the tokens "
            f"of truncation ({chunk.vectors / chunk.documents:.1f} windows a document) at "
            f"{chunk.documents_per_s / trunc.documents_per_s:.2f}x its documents/s; "
            f"real tokens/s {chunk.real_tokens / chunk.seconds:,.0f} vs "
            f"{trunc.real_tokens / trunc.seconds:,.0f}")
    return "\n".join(lines)

