"""Bench inputs: realistic, varied lengths, every text unique, reproducible by seed.

A mix like a search workload beside an indexing one: short queries (3-12
words) and long passages (3-24 sentences, up to about 300 tokens, some
beyond the model's limit). Built from the packaged sample sentences with
seeded shuffles and word swaps, so no result cache could ever help.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from embedstream.errors import BenchError

QUERY_SHARE = 0.6  # share of short queries; the rest are passages


def _sentences() -> list[str]:
    text = resources.files("embedstream").joinpath("data/sample_sentences.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def generated_texts(count: int, seed: int = 7) -> list[str]:
    """``count`` unique texts: about 60% short queries, 40% passages."""
    rng = random.Random(seed)
    sentences = _sentences()
    words = sorted({w.strip(".,;:!?'\"").lower() for s in sentences for w in s.split()} - {""})
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        if rng.random() < QUERY_SHARE:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            if rng.random() < 0.5:
                text = text.capitalize() + "?"
        else:
            parts = rng.sample(sentences, rng.randint(3, 24))
            # One swapped word per passage keeps even equal samples apart.
            tokens = " ".join(parts).split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            text = " ".join(tokens)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def file_texts(path: Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of ``path`` (up to ``limit``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BenchError(f"cannot read bench inputs {path}: {err}") from err
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise BenchError(f"{path} holds no texts")
    return texts[:limit] if limit else texts
