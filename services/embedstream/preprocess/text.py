"""Text preprocessing: tokenize with the model's own tokenizer.json.

Uses the ``tokenizers`` library (Rust, releases the GIL), never transformers.
Sequences are truncated to the model's ``max_length`` at encode time and
padded per batch at pack time, so each batch pads only to its own longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from embedstream.errors import EnvelopeError, ModelError
from embedstream.models.manifest import Manifest
from embedstream.preprocess.base import Limits, Prepared, register
from embedstream.preprocess.chunking import Span, split


@dataclass(frozen=True, slots=True)
class Tokenized:
    """One text's token ids (truncated to the model limit)."""

    ids: np.ndarray
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


@register("text")
class TextPreprocessor:
    """Turns texts into the graph inputs of one text model (see :mod:`.preprocess`)."""

    modality = "text"

    def __init__(self, manifest: Manifest, model_dir: Path, limits: Limits | None = None) -> None:
        if not manifest.tokenizer_files:
            raise ModelError(f"text model {manifest.name} has no tokenizer file")
        path = model_dir / manifest.tokenizer_files[0]
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception
            raise ModelError(f"cannot load tokenizer {path}: {err}") from err
        self._tokenizer.no_padding()
        # The same tokenizer without truncation measures whole texts for chunking.
        self._measure = Tokenizer.from_str(self._tokenizer.to_str())
        self._measure.no_truncation()
        self.max_length = manifest.max_length or 512
        self._tokenizer.enable_truncation(self.max_length)
        self._specials = len(self._measure.encode("").ids)
        self._pad_id = int(manifest.extra.get("pad_token_id", 0))
        self._inputs = list(manifest.inputs)

    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        encodings = self._tokenizer.encode_batch(texts)
        return [
            Tokenized(np.asarray(e.ids, dtype=np.int64), truncated=bool(e.overflowing))
            for e in encodings
        ]

    def prepare(self, inputs: Sequence[str]) -> list[Prepared | EnvelopeError]:
        """Tokenize a batch; the cost of a text is its token count."""
        return [Prepared(t, t.length, t.truncated) for t in self.tokenize(list(inputs))]

    def chunk(self, text: str, max_tokens: int, overlap: float) -> list[tuple[Span, Prepared]]:
        """``text`` in windows of at most ``max_tokens`` tokens, special tokens included
        (0 or more than the model's limit: the limit), overlapping by ``overlap`` of that,
        cut at paragraph, sentence or word boundaries (see :mod:`.chunking`). Each window
        comes with its character span in ``text`` and its model input."""
        budget = min(max_tokens or self.max_length, self.max_length)
        limit = max(1, budget - self._specials)
        offsets = self._measure.encode(text, add_special_tokens=False).offsets

        def fits(span: Span) -> bool:
            return len(self._measure.encode(text[span[0]:span[1]]).ids) <= budget

        spans = split(text, offsets, limit, int(overlap * limit), fits)
        prepared = self.prepare([text[start:end] for start, end in spans])
        return [(span, item) for span, item in zip(spans, prepared, strict=True)
                if isinstance(item, Prepared)]

    def pack(self, items: Sequence[Prepared | Tokenized]) -> dict[str, np.ndarray]:
        """Pad a batch to its longest sequence and build every graph input."""
        seqs: list[Tokenized] = [i.value if isinstance(i, Prepared) else i for i in items]
        longest = max(item.length for item in seqs)
        ids = np.full((len(seqs), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), longest), dtype=np.int64)
        for row, item in enumerate(seqs):
            ids[row, : item.length] = item.ids
            mask[row, : item.length] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            inputs["token_type_ids"] = np.zeros_like(ids)
        return inputs
