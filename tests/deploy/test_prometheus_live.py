"""A real Prometheus (Debian's server binary) scrapes a real worker process with the
scrape job and alert rules of deploy/prometheus, and answers a query on its metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import yaml
from deploy_manifests import ROOT

from embedstream.devstack import free_port
from embedstream.producer import Producer
from embedstream.settings import Settings

PROM = ROOT / "deploy" / "prometheus"


def scrape_config(worker_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the worker job pointed at a loopback port.

    The job name, metrics path and relabelling (the `pool` label) are kept as shipped;
    only the DNS discovery of compose's `worker` service becomes a static target.
    """
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "embedstream-worker"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROM / "alerts.yml")]
    return config


def api(port: int, path: str, **params: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    return None


def test_prometheus_scrapes_a_worker_and_answers_queries(stack, unique, model_root, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: `make tools` installs Debian's prometheus package"
    settings = Settings(kafka_bootstrap=stack.bootstrap, redis_url=stack.redis_url,
                        topic_text=f"{unique}.text", topic_dlq=f"{unique}.dlq",
                        group_id=f"{unique}-group", key_prefix=unique, model_dir=model_root)
    worker_port, prom_port = free_port(), free_port()
    env = {**os.environ,
           "EMBEDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap, "EMBEDSTREAM_REDIS_URL": stack.redis_url,
           "EMBEDSTREAM_TOPIC_TEXT": settings.topic_text, "EMBEDSTREAM_TOPIC_DLQ": settings.topic_dlq,
           "EMBEDSTREAM_GROUP_ID": settings.group_id, "EMBEDSTREAM_KEY_PREFIX": unique,
           "EMBEDSTREAM_MODEL_DIR": str(model_root), "EMBEDSTREAM_INTRA_OP_THREADS": "1",
           "EMBEDSTREAM_SESSION_TIMEOUT_MS": "6000", "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": "1000",
           "EMBEDSTREAM_METRICS_HOST": "127.0.0.1", "EMBEDSTREAM_METRICS_PORT": str(worker_port)}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(worker_port)))
    worker = subprocess.Popen([sys.executable, "-m", "embedstream", "worker"], env=env)
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Producer(settings.kafka) as producer:
            for i in range(5):
                producer.send_text(f"metrics event {i}", id=f"e{i}")
            producer.send_raw(settings.topic_text, "bad", b"{not json")
            producer.flush()

        query = 'sum(embedstream_events_embedded_total{job="embedstream-worker", pool="text-cpu"})'

        def embedded() -> list[Any] | None:
            result = api(prom_port, "/api/v1/query", query=query)["data"]["result"]
            return result if result and float(result[0]["value"][1]) == 5 else None

        result = wait_for(embedded, timeout=90)
        assert result, f"Prometheus never saw 5 embedded events; stderr: {server.stderr}"
        print(f"query {query} -> {result}")
        raw = api(prom_port, "/api/v1/query",
                  query='embedstream_events_embedded_total{job="embedstream-worker"}')
        (series,) = raw["data"]["result"]
        print(f"series -> {series}")
        assert series["metric"]["model"] == "all-minilm-l6-v2" and series["value"][1] == "5"

        failed = api(prom_port, "/api/v1/query",
                     query='embedstream_events_failed_total{job="embedstream-worker"}')
        (series,) = failed["data"]["result"]
        assert series["metric"]["reason"] == "invalid_json" and series["value"][1] == "1"
        assert series["metric"]["pool"] == "text-cpu"

        ready = api(prom_port, "/api/v1/query", query='up{job="embedstream-worker"}')
        assert ready["data"]["result"][0]["value"][1] == "1"

        groups = api(prom_port, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        shipped = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
        assert len(rules) == len(shipped) and all(r["health"] in ("ok", "unknown") for r in rules)
        assert not [r["name"] for r in rules if r["state"] == "firing"]
    finally:
        for proc in (server, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        server.wait(timeout=30)
