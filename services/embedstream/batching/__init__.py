"""Micro-batching under explicit budgets (items, tokens, wait), and dynamic batching of
concurrent requests under the same budget."""

from embedstream.batching.budget import Batch, BatchBudget, Batcher
from embedstream.batching.dynamic import DynamicBatcher

__all__ = ["Batch", "BatchBudget", "Batcher", "DynamicBatcher"]
