"""The Redis that compose runs indexes in the background (Redis 8's search-workers), and the
chart documents how to do the same for the Redis it points at."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_redis_runs_search_workers() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    workers = command[command.index("--search-workers") + 1]
    assert 1 <= int(workers) <= 16  # the server's valid range


def test_chart_documents_the_redis_settings() -> None:
    readme = (ROOT / "helm" / "embedstream" / "README.md").read_text()
    values = (ROOT / "helm" / "embedstream" / "values.yaml").read_text()
    assert "--search-workers" in readme and "search-workers" in values
    assert "EMBEDSTREAM_INDEX_EF_CONSTRUCTION" in readme
