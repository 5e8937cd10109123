"""The worker: consume, embed, store, commit."""
