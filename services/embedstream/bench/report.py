"""The bench table and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = (
    ("row", "row", "{}"),
    ("items/s", "items_per_s", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("audio s/s", "audio_s_per_s", "{:.1f}"),
    ("x peer", "vs_peer", "{:.2f}"),
    ("offered/s", "offered_per_s", "{:.1f}"),
    ("stored/s", "achieved_per_s", "{:.1f}"),
    ("p50 ms", "p50_ms", "{:.0f}"),
    ("p95 ms", "p95_ms", "{:.0f}"),
    ("p99 ms", "p99_ms", "{:.0f}"),
    ("batch fill", "batch_fill", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("cos min", "cos_min", "{:.4f}"),
    ("cos mean", "cos_mean", "{:.5f}"),
)
# Shown only when some row has a value (audio seconds per second: audio benches only).
OPTIONAL_COLUMNS = {"audio_s_per_s"}


@dataclass(slots=True)
class Row:
    """One bench row. ``None`` means "not measured for this row"."""

    row: str
    items: int
    seconds: float
    tokens: int | None
    """Real tokens of the inputs (text); ``None`` where tokens do not apply."""
    audio_seconds: float | None = None
    """Seconds of audio in the inputs (audio)."""
    items_per_s: float = 0.0
    tokens_per_s: float | None = None
    audio_s_per_s: float | None = None
    vs_peer: float | None = None
    offered_per_s: float | None = None
    achieved_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    batch_fill: float | None = None
    peak_rss_mb: float | None = None
    cos_min: float | None = None
    cos_mean: float | None = None
    runs_s: list[float] = field(default_factory=list)
    breakdown: dict[str, float] | None = None
    """Pipeline rows: cores per process and stage seconds of the throughput run."""

    def __post_init__(self) -> None:
        self.items_per_s = self.items / self.seconds
        if self.tokens is not None:
            self.tokens_per_s = self.tokens / self.seconds
        if self.audio_seconds is not None:
            self.audio_s_per_s = self.audio_seconds / self.seconds


@dataclass(slots=True)
class Report:
    setup: dict[str, Any]
    rows: list[Row]
    targets: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        rows = [asdict(row) for row in self.rows]
        columns = [c for c in COLUMNS if c[1] not in OPTIONAL_COLUMNS
                   or any(r[c[1]] is not None for r in rows)]
        cells = [[title for title, _, _ in columns]]
        for values in rows:
            cells.append([_cell(values[key], fmt) for _, key, fmt in columns])
        return layout_table(cells)

    def breakdown_text(self) -> str:
        """Where each pipeline row's throughput run spent its time, one line per row."""
        lines = []
        for row in self.rows:
            b = row.breakdown
            if not b:
                continue
            cores = ", ".join(f"{k.removesuffix('_cores')} {v:.2f}" for k, v in b.items()
                              if k.endswith("_cores"))
            stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in b.items()
                               if k.endswith("_s") and k != "wall_s" and v > 0)
            line = f"{row.row}: {b['wall_s']:.1f} s; cores used: {cores}; stage s: {stages}"
            if b.get("padded_tokens") and b.get("raw_padded_tokens"):
                line += (f"; padded tokens {b['padded_tokens']:.0f} "
                         f"({b['padded_tokens'] / b['raw_padded_tokens']:.2f}x the raw row's)")
            lines.append(line)
        return "\n".join(lines)

    def targets_text(self) -> str:
        return "\n".join(
            f"[{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['figure']}" for t in self.targets
        )

    def write_json(self, path: Path) -> None:
        data = {"setup": self.setup, "rows": [asdict(r) for r in self.rows],
                "targets": self.targets}
        path.write_text(json.dumps(data, indent=2, default=_finite) + "\n", encoding="utf-8")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _finite(value: Any) -> Any:
    return float(value)


def columns_table(rows: list[Any], columns: tuple[tuple[str, str, str], ...],
                  left: tuple[int, ...] = (0,)) -> str:
    """A plain-text table of dataclass ``rows``: ``columns`` are (title, field, format);
    a missing value prints ``-``; the columns in ``left`` are left-aligned, the rest right."""
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        values = asdict(row)
        cells.append(["-" if values[key] is None else fmt.format(values[key])
                      for _, key, fmt in columns])
    return layout_table(cells, left)


def layout_table(cells: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Rows of cell strings (the first the titles) as aligned text columns under a rule;
    the columns in ``left`` are left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(c.ljust(w) if i in left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
