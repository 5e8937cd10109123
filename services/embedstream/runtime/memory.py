"""This process's memory, as the kernel counts it (Linux ``/proc``; ``None`` elsewhere).

Used to make the cost of each model visible where it is paid: the loader logs
what loading a model added, the warm-up what its largest batch added.
"""

from __future__ import annotations

from pathlib import Path


def _status_mb(field: str, pid: int | str = "self") -> float | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory now (``VmRSS``), in MiB."""
    return _status_mb("VmRSS", pid)


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Highest resident memory so far (``VmHWM``), in MiB."""
    return _status_mb("VmHWM", pid)


def grew(before: float | None, after: float | None) -> str:
    """``"+123 MB (RSS 456 MB)"`` for a log line, or ``"RSS unknown"``."""
    if before is None or after is None:
        return "RSS unknown"
    return f"+{after - before:.0f} MB (RSS {after:.0f} MB)"
