"""The README's Node.js producer (examples/node, kafkajs) against the real broker and
worker: its events are stored; an envelope the wire format's JSON Schema refuses is never
published. Skips only where `node` is not installed."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from e2e_support import wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
MODEL = "all-minilm-l6-v2"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_example() -> Path:
    if not (EXAMPLE / "node_modules" / "kafkajs").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=EXAMPLE,
                       check=True, timeout=300)
    return EXAMPLE / "produce.mjs"


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(script), *args], capture_output=True, text=True,
                          timeout=120)


def test_kafkajs_events_are_stored_and_invalid_ones_refused(gateway, node_example):
    settings = gateway.settings
    tag = uuid.uuid4().hex[:6]
    ids = [f"node-{tag}-1", f"node-{tag}-2"]
    done = run(node_example, settings.kafka_bootstrap, settings.topic_text,
               f"{ids[0]}=Kafka producers in Node.js", f"{ids[1]}=A second event from kafkajs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ids
    with gateway.client() as client:
        assert wait_for(lambda: all(client.get(f"/v1/embeddings/{MODEL}/{i}").status_code == 200
                                    for i in ids), timeout=60)
        stored = client.get(f"/v1/embeddings/{MODEL}/{ids[0]}").json()
        assert stored["metadata"] == {"lang": "en", "via": "kafkajs"}
        refused = run(node_example, settings.kafka_bootstrap, settings.topic_text,
                      f"node-{tag}-3=fine", "bad id=has a space", f"node-{tag}-4=   ")
        assert refused.returncode == 1 and "invalid envelope" in refused.stderr
        assert refused.stdout == ""
        # the good envelope before the bad one was not published either (all or nothing)
        assert client.get(f"/v1/embeddings/{MODEL}/node-{tag}-3").status_code == 404
