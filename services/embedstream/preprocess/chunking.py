"""Split a long text into windows that fit a model, at the boundaries a reader would choose.

:func:`split` works on the text's tokens as the model's own tokenizer cuts it
(their character offsets), so every window is measured in the unit the model
counts. A window holds at most ``limit`` tokens; it ends, by preference, at a
paragraph break, else at the end of a sentence, else between words, else
anywhere (a single very long "word"), and never before half the limit. The
next window starts ``overlap`` tokens before the last one ended, moved forward
to the nearest sentence or word start, so a fact cut by a boundary is whole in
one of the two. Windows are character spans of the original text: its slice
is exactly the chunk's text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Span = tuple[int, int]
"""(start, end) character offsets in the original text."""

_SENTENCE_ENDS = ".!?;:\u3002\uff01\uff1f"  # and the ideographic full stop, !, ?
_PARAGRAPH, _SENTENCE, _WORD, _ANYWHERE = 3, 2, 1, 0


def split(
    text: str,
    offsets: Sequence[Span],
    limit: int,
    overlap: int,
    fits: Callable[[Span], bool] = lambda _span: True,
) -> list[Span]:
    """Windows of ``text`` covering all its tokens, each at most ``limit`` tokens.

    ``offsets`` are the character spans of the text's tokens (no special
    tokens), in order. ``fits(span)`` may reject a window that the model's own
    count of its slice finds too long (a word cut differently when tokenized
    alone): the window then ends at an earlier boundary.
    """
    if limit < 1:
        raise ValueError("limit must be at least one token")
    count = len(offsets)
    if count == 0:
        return [(0, len(text))]
    scores = _boundary_scores(text, offsets)
    windows: list[Span] = []
    start = 0
    while start < count:
        end = _window_end(scores, start, count, limit, offsets, fits)
        windows.append((offsets[start][0], offsets[end - 1][1]))
        if end >= count:
            break
        start = _next_start(scores, start, end, overlap)
    return windows


def _boundary_scores(text: str, offsets: Sequence[Span]) -> list[int]:
    """How good a cut before each token is (index 0: the text's start)."""
    scores = [_PARAGRAPH] * len(offsets)
    for i in range(1, len(offsets)):
        gap = text[offsets[i - 1][1]:offsets[i][0]]
        if gap.count("\n") >= 2:
            scores[i] = _PARAGRAPH
        elif "\n" in gap or (gap and text[offsets[i - 1][1] - 1] in _SENTENCE_ENDS):
            scores[i] = _SENTENCE
        elif gap:
            scores[i] = _WORD
        else:
            scores[i] = _ANYWHERE
    return scores


def _window_end(
    scores: list[int], start: int, count: int, limit: int, offsets: Sequence[Span],
    fits: Callable[[Span], bool],
) -> int:
    """One past the window's last token: the best cut in its second half that fits."""
    if count - start <= limit and fits((offsets[start][0], offsets[count - 1][1])):
        return count
    highest = min(count, start + limit)
    lowest = min(highest, start + max(1, limit // 2))
    candidates = sorted(range(lowest, highest + 1), key=lambda i: (_score(scores, i, count), i),
                        reverse=True)
    for end in candidates:
        if end > start and fits((offsets[start][0], offsets[end - 1][1])):
            return end
    for end in range(highest - 1, start, -1):  # nothing in the second half fits
        if fits((offsets[start][0], offsets[end - 1][1])):
            return end
    return start + 1


def _score(scores: list[int], index: int, count: int) -> int:
    return _PARAGRAPH if index >= count else scores[index]


def _next_start(scores: list[int], start: int, end: int, overlap: int) -> int:
    """``overlap`` tokens before ``end``, moved forward to a sentence, else a word start."""
    earliest = max(start + 1, end - overlap)
    for wanted in (_SENTENCE, _WORD):
        for index in range(earliest, end):
            if scores[index] >= wanted:
                return index
    return end if overlap else earliest
