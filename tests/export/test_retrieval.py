"""Retrieval figures (recall@k, MRR@10) on hand-made similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from embedstream.export.pairs import Pair
from embedstream.export.retrieval import retrieval_scores, search_problem


def test_retrieval_figures_on_a_hand_made_matrix() -> None:
    similarity = np.array([
        # corpus: 0     1     2     3
        [0.90, 0.10, 0.20, 0.30],  # query 0 -> 0, rank 1
        [0.80, 0.70, 0.10, 0.00],  # query 1 -> 1, rank 2
        [0.10, 0.20, 0.30, 0.40],  # query 2 -> 0, rank 4
        [0.50, 0.50, 0.50, 0.50],  # query 3 -> 2, all tied: corpus order, rank 3
        [0.10, 0.90, 0.80, 0.00],  # query 4 -> 2 and 3: ranks 2 and 4
    ])
    relevant = [{0}, {1}, {0}, {2}, {2, 3}]
    scores = retrieval_scores(similarity, relevant)
    assert scores.queries == 5 and scores.corpus == 4
    assert scores.recall_at_1 == pytest.approx(1 / 5)
    assert scores.recall_at_10 == pytest.approx(1.0)
    assert scores.mrr_at_10 == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 3 + 1 / 2) / 5)

    # Beyond the cutoff: 12 texts, the relevant one last.
    far = retrieval_scores(np.linspace(1, 0, 12)[None, :], [{11}])
    assert (far.recall_at_1, far.recall_at_10, far.mrr_at_10) == (0.0, 0.0, 0.0)
    ninth = retrieval_scores(np.linspace(1, 0, 12)[None, :], [{9}])
    assert (ninth.recall_at_10, ninth.mrr_at_10) == (1.0, pytest.approx(0.1))


def test_search_problem_deduplicates_and_keeps_every_answer() -> None:
    pairs = [Pair("q1", "a"), Pair("q2", "b", negative="a"), Pair("q1", "c", negative="d")]
    problem = search_problem(pairs)
    assert problem.queries == ["q1", "q2"]
    assert problem.corpus == ["a", "b", "c", "d"]
    assert problem.relevant == [frozenset({0, 2}), frozenset({1})]
