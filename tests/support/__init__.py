"""Helpers shared by the test suite (fakes, harnesses, stack helpers)."""
