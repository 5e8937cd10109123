"""Retrieval quality of an embedding model on held-out pairs (numpy only).

The held-out pairs become a small search problem: every distinct query is
asked against the corpus of every distinct positive (and negative) text of
the split, ranked by cosine similarity. A query may have several relevant
texts (the same query paired with several positives).

- ``recall@k``: the share of a query's relevant texts found in its top k,
  averaged over queries (with one relevant text: 1 if it is in the top k).
- ``MRR@10``: the reciprocal rank of the first relevant text when it is in the
  top 10, else 0, averaged over queries.

Ties are broken by corpus order (a stable sort), so the figures are
deterministic even for a model that maps everything to one point.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from embedstream.export.pairs import Pair

MRR_CUTOFF = 10


@dataclass(frozen=True, slots=True)
class RetrievalScores:
    """Figures of one model on one held-out split."""

    recall_at_1: float
    recall_at_10: float
    mrr_at_10: float
    queries: int
    corpus: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SearchProblem:
    """Distinct queries, a corpus of distinct texts, and each query's relevant corpus rows."""

    queries: list[str]
    corpus: list[str]
    relevant: list[frozenset[int]]


def search_problem(pairs: Sequence[Pair]) -> SearchProblem:
    """The search problem of ``pairs``: queries and corpus deduplicated, in first-seen order."""
    corpus_index: dict[str, int] = {}
    relevant: dict[str, set[int]] = {}
    for pair in pairs:
        row = corpus_index.setdefault(pair.positive, len(corpus_index))
        relevant.setdefault(pair.query, set()).add(row)
        if pair.negative is not None:
            corpus_index.setdefault(pair.negative, len(corpus_index))
    # A text that is some query's positive and another's negative stays relevant where paired.
    return SearchProblem(
        queries=list(relevant),
        corpus=list(corpus_index),
        relevant=[frozenset(rows) for rows in relevant.values()],
    )


def retrieval_scores(
    similarity: np.ndarray, relevant: Sequence[Collection[int]]
) -> RetrievalScores:
    """recall@1, recall@10 and MRR@10 from a ``[queries, corpus]`` similarity matrix.

    ``relevant[i]`` holds the corpus columns that answer query ``i`` (at least one).
    """
    if similarity.ndim != 2 or similarity.shape[0] != len(relevant):
        raise ValueError(
            f"similarity {similarity.shape} does not match {len(relevant)} queries"
        )
    if any(not rows for rows in relevant):
        raise ValueError("every query needs at least one relevant text")
    # Stable sort of the negated scores: highest first, ties in corpus order.
    ranking = np.argsort(-similarity, axis=1, kind="stable")
    recall_1, recall_10, reciprocal = [], [], []
    for order, rows in zip(ranking, relevant, strict=True):
        hits = np.isin(order, list(rows))
        recall_1.append(hits[:1].sum() / len(rows))
        recall_10.append(hits[:10].sum() / len(rows))
        first = int(np.argmax(hits))  # hits has at least one True: rows is not empty
        reciprocal.append(1.0 / (first + 1) if first < MRR_CUTOFF else 0.0)
    return RetrievalScores(
        recall_at_1=float(np.mean(recall_1)),
        recall_at_10=float(np.mean(recall_10)),
        mrr_at_10=float(np.mean(reciprocal)),
        queries=len(relevant),
        corpus=int(similarity.shape[1]),
    )


def evaluate(
    embed: Callable[[list[str]], np.ndarray], problem: SearchProblem
) -> RetrievalScores:
    """Scores of the model behind ``embed`` (texts -> ``[n, dim]``) on ``problem``."""
    queries = _unit(embed(problem.queries))
    corpus = _unit(embed(problem.corpus))
    return retrieval_scores(queries @ corpus.T, problem.relevant)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
