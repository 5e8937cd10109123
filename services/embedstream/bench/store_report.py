"""The store bench's rows, table, targets and JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedstream.bench.report import layout_table

TARGET_SPEEDUP = 2.0
TARGET_RECALL = 0.95
TARGET_VECTORS = 1_000_000

COLUMNS = (
    ("config", "config", "{}"),
    ("vectors", "vectors", "{:,}"),
    ("writes/s", "writes_per_s", "{:,.0f}"),
    ("x today", "vs_today", "{:.2f}"),
    ("B/vector", "bytes_per_vector", "{:,.0f}"),
    ("index B/vector", "index_bytes_per_vector", "{:,.0f}"),
    ("recall@10", "recall_at_10", "{:.3f}"),
    ("query p50 ms", "query_p50_ms", "{:.2f}"),
)


@dataclass(slots=True)
class StepRow:
    """One configuration at one index size. ``None``: not measured (no index)."""

    config: str
    index: str
    """The index as created (``HNSW M 16 ...``), or ``none``."""
    vectors: int
    writes_per_s: float
    """Over the vectors written since the previous step (the rate as the index grew to here)."""
    write_s: float
    bytes_per_vector: float
    """Redis's used memory grown while this configuration's vectors were written, per vector
    (the hash with its fields and the index; no text)."""
    index_bytes_per_vector: float | None = None
    """The index's own memory per vector (FT.INFO vector_index_sz_mb)."""
    recall_at_10: float | None = None
    """Mean share of the exact top 10 (brute force) found by KNN 10, held-out queries."""
    query_p50_ms: float | None = None
    """Median time of one query through ``embedstream.search.search_vector``."""
    recall_by_ef: dict[int, tuple[float, float]] = field(default_factory=dict)
    """HNSW: EF_RUNTIME given with the query -> (recall@10, query p50 ms)."""
    vs_today: float | None = None


@dataclass(slots=True)
class CombinedRow:
    """The whole pipeline writing into a store that already holds ``store_vectors``."""

    config: str
    model: str
    store_vectors: int
    texts: int
    pipeline_items_per_s: float
    store_writes_per_s: float
    """The store alone, same configuration, at its last step."""
    p99_ms: float
    limit: str
    """``model`` or ``store``: which of the two caps the pipeline here."""


@dataclass(slots=True)
class ShardRow:
    """The same vectors written into a Redis Cluster of ``shards`` masters (1: one server)."""

    shards: int
    config: str
    vectors: int
    writes_per_s: float
    vs_one: float = 1.0
    """Write rate over the one-server run's."""


@dataclass(slots=True)
class StoreReport:
    setup: dict[str, Any]
    rows: list[StepRow]
    combined: list[CombinedRow] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    shards: list[ShardRow] = field(default_factory=list)

    def shards_text(self) -> str:
        return "\n".join(
            f"{s.shards} shard{'s' if s.shards > 1 else ''} ({s.config}, {s.vectors:,} vectors "
            f"through one sink): {s.writes_per_s:,.0f} writes/s ({s.vs_one:.2f}x one server)"
            for s in self.shards)

    def compare(self, reference: str = "today") -> None:
        """Fill ``vs_today``: each row's write rate over ``reference``'s at the same size."""
        base = {r.vectors: r.writes_per_s for r in self.rows if r.config == reference}
        for row in self.rows:
            if row.vectors in base:
                row.vs_today = row.writes_per_s / base[row.vectors]

    def table(self) -> str:
        cells = [[title for title, _, _ in COLUMNS]]
        for row in sorted(self.rows, key=lambda r: (r.vectors, _order(self.rows, r.config))):
            values = asdict(row)
            cells.append([_cell(values[key], fmt) for _, key, fmt in COLUMNS])
        return layout_table(cells)

    def legend(self) -> str:
        seen: dict[str, str] = {}
        for row in self.rows:
            seen.setdefault(row.config, row.index)
        return "\n".join(f"{name}: {index}" for name, index in seen.items())

    def sweep_text(self) -> str:
        """Recall and query time by EF_RUNTIME at the largest size, one line per HNSW config."""
        last = max((r.vectors for r in self.rows), default=0)
        lines = []
        for row in self.rows:
            if row.vectors == last and row.recall_by_ef:
                parts = ", ".join(f"{ef}: {r:.3f} ({ms:.2f} ms)"
                                  for ef, (r, ms) in sorted(row.recall_by_ef.items()))
                lines.append(f"{row.config} at {last:,}, recall@10 by EF_RUNTIME: {parts}")
        return "\n".join(lines)

    def combined_text(self) -> str:
        return "\n".join(
            f"pipeline ({c.model}, {c.texts} texts) into {c.config} holding {c.store_vectors:,} "
            f"vectors: {c.pipeline_items_per_s:,.1f} items/s (p99 {c.p99_ms:.0f} ms); the store "
            f"alone: {c.store_writes_per_s:,.0f} writes/s at that size -> the {c.limit} limits"
            for c in self.combined)

    def targets_text(self) -> str:
        return "\n".join(f"[{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['figure']}"
                         for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {"setup": self.setup, "rows": [asdict(r) for r in self.rows],
                "combined": [asdict(c) for c in self.combined], "targets": self.targets,
                "shards": [asdict(s) for s in self.shards]}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, default=float) + "\n",
                        encoding="utf-8")


def targets(rows: list[StepRow], default: str = "default", today: str = "today") -> list[dict[str, Any]]:
    """The recommended defaults against today's, at the largest size both reached."""
    mine = {r.vectors: r for r in rows if r.config == default}
    theirs = {r.vectors: r for r in rows if r.config == today}
    common = sorted(set(mine) & set(theirs))
    if not common:
        return []
    size = common[-1]
    new, old = mine[size], theirs[size]
    if new.recall_at_10 is None:
        return []
    speedup = new.writes_per_s / old.writes_per_s
    note = "" if size >= TARGET_VECTORS else f" (the target is at {TARGET_VECTORS:,})"
    old_recall = "-" if old.recall_at_10 is None else f"{old.recall_at_10:.3f}"
    return [{
        "target": f"recommended index >= {TARGET_SPEEDUP:.0f}x today's write rate at "
                  f"{size:,} vectors{note}, recall@10 >= {TARGET_RECALL}",
        "met": bool(speedup >= TARGET_SPEEDUP and new.recall_at_10 >= TARGET_RECALL
                    and size >= TARGET_VECTORS),
        "figure": f"{new.writes_per_s:,.0f} vs {old.writes_per_s:,.0f} writes/s "
                  f"({speedup:.2f}x), recall@10 {new.recall_at_10:.3f} (today {old_recall})",
    }]


def _order(rows: list[StepRow], config: str) -> int:
    return list(dict.fromkeys(r.config for r in rows)).index(config)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)
