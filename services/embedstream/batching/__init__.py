"""Micro-batching under explicit budgets (items, tokens, wait)."""

from embedstream.batching.budget import Batch, BatchBudget, Batcher

__all__ = ["Batch", "BatchBudget", "Batcher"]
