"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedstream.runtime.loader import LoadedModel
from support.pipeline import fake_model


@pytest.fixture
def model(tmp_path: Path) -> LoadedModel:
    """The fake text model of :mod:`support.pipeline` (fresh per test)."""
    return fake_model(tmp_path)
