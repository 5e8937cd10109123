"""Training pairs for ``embedstream finetune``: reading, validating, splitting.

Pure Python, no torch: a bad pairs file fails in a second, before any model
is loaded.

File format: JSON Lines, one object per line::

    {"query": "reset my password", "positive": "To reset a password, ...",
     "negative": "optional: a text that does not answer the query",
     "group": "optional: pairs with the same group are never split apart"}

``query`` and ``positive`` are required non-empty strings; ``negative`` is
optional (a string, or null for none) but all pairs or none must have one,
because the loss takes one column layout for the whole set; ``group`` is
optional (a string or a number). Other keys are ignored, so a file may carry
ids or scores. Blank lines are skipped. Every other defect is an error that
names the line: a bad line is never skipped silently, because a silently
shrunk training set would change the model the user gets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from embedstream.errors import ExportError

# Errors listed in one message before the rest are only counted.
_SHOWN_ERRORS = 5


@dataclass(frozen=True, slots=True)
class Pair:
    """One training example: a query and the text that answers it."""

    query: str
    positive: str
    negative: str | None = None
    group: str | None = None
    """Pairs sharing a group land on the same side of the train / held-out split."""
    line: int = 0
    """Line number in the pairs file (1-based), for messages."""


class PairsError(ExportError):
    """A pairs file cannot be used; the message names every bad line (the first few)."""


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of the JSONL file ``path``, in file order.

    Raises :class:`PairsError` naming the file, the line numbers and what is
    wrong with each bad line (up to five, then a count), when the file has no
    pairs, or when some pairs have a ``negative`` and others do not.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise PairsError(f"pairs file {path} does not exist") from err
    except OSError as err:
        raise PairsError(f"cannot read pairs file {path}: {err}") from err
    pairs: list[Pair] = []
    errors: list[str] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append(parse_line(line, number))
        except ValueError as err:
            errors.append(f"line {number}: {err}")
    if errors:
        shown = "; ".join(errors[:_SHOWN_ERRORS])
        more = f" (and {len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
        raise PairsError(
            f"{path}: {len(errors)} bad line{'s' if len(errors) > 1 else ''}: {shown}{more}. "
            'Each line must be a JSON object with non-empty "query" and "positive" strings '
            '(optional "negative", "group")'
        )
    if not pairs:
        raise PairsError(f"{path} holds no pairs")
    _check_negatives(pairs, path)
    return pairs


def parse_line(line: bytes, number: int = 0) -> Pair:
    """One pair from one line of the file; :class:`ValueError` says what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 (byte {err.start + 1})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from err
    except RecursionError as err:  # pathological nesting: not a pair either way
        raise ValueError("not JSON (nested too deeply)") from err
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    query = _text(data, "query", required=True)
    positive = _text(data, "positive", required=True)
    assert query is not None and positive is not None
    return Pair(query, positive, _text(data, "negative", required=False),
                _group(data.get("group")), number)


def _text(data: dict[str, object], field: str, *, required: bool) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise ValueError(f'"{field}" is missing')
        return None
    if not isinstance(value, str):
        raise ValueError(f'"{field}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{field}" is empty')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate escape such as "\ud800"
        raise ValueError(f'"{field}" holds a lone surrogate at character {err.start}') from err
    return value


def _group(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'"group" must be a string or a number, got {type(value).__name__}')
    return str(value)


def _check_negatives(pairs: list[Pair], path: Path) -> None:
    with_negative = [p for p in pairs if p.negative is not None]
    if with_negative and len(with_negative) < len(pairs):
        first_without = next(p for p in pairs if p.negative is None)
        raise PairsError(
            f'{path}: {len(with_negative)} pairs have a "negative" and '
            f"{len(pairs) - len(with_negative)} do not (the first at line {first_without.line}); "
            'give every pair a "negative" or remove them all'
        )


def split_pairs(
    pairs: list[Pair], eval_size: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)``: a seeded split in which no text is on both sides.

    Pairs are first joined into groups: pairs that share a ``group``, a
    query text or a positive text belong together (transitively), so the
    held-out split never shares a query or an answer with training.
    ``eval_size`` below 1 is the held-out fraction of the pairs, otherwise
    their count; whole groups are drawn in a seeded order until the held-out
    side has at least that many pairs. Both sides must end up with at least
    two pairs (ranking needs a choice; in-batch negatives need a batch).
    """
    if eval_size <= 0:
        raise PairsError(f"the held-out size must be positive, got {eval_size}")
    target = round(eval_size * len(pairs)) if eval_size < 1 else int(eval_size)
    groups = _groups(pairs)
    random.Random(seed).shuffle(groups)
    held_out: list[Pair] = []
    train: list[Pair] = []
    for group in groups:
        (held_out if len(held_out) < target else train).extend(group)
    if len(held_out) < 2 or len(train) < 2:
        raise PairsError(
            f"cannot split {len(pairs)} pairs ({len(groups)} independent groups) into training "
            f"and a held-out set of about {target}: got {len(train)} and {len(held_out)}; "
            "give more pairs or change the held-out size"
        )
    return sorted(train, key=_order), sorted(held_out, key=_order)


def overlap(train: Iterable[Pair], held_out: Iterable[Pair]) -> list[Pair]:
    """Held-out pairs whose query or positive text also appears in ``train``."""
    seen: set[tuple[str, str]] = set()
    for pair in train:
        seen.update((("q", pair.query), ("p", pair.positive)))
    return [p for p in held_out if ("q", p.query) in seen or ("p", p.positive) in seen]


def _groups(pairs: list[Pair]) -> list[list[Pair]]:
    """Connected components of pairs linked by a shared group, query or positive."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(pairs):
        keys = [("q", pair.query), ("p", pair.positive)]
        if pair.group is not None:
            keys.append(("g", pair.group))
        for key in keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    members: dict[int, list[Pair]] = {}
    for i, pair in enumerate(pairs):
        members.setdefault(find(i), []).append(pair)
    # File order of each group's first pair: the shuffle alone decides the split.
    return sorted(members.values(), key=lambda g: _order(g[0]))


def _order(pair: Pair) -> tuple[int, str, str]:
    return pair.line, pair.query, pair.positive

