"""The Grafana dashboard's panels as text, for reviews and notes where no Grafana runs.

    python tests/deploy/dashboard_panels.py [deploy/grafana/dashboards/embedstream.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/embedstream.json"


def panel_lines(dashboard: dict[str, Any]) -> list[str]:
    """One line per row, one per panel (type, unit, size), one per query under it."""
    lines = [f"Dashboard '{dashboard['title']}' (uid {dashboard['uid']}), variables: "
             + ", ".join(v["name"] for v in dashboard["templating"]["list"])]
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            lines.append(f"== {panel['title']}")
            continue
        pos = panel["gridPos"]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        lines.append(f"  [{panel['type']}, {unit}, {pos['w']}x{pos['h']}] {panel['title']}")
        for target in panel["targets"]:
            legend = f"  ({target['legendFormat']})" if target.get("legendFormat") else ""
            lines.append(f"      {target['expr']}{legend}")
    return lines


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else DASHBOARD
    print("\n".join(panel_lines(json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
