"""Static word vectors (word2vec, GloVe, fastText, spaCy): a text model whose tokenizer is a lookup.

Manifest: ``modality`` ``text``, ``extra["kind"]`` ``wordvec``;
``tokenizer_files[0]`` is ``vocab.txt``, one word per line, the line number
being the word's row in the graph's embedding table; a line ``word<TAB>row``
names the row itself (spaCy tables share one row among many words). ``extra`` also holds::

    lowercase       lowercase before lookup (GloVe, spaCy-style vocabularies)
    token_pattern   the regex that splits a text into words
    subwords        null, or {"minn", "maxn", "bucket", "offset"}: fastText
                    character n-grams; an unknown word becomes the mean of
                    its n-gram rows (offset + FNV-1a hash % bucket), exactly
                    as fastText and gensim compute it

Graph contract: inputs ``input_ids`` int64 ``[batch, entries]`` and
``weights`` float32 ``[batch, entries]`` (0 on padding; the entries of one
word sum to 1); output ``embedding`` = sum(w * sif[id] * E[id]) / sum(w),
L2-normalised when ``normalize``. ``sif`` is the per-row SIF weight table
baked into the graph (all ones without SIF). Words with no vector are
skipped; a text with none at all is rejected (``empty_text``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedstream.errors import ConfigError, EnvelopeError
from embedstream.models.manifest import Manifest
from embedstream.preprocess.base import Limits, Prepared, register

DEFAULT_TOKEN_PATTERN = r"\w+(?:[-']\w+)*|[^\w\s]"


def fasttext_ngrams(word: str, minn: int, maxn: int) -> list[bytes]:
    """Character n-grams of ``<word>`` as fastText builds them (over UTF-8 code points)."""
    data = f"<{word}>".encode()
    size = len(data)
    grams: list[bytes] = []
    for i in range(size):
        if data[i] & 0xC0 == 0x80:  # inside a multi-byte character
            continue
        j, n = i, 1
        while j < size and n <= maxn:
            j += 1
            while j < size and data[j] & 0xC0 == 0x80:
                j += 1
            if n >= minn and not (n == 1 and (i == 0 or j == size)):
                grams.append(data[i:j])
            n += 1
    return grams


def fasttext_hash(data: bytes) -> int:
    """32-bit FNV-1a over bytes taken as signed chars, fastText's (and gensim's) hash."""
    h = 2166136261
    for byte in data:
        h ^= byte | 0xFFFFFF00 if byte & 0x80 else byte  # sign-extend, as C's int8_t -> uint32_t
        h = (h * 16777619) & 0xFFFFFFFF
    return h


@register("text", "wordvec")
class WordVectorPreprocessor:
    """Texts to (row, weight) entries for a word-vector graph (see :mod:`.preprocess`)."""

    modality = "text"

    def __init__(self, manifest: Manifest, model_dir: Path, limits: Limits | None = None) -> None:
        extra = manifest.extra
        if not manifest.tokenizer_files:
            raise ConfigError(f"word-vector model {manifest.name} names no vocabulary file")
        lines = (model_dir / manifest.tokenizer_files[0]).read_text(encoding="utf-8").split("\n")
        self.vocab: dict[str, int] = {}
        for number, line in enumerate(lines):
            word, tab, row = line.partition("\t")
            if word:
                self.vocab[word] = int(row) if tab else number
        self.lowercase = bool(extra.get("lowercase", False))
        self.pattern = re.compile(str(extra.get("token_pattern", DEFAULT_TOKEN_PATTERN)))
        self.max_entries = manifest.max_length or 4096
        sub = extra.get("subwords")
        self.subwords: tuple[int, int, int, int] | None = (
            (int(sub["minn"]), int(sub["maxn"]), int(sub["bucket"]), int(sub["offset"]))
            if sub else None
        )

    def words(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower() if self.lowercase else text)

    def entries(self, word: str) -> list[tuple[int, float]]:
        row = self.vocab.get(word)
        if row is not None:
            return [(row, 1.0)]
        if self.subwords is None:
            return []
        minn, maxn, bucket, offset = self.subwords
        grams = fasttext_ngrams(word, minn, maxn)
        if not grams:
            return []
        share = 1.0 / len(grams)
        return [(offset + fasttext_hash(g) % bucket, share) for g in grams]

    def prepare_one(self, text: str) -> Prepared:
        entries: list[tuple[int, float]] = []
        truncated = False
        for word in self.words(text):
            found = self.entries(word)
            if len(entries) + len(found) > self.max_entries:
                truncated = True
                break
            entries.extend(found)
        if not entries:
            raise EnvelopeError("empty_text", "none of the text's words has a vector in this model")
        ids = np.fromiter((e[0] for e in entries), np.int64, len(entries))
        weights = np.fromiter((e[1] for e in entries), np.float32, len(entries))
        return Prepared((ids, weights), len(entries), truncated)

    def prepare(self, inputs: Sequence[str]) -> list[Prepared | EnvelopeError]:
        out: list[Prepared | EnvelopeError] = []
        for text in inputs:
            try:
                out.append(self.prepare_one(text))
            except EnvelopeError as err:
                out.append(err)
        return out

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        longest = max(item.cost for item in items)
        ids = np.zeros((len(items), longest), np.int64)
        weights = np.zeros((len(items), longest), np.float32)
        for row, item in enumerate(items):
            item_ids, item_weights = item.value
            ids[row, : item.cost] = item_ids
            weights[row, : item.cost] = item_weights
        return {"input_ids": ids, "weights": weights}
