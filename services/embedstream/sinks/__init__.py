"""Sinks: where embeddings are stored (Redis)."""
