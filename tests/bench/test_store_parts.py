"""The store bench's parts that need no server: its vectors, its exact neighbours and recall,
its configurations, steps and target."""

from __future__ import annotations

import numpy as np
import pytest

from embedstream.bench.store import default_steps, parse_candidates
from embedstream.bench.store_report import StepRow, targets
from embedstream.bench.vectors import ExactNeighbours, SyntheticVectors, recall
from embedstream.errors import BenchError
from embedstream.settings import Settings
from embedstream.sinks.index import PREVIOUS_DEFAULTS, IndexConfig


def anisotropic_seeds(count: int = 300, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Stand-ins for real embeddings: most variance in a few directions, a common offset."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.05, dim)
    return (rng.standard_normal((count, dim)) * scales + 2.0).astype(np.float32)


def top_share(rows: np.ndarray) -> float:
    singular = np.linalg.svd(rows - rows.mean(axis=0), compute_uv=False) ** 2
    return float(singular[:10].sum() / singular.sum())


def test_vectors_keep_the_seeds_shape_not_uniform_noise() -> None:
    seeds = anisotropic_seeds()
    source = SyntheticVectors(seeds, 64, seed=3)
    vectors, which = source.vectors(0, 3000)
    assert vectors.shape == (3000, 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # As anisotropic as the seeds, far from isotropic noise of the same dimension.
    uniform = np.random.default_rng(1).standard_normal((3000, 64))
    assert abs(top_share(vectors) - top_share(source.seeds)) < 0.1
    assert top_share(vectors) > top_share(uniform) + 0.3
    # Each vector sits near its own seed: clusters, not a cloud.
    own = (vectors * source.seeds[which]).sum(axis=1)
    other = (vectors * source.seeds[(which + 1) % len(seeds)]).sum(axis=1)
    assert own.mean() > 0.8 and own.mean() > other.mean() + 0.05


def test_vectors_are_reproducible_and_queries_held_out() -> None:
    source = SyntheticVectors(anisotropic_seeds(), 64, seed=3)
    first, _ = source.vectors(100, 50)
    again, _ = SyntheticVectors(anisotropic_seeds(), 64, seed=3).vectors(100, 50)
    assert np.array_equal(first, again)
    assert not np.allclose(first, source.vectors(150, 50)[0])
    queries = source.queries(20)
    assert np.abs(queries @ first.T).max() < 0.9999  # none of them is a stored vector


def test_vectors_in_another_dimension() -> None:
    seeds = anisotropic_seeds()
    for dim in (32, 128):
        vectors, _ = SyntheticVectors(seeds, dim).vectors(0, 10)
        assert vectors.shape == (10, dim)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_exact_neighbours_streamed_equal_brute_force() -> None:
    rng = np.random.default_rng(2)
    data = rng.standard_normal((1000, 16)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    exact = ExactNeighbours(queries, k=10)
    for start in range(0, 1000, 128):
        exact.add(data[start : start + 128], start)
    normed = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    brute = [set(np.argsort(-(normed[i] @ data.T))[:10].tolist()) for i in range(5)]
    assert exact.ids() == brute


def test_recall_counts_the_exact_neighbours_found() -> None:
    exact = [{1, 2, 3, 4}, {5, 6, 7, 8}]
    assert recall([[1, 2, 3, 4], [5, 6, 9, 10]], exact) == pytest.approx(0.75)
    assert recall([[], []], exact) == 0.0


def test_configurations_by_name_and_spec() -> None:
    settings = Settings(index_ef_construction=64, index_ef_runtime=100)
    today, default, flat, none, custom = parse_candidates(
        ["today", "default", "flat", "none", "hnsw:m=8:efc=32:efr=40:type=float16"], settings)
    assert today.index == PREVIOUS_DEFAULTS
    assert default.index == IndexConfig(ef_construction=64, ef_runtime=100)
    assert flat.index == IndexConfig(algorithm="FLAT") and none.index is None
    assert custom.index == IndexConfig(m=8, ef_construction=32, ef_runtime=40,
                                       vector_type="FLOAT16")
    assert custom.worker_env()["EMBEDSTREAM_INDEX_VECTOR_TYPE"] == "FLOAT16"
    assert none.worker_env() == {"EMBEDSTREAM_CREATE_INDEX": "false"}
    for bad in (["ivf"], ["hnsw:m=0"], ["hnsw:speed=9"], ["today", "today"], []):
        with pytest.raises(BenchError):
            parse_candidates(bad, settings)


def test_default_steps() -> None:
    assert default_steps(1_000_000) == (10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
                                        1_000_000)
    assert default_steps(3000) == (1000, 2000, 3000)
    assert default_steps(500) == (500,)


def row(config: str, vectors: int, rate: float, recall_at_10: float | None) -> StepRow:
    return StepRow(config=config, index="", vectors=vectors, writes_per_s=rate, write_s=1.0,
                   bytes_per_vector=1.0, recall_at_10=recall_at_10)


def test_the_target_compares_at_the_largest_common_size() -> None:
    rows = [row("today", 1_000_000, 300, 0.8), row("default", 1_000_000, 900, 0.97)]
    (target,) = targets(rows)
    assert target["met"] and "3.00x" in target["figure"] and "today 0.800" in target["figure"]
    (slow,) = targets([row("today", 1_000_000, 300, 0.8), row("default", 1_000_000, 500, 0.99)])
    assert not slow["met"]
    (inexact,) = targets([row("today", 1_000_000, 300, 0.8), row("default", 1_000_000, 900, 0.9)])
    assert not inexact["met"]
    (small,) = targets([row("today", 100_000, 300, 0.8), row("default", 100_000, 900, 0.99)])
    assert not small["met"] and "the target is at 1,000,000" in small["target"]
    assert targets([row("default", 1000, 1, 1.0)]) == []
