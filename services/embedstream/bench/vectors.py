"""Synthetic embeddings that behave like real ones, and exact nearest neighbours to grade an index.

An index's recall and insert cost depend on the geometry of the data: uniform
noise in 384 dimensions has no neighbourhoods (every vector is about equally
far from every other), so graph indexes look both slower and worse on it than
on real embeddings, and say nothing about them. The store bench therefore
starts from *real* embeddings (the text model's vectors of varied texts, the
seeds) and makes each synthetic vector a seed plus a perturbation drawn from
the seeds' own covariance:

    v = normalise(seed_i + spread * noise),  noise ~ N(0, cov(seeds))

so the vectors keep the anisotropy of the model's embedding space (a few
directions carry most of the variance, as in every sentence-embedding model)
and form a topic cluster around every seed, like the many near-paraphrases
and same-topic documents of a real collection. ``spread`` sets how tight the
clusters are (the mean cosine of a vector to its seed is reported with the
results). Queries are drawn the same way but never stored: held out.

When the bench's dimension is not the model's, the seeds are mapped by a
random orthonormal projection first (distances preserved when growing, about
preserved when shrinking).
"""

from __future__ import annotations

import numpy as np

SPREAD = 0.6
"""Perturbation scale: noise of this many times the seeds' own spread."""


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms == 0, 1.0, norms)).astype(np.float32)


class SyntheticVectors:
    """Unit vectors around real ``seeds``; reproducible by ``seed`` and position."""

    def __init__(self, seeds: np.ndarray, dim: int, seed: int = 7, spread: float = SPREAD) -> None:
        if seeds.ndim != 2 or len(seeds) < 2:
            raise ValueError("need at least two seed vectors")
        rng = np.random.default_rng([seed, 0])
        base = _normalise(np.asarray(seeds, dtype=np.float64))
        if dim != base.shape[1]:
            base = _normalise(base @ _projection(base.shape[1], dim, rng))
        self.dim = dim
        self.seeds = base
        centred = base - base.mean(axis=0)
        # noise = z @ (S / sqrt(n - 1) * Vt) has the seeds' covariance (rank <= seeds - 1).
        _, singular, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        self._factor = (singular[:, None] / np.sqrt(len(base) - 1) * vt).astype(np.float32)
        self._spread = spread
        self._seed = seed

    def vectors(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` vectors for positions ``start...``: (vectors, index of each one's seed).

        Deterministic for a given ``start`` and ``count``.
        """
        return self._draw(np.random.default_rng([self._seed, 1, start, count]), count)

    def queries(self, count: int) -> np.ndarray:
        """Held-out queries from the same distribution (never among the stored vectors)."""
        return self._draw(np.random.default_rng([self._seed, 2, count]), count)[0]

    def _draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        which = rng.integers(len(self.seeds), size=count)
        noise = rng.standard_normal((count, self._factor.shape[0]), dtype=np.float32)
        rows = self.seeds[which] + self._spread * (noise @ self._factor)
        return _normalise(rows), which


def _projection(source: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """A ``source x target`` matrix with orthonormal rows or columns."""
    gaussian = rng.standard_normal((max(source, target), min(source, target)))
    q, _ = np.linalg.qr(gaussian)
    return q.T if source < target else q


class ExactNeighbours:
    """Exact top-``k`` by cosine of fixed queries, updated as vectors are added.

    Holds only ``queries x k`` ids and scores, so a million vectors need not be kept.
    """

    def __init__(self, queries: np.ndarray, k: int = 10) -> None:
        self.queries = _normalise(np.asarray(queries, dtype=np.float32))
        self.k = k
        self._ids = np.full((len(queries), 0), -1, dtype=np.int64)
        self._scores = np.empty((len(queries), 0), dtype=np.float32)

    def add(self, vectors: np.ndarray, first_id: int) -> None:
        """Vectors with ids ``first_id, first_id + 1, ...`` (unit length)."""
        scores = np.concatenate([self._scores, self.queries @ vectors.T], axis=1)
        ids = np.concatenate(
            [self._ids, np.broadcast_to(np.arange(first_id, first_id + len(vectors)),
                                        (len(self.queries), len(vectors)))], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            ids = np.take_along_axis(ids, keep, axis=1)
        self._scores, self._ids = scores, ids

    def ids(self) -> list[set[int]]:
        """Each query's exact top-``k`` ids so far."""
        return [set(row.tolist()) for row in self._ids]


def recall(found: list[list[int]], exact: list[set[int]]) -> float:
    """Mean share of each query's exact top-k found (recall@k, k = len of each exact set)."""
    shares = [len(set(f) & e) / len(e) for f, e in zip(found, exact, strict=True) if e]
    return float(np.mean(shares)) if shares else float("nan")
