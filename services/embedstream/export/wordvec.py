"""Export static word vectors to ONNX text models (``embedstream export --kind wordvec``).

Formats, chosen by name through :data:`WORDVEC_FORMATS` (all but spaCy load
with gensim):

``word2vec``        binary ``.bin`` (word2vec's C format)
``word2vec-text``   the text variant (header line "count dim")
``glove``           GloVe text (no header); lowercased lookup by default
``fasttext``        Facebook ``.bin`` with subword n-grams: unseen words get
                    the mean of their character n-gram vectors, as in fastText
``gensim``          a saved gensim ``KeyedVectors`` / ``FastTextKeyedVectors``
``spacy``           a spaCy pipeline or vocab directory (``vocab/vectors``,
                    ``key2row``, ``strings.json``), e.g. en_core_web_md

The graph is plain ONNX (Gather, weighted mean, L2 normalise), built with
``onnx.helper``: see :mod:`embedstream.preprocess.wordvec` for its contract.
Optional SIF weighting (Arora et al. 2017): each word weighs ``a / (a + p(w))``
with ``p`` from the vectors' counts, or a Zipf estimate from frequency rank
when the file has none. The export checks the graph against the reference
(gensim's vectors, or spaCy's table) on fixed sentences, cosine >= 0.9999.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from embedstream.errors import ExportError
from embedstream.export.common import (
    ONNX_FILE,
    Parity,
    check_name,
    compare,
    require_parity,
    staged_export,
    write_manifest,
)
from embedstream.export.parity import PARITY_SENTENCES
from embedstream.preprocess.wordvec import DEFAULT_TOKEN_PATTERN

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"
WORDVEC_PARITY_TEXTS = (
    *PARITY_SENTENCES[:6],
    "the king and the queen live in a castle near the river",
    "unseenwordzz supercalifragilistic hello",
    "Dogs and cats are animals; cars and trucks are vehicles.",
)


@dataclass
class WordVectors:
    """A loaded table: rows, the words pointing at them, and how to look words up."""

    table: np.ndarray  # [rows, dim]; fastText: vocab rows then n-gram buckets
    words: list[tuple[str, int]]  # (word, row), frequency order when known
    counts: dict[str, int] | None
    lowercase: bool
    subwords: dict[str, int] | None
    reference: Callable[[list[str]], np.ndarray | None]
    """The unnormalised mean vector of a word list, computed by the source library."""
    source: str


def _from_keyed(kv: Any, source: str, lowercase: bool) -> WordVectors:
    words = [(w, i) for i, w in enumerate(kv.index_to_key)]
    counts = None
    if kv.expandos and "count" in kv.expandos:
        counts = {w: int(kv.get_vecattr(w, "count")) for w, _ in words}
    subwords = None
    table = np.asarray(kv.vectors, np.float32)
    ngrams = getattr(kv, "vectors_ngrams", None)
    if ngrams is not None and int(getattr(kv, "bucket", 0) or 0):
        subwords = {"minn": int(kv.min_n), "maxn": int(kv.max_n), "bucket": int(kv.bucket),
                    "offset": int(table.shape[0])}
        table = np.concatenate([table, np.asarray(ngrams, np.float32)])

    def reference(tokens: list[str]) -> np.ndarray | None:
        found = []
        for token in tokens:
            try:
                vector = kv[token]
            except KeyError:
                continue
            if np.any(vector):
                found.append(vector)
        return np.mean(found, axis=0) if found else None

    return WordVectors(table, words, counts, lowercase, subwords, reference, source)


def _gensim_loader(
    binary: bool, no_header: bool = False, lowercase: bool = False
) -> Callable[[Path], WordVectors]:
    def load(path: Path) -> WordVectors:
        from gensim.models import KeyedVectors

        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)
        return _from_keyed(kv, str(path), lowercase)

    return load


def _fasttext(path: Path) -> WordVectors:
    from gensim.models.fasttext import load_facebook_vectors

    return _from_keyed(load_facebook_vectors(str(path)), str(path), False)


def _gensim_native(path: Path) -> WordVectors:
    from gensim.models import KeyedVectors

    return _from_keyed(KeyedVectors.load(str(path)), str(path), False)


def murmurhash64a(data: bytes, seed: int = 1) -> int:
    """MurmurHash64A, the hash spaCy keys its strings with (seed 1)."""
    mask = 0xFFFFFFFFFFFFFFFF
    m, r = 0xC6A4A7935BD1E995, 47
    h = (seed ^ (len(data) * m)) & mask
    blocks = len(data) // 8
    for k in np.frombuffer(data[: blocks * 8], dtype="<u8").tolist():
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h ^= k
        h = (h * m) & mask
    tail = data[blocks * 8 :]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * m) & mask
    h ^= h >> r
    h = (h * m) & mask
    h ^= h >> r
    return h


def _spacy(path: Path) -> WordVectors:
    """A spaCy vocab (no spaCy needed): numpy table, msgpack key2row, strings.json."""
    import msgpack

    vocab = path / "vocab" if (path / "vocab").is_dir() else path
    try:
        table = np.load(vocab / "vectors", allow_pickle=False).astype(np.float32)
        key2row = msgpack.unpackb((vocab / "key2row").read_bytes(), strict_map_key=False)
        strings = json.loads((vocab / "strings.json").read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{vocab} is not a spaCy vocab with vectors: {err}") from err
    words = []
    for string in strings:
        row = key2row.get(murmurhash64a(string.encode("utf-8")))
        if row is not None and "\n" not in string and "\t" not in string:
            words.append((string, int(row)))
    if not words:
        raise ExportError(f"no string of {vocab} has a vector")
    lookup = dict(words)

    def reference(tokens: list[str]) -> np.ndarray | None:
        rows = [lookup[t] for t in tokens if t in lookup]
        return table[rows].mean(axis=0) if rows else None

    return WordVectors(table, words, None, False, None, reference, str(path))


WORDVEC_FORMATS: dict[str, Callable[[Path], WordVectors]] = {
    "word2vec": _gensim_loader(binary=True),
    "word2vec-text": _gensim_loader(binary=False),
    "glove": _gensim_loader(binary=False, no_header=True, lowercase=True),
    "fasttext": _fasttext,
    "gensim": _gensim_native,
    "spacy": _spacy,
}


def sif_weights(vectors: WordVectors, a: float) -> np.ndarray:
    """Per-row SIF weight ``a / (a + p(w))``; n-gram rows and unseen words weigh 1."""
    weights = np.ones(vectors.table.shape[0], np.float32)
    if vectors.counts:
        total = float(sum(vectors.counts.values()))
        probs = {w: vectors.counts[w] / total for w, _ in vectors.words}
    else:  # Zipf: p(rank) ~ 1 / (rank + 1), normalised
        harmonic = float(np.sum(1.0 / np.arange(1, len(vectors.words) + 1)))
        probs = {w: 1.0 / ((i + 1) * harmonic) for i, (w, _) in enumerate(vectors.words)}
    seen = np.zeros(weights.shape[0], bool)
    for word, row in vectors.words:  # a shared row (spaCy) takes its most frequent word's weight
        if not seen[row]:
            weights[row], seen[row] = a / (a + probs[word]), True
    return weights


def build_graph(table: np.ndarray, sif: np.ndarray | None, normalize: bool, path: Path) -> None:
    """Gather + weighted mean (+ L2 normalise) as an ONNX graph."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["vectors"], axis=0),
    ]
    weight = "weights"
    if sif is not None:
        nodes += [
            helper.make_node("Gather", ["sif", "input_ids"], ["sif_w"], axis=0),
            helper.make_node("Mul", ["weights", "sif_w"], ["weighted"]),
        ]
        weight = "weighted"
    nodes += [
        helper.make_node("Unsqueeze", [weight, "axis_last"], ["w3"]),
        helper.make_node("Mul", ["vectors", "w3"], ["scaled"]),
        helper.make_node("ReduceSum", ["scaled", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["weights", "axis_seq"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "eps"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], ["mean" if normalize else "embedding"]),
    ]
    if normalize:
        nodes += [
            helper.make_node("ReduceL2", ["mean"], ["norm"], axes=[1], keepdims=1),
            helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
            helper.make_node("Div", ["mean", "norm_safe"], ["embedding"]),
        ]
    inits = [
        numpy_helper.from_array(table.astype(np.float32), "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_seq"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    if sif is not None:
        inits.append(numpy_helper.from_array(sif.astype(np.float32), "sif"))
    graph = helper.make_graph(
        nodes, "wordvec_mean",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "entries"]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["batch", "entries"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", table.shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    large = table.nbytes > (1 << 30)  # protobuf's 2 GiB limit: keep big tables beside the graph
    onnx.save(model, str(path), save_as_external_data=large, location="table.bin")


def wordvec_parity(model_dir: Path, vectors: WordVectors, sif: np.ndarray | None,
                   texts: tuple[str, ...] = WORDVEC_PARITY_TEXTS) -> Parity:
    """ONNX through the runtime preprocessor against the library's mean vectors."""
    from embedstream.runtime.loader import load_model

    loaded = load_model(model_dir, providers=["CPUExecutionProvider"], threads=0)
    prep = loaded.preprocessor
    rows_actual, rows_expected = [], []
    for text in texts:
        words = prep.words(text)  # type: ignore[attr-defined]
        expected = vectors.reference(words) if sif is None else _sif_reference(vectors, words, sif)
        if expected is None:
            continue
        rows_expected.append(expected / max(float(np.linalg.norm(expected)), 1e-12))
        rows_actual.append(loaded.embed_texts([text])[0])
    if not rows_actual:
        raise ExportError("no parity sentence has a known word: is this the right format?")
    return compare(np.stack(rows_actual), np.stack(rows_expected).astype(np.float32))


def _sif_reference(vectors: WordVectors, words: list[str], sif: np.ndarray) -> np.ndarray | None:
    lookup = dict(vectors.words)
    rows = [lookup[w] for w in words if w in lookup]
    if not rows:
        return None
    return (vectors.table[rows] * sif[rows, None]).sum(axis=0) / len(rows)


def export_wordvec_model(
    path: Path | str,
    out_root: Path,
    name: str | None = None,
    *,
    fmt: str = "word2vec",
    lowercase: bool | None = None,
    sif: float | None = None,
    normalize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a word-vector file to ``out_root/<name>/``; return that directory."""
    try:
        loader = WORDVEC_FORMATS[fmt]
    except KeyError as err:
        raise ExportError(f"unknown word-vector format {fmt!r}; known: {sorted(WORDVEC_FORMATS)}") from err
    path = Path(path)
    if not path.exists():
        raise ExportError(f"word vectors {path} do not exist")
    vectors = loader(path)
    name = check_name(name or path.stem.lower().replace("_", "-"))
    sif_table = sif_weights(vectors, sif) if sif else None
    if sif_table is not None and vectors.subwords:
        raise ExportError("SIF weighting of fastText subword models is not supported")
    with staged_export(out_root, name, overwrite) as staging:
        vocab_lines = [f"{w}\t{row}" for w, row in vectors.words]
        (staging / VOCAB_FILE).write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
        build_graph(vectors.table, sif_table, normalize, staging / ONNX_FILE)
        extra: dict[str, Any] = {
            "kind": "wordvec", "format": fmt,
            "lowercase": vectors.lowercase if lowercase is None else lowercase,
            "token_pattern": DEFAULT_TOKEN_PATTERN, "subwords": vectors.subwords,
            "sif_a": sif, "vocab_size": len(vectors.words),
        }
        write_manifest(staging, name=name, modality="text", dimension=int(vectors.table.shape[1]),
                       pooling="sif" if sif else "mean", normalize=normalize,
                       inputs=["input_ids", "weights"], tokenizer_files=[VOCAB_FILE],
                       max_length=4096, opset=17, source=vectors.source, extra=extra)
        if lowercase is not None:
            vectors.lowercase = lowercase
        parity = wordvec_parity(staging, vectors, sif_table)
        require_parity(name, parity, "sentences")
    log.info("exported %s (%s, %d words, %d-d) to %s", name, fmt, len(vectors.words),
             vectors.table.shape[1], Path(out_root) / name)
    return Path(out_root) / name
