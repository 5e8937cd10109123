"""A model rollout under live traffic: start -> backfill (killed once) -> promote.

Real broker, Redis (with search), worker and ONNX models. NEW is a second copy of
the session's MiniLM under another name (its own index and keys), so no export.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from e2e_support import MODEL, ThreadWorker, make_settings, wait_for, worker_env_vars

from embedstream.models.manifest import MANIFEST_FILE
from embedstream.producer import Producer
from embedstream.rollout.query import search_serving
from embedstream.rollout.state import progress_key
from embedstream.runtime.loader import load_models
from embedstream.sinks.layout import index_name, result_key
from embedstream.sinks.redis import connect

NEW = "minilm-tuned"


def new_model(root, name: str) -> None:
    """``name``: the session's MiniLM files (linked) under a manifest of its own."""
    (root / name).mkdir()
    for item in (root / MODEL).iterdir():
        if item.name != MANIFEST_FILE:
            (root / name / item.name).symlink_to(item.resolve())
    manifest = json.loads((root / MODEL / MANIFEST_FILE).read_text())
    (root / name / MANIFEST_FILE).write_text(json.dumps({**manifest, "name": name}))


def cli(env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "embedstream", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


class Traffic:
    """Events produced continuously (ids e0, e1, ...) until stopped."""

    def __init__(self, settings, rate: float) -> None:
        self.ids: list[str] = []
        self._settings = settings
        self._rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with Producer(self._settings.kafka) as producer:
            while not self._stop.is_set():
                i = len(self.ids)
                producer.send_text(f"live event {i} about topic {i % 17}", id=f"e{i}")
                self.ids.append(f"e{i}")
                if i % 10 == 0:
                    producer.flush()
                self._stop.wait(1 / self._rate)
            producer.flush()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return list(self.ids)


class Searches:
    """Queries by OLD's public name, continuously: through the CLI's path (the model
    serving the name embeds the query) and a plain FT.SEARCH on the public index name."""

    def __init__(self, settings, models) -> None:
        self.client = connect(settings.redis)
        self.settings = settings
        self.models = models
        self.answered: list[tuple[str, int, set[str]]] = []  # (model, hits, key prefixes)
        self.plain: list[set[str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prefix = self.settings.key_prefix
        while not self._stop.is_set():
            try:
                model, hits = search_serving(
                    self.client, prefix, MODEL,
                    lambda m: self.models[m].embed_texts(["an event about topic 3"])[0], 5)
                self.answered.append((model, len(hits), {h.key.split(":")[1] for h in hits}))
                reply = self.client.execute_command(
                    "FT.SEARCH", index_name(prefix, MODEL), "*", "LIMIT", 0, 5, "NOCONTENT")
                self.plain.append({k.decode().split(":")[1] for k in reply[1:]})
            except Exception as err:
                self.errors.append(repr(err))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_rollout_under_live_traffic(stack, unique, model_root, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / MODEL).symlink_to(model_root / MODEL)
    new_model(root, NEW)
    settings = make_settings(stack, unique, root, models=[MODEL], batch_max_wait_ms=5,
                             intra_op_threads=1, control_poll_s=0.2)
    env = {**os.environ, **worker_env_vars(settings), "EMBEDSTREAM_CONTROL_POLL_S": "0.2",
           "EMBEDSTREAM_WARMUP": "false", "EMBEDSTREAM_ROLLOUT_GRACE_S": "600"}
    client = connect(settings.redis)
    has = lambda model, ids: all(client.exists(result_key(unique, model, i)) for i in ids)  # noqa: E731
    worker = ThreadWorker(settings)
    traffic = searches = None
    try:
        traffic = Traffic(settings, rate=40)
        assert wait_for(lambda: len(traffic.ids) >= 120 and has(MODEL, traffic.ids[:120]))
        models = load_models(root, [MODEL, NEW], providers=[], threads=1)
        searches = Searches(settings, models)

        # start: the running worker loads NEW (no restart) and dual-writes from then on.
        cli(env, "rollout", "start", NEW, "--replaces", MODEL, "--no-backfill")
        assert NEW in worker.worker.pre.models
        during = len(traffic.ids)

        # The backfill, killed once mid-way by SIGKILL, then resumed.
        backfill = subprocess.Popen(
            [sys.executable, "-m", "embedstream", "rollout", "backfill", NEW, "--rate", "40",
             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        key = progress_key(unique, NEW)
        assert wait_for(lambda: any(k.startswith(b"o:") for k in client.hkeys(key)), 90), \
            backfill.communicate(timeout=5)[0].decode()[-3000:]
        backfill.send_signal(signal.SIGKILL)
        backfill.wait(30)
        killed_at = json.loads(cli(env, "rollout", "status", NEW, "--json").stdout)
        assert killed_at["state"] == "backfilling"
        assert 0 < killed_at["backfilled"] < killed_at["total"]
        resumed = cli(env, "rollout", "backfill", NEW, "--rate", "0", "--no-progress").stdout
        assert "rollout ready" in resumed

        status = json.loads(cli(env, "rollout", "status", NEW, "--json").stdout)
        assert status["state"] == "ready"
        assert status["backfilled"] == status["total"] >= 120
        assert wait_for(lambda: len(traffic.ids) >= during + 40)  # live events meanwhile
        cli(env, "rollout", "promote", NEW)
        promoted_at = len(traffic.ids)
        assert wait_for(lambda: len(traffic.ids) >= promoted_at + 40)
        ids = traffic.stop()
        assert wait_for(lambda: has(NEW, ids), 60), [i for i in ids if not
                                                     client.exists(result_key(unique, NEW, i))][:10]
        # Dual writes stopped at the promotion: OLD has none of the last events.
        assert not client.exists(result_key(unique, MODEL, ids[-1]))
        searches.stop()

        # Searches by OLD's name answer from NEW after the promotion, every one before
        # it from OLD alone; none failed or came back empty; the plain FT.SEARCH follows.
        assert not searches.errors, searches.errors[:3]
        assert all(hits > 0 for _, hits, _ in searches.answered)
        models_seen = [m for m, _, _ in searches.answered]
        assert models_seen[-1] == NEW and models_seen[0] == MODEL
        switch = models_seen.index(NEW)
        assert set(models_seen[switch:]) == {NEW}  # one switch, never back
        assert all(keys == {m} for m, _, keys in searches.answered)  # one space per answer
        assert searches.plain[-1] == {NEW} and searches.plain[0] == {MODEL}
        assert all(len(keys) == 1 for keys in searches.plain)
        model, hits = search_serving(client, unique, MODEL,
                                     lambda m: models[m].embed_texts(["live event 7"])[0], 3)
        assert model == NEW and hits[0].key.startswith(result_key(unique, NEW, ""))

        # No restart: the same worker runs, serving NEW alone now; all is on record.
        assert worker.thread.is_alive() and worker.code is None
        assert sorted(worker.worker.pre.models) == [NEW]
        final = json.loads(cli(env, "rollout", "status", NEW, "--json").stdout)
        assert final["state"] == "promoted" and final["serving"] == {MODEL: NEW}
        assert [h["action"] for h in final["history"]] == ["start", "backfilled", "promote"]
        assert all(h["by"] and h["at"] for h in final["history"])
        assert final["drop_old_after"] > time.time() + 500
    finally:
        if searches is not None:
            searches.stop()
        if traffic is not None:
            traffic.stop()
        assert worker.stop() == 0
