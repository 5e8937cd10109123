"""``embedstream bench --documents``: long documents through a real worker, chunked.

Timing is not tested (the machine is shared); what the row counts is: every
document stored as several windows, each window within the model's limit, the
padded tokens at least the real ones.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from embedstream.bench.documents import generated_documents, run_documents, table
from embedstream.settings import Settings

MODEL = "all-minilm-l6-v2"


def test_generated_documents_are_unique_and_several_windows_long(model_root: Path) -> None:
    documents = generated_documents(20, seed=3)
    assert len(set(documents)) == 20 and generated_documents(20, seed=3) == documents
    tokenizer = Tokenizer.from_file(str(model_root / MODEL / "tokenizer.json"))
    tokenizer.no_truncation()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(documents)]
    assert min(lengths) > 3 * 256, lengths
    assert all("\n\n" in d for d in documents)  # paragraphs, for the chunker's boundaries


def test_documents_row_counts_every_window(stack, unique: str, model_root: Path) -> None:
    settings = Settings(kafka_bootstrap=stack.bootstrap, redis_url=stack.redis_url,
                        model_dir=model_root, key_prefix=unique)
    documents = generated_documents(10, seed=5)
    run = run_documents(settings, MODEL, documents, "chunk", threads=1, batch_size=8,
                        timeout_s=180)
    assert run.documents == 10 and run.vectors >= 10 * 3
    assert run.seconds > 0 and run.vectors_per_s > run.documents_per_s
    # Every window fits the model; the batches padded them, never dropped tokens.
    assert run.real_tokens <= run.vectors * 256
    assert run.real_tokens <= run.padded_tokens
    assert "| chunk | 10 |" in table([run])
