"""Prometheus configuration, alert rules and the Grafana dashboard: promtool checks them
(and unit-tests the alerts), and every embedstream metric they name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dashboard_panels import panel_lines
from deploy_manifests import ROOT

from embedstream.metrics import Metrics

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "embedstream.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make tools` installs Debian's prometheus package"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_scrape_config_checks():
    result = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_check():
    result = promtool("check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_expect():
    result = promtool("test", "rules", str(PROM / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"EmbedstreamWorkerDown", "EmbedstreamConsumerLagGrowing", "EmbedstreamNoProgress",
            "EmbedstreamDeadLetterRate", "EmbedstreamModelErrors", "EmbedstreamStoreFull",
            "EmbedstreamPoisonQuarantined"} <= names
    assert all(r["labels"]["severity"] in {"warning", "critical"} for r in rules)
    # Aggregations keep the namespace (two releases may both have a pool "text-cpu").
    for rule in rules:
        for group in re.findall(r"\b(?:by|on) \(([^)]*)\)", rule["expr"]):
            assert "namespace" in group.split(", "), (rule["alert"], group)
    # One lag alert reads the broker's side, so it fires with no worker running.
    backlog = next(r for r in rules if r["alert"] == "EmbedstreamBacklogNotConsumed")
    assert "embedstream_" not in backlog["expr"] and "kafka_consumergroup_lag" in backlog["expr"]
    assert all(r["annotations"]["summary"] and r["annotations"]["description"] for r in rules)


def _exported_metric_names() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


def _referenced(text: str) -> set[str]:
    names = set(re.findall(r"\bembedstream_[a-z_]+", text))
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


@pytest.mark.parametrize("path", [PROM / "alerts.yml", DASHBOARD], ids=["alerts", "dashboard"])
def test_every_metric_named_exists(path: Path):
    referenced = _referenced(path.read_text())
    assert referenced, path
    assert referenced <= _exported_metric_names(), referenced - _exported_metric_names()


def test_dashboard_covers_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needle in ["embedstream_events_embedded_total", "embedstream_consumer_lag",
                   "embedstream_batch_size", "embedstream_stage_seconds_bucket",
                   "embedstream_events_failed_total", "container_cpu_usage_seconds_total",
                   "DCGM_FI_DEV_GPU_UTIL", "embedstream_end_to_end_seconds_bucket"]:
        assert needle in exprs, needle
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        assert g["x"] + g["w"] <= 24
        cells |= mine
    lines = panel_lines(dashboard)
    print("\n".join(lines))
    assert sum(line.startswith("  [") for line in lines) == len(panels)


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "embedstream.yaml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
