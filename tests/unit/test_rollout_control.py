"""The control document's meaning (routing, serving, model set), the dual-write fan-out
and the backfill's rate limit: logic only, no broker or Redis."""

from __future__ import annotations

from embedstream.rollout.backfill import TokenBucket
from embedstream.rollout.state import Control
from embedstream.rollout.watcher import routing_for
from embedstream.settings import Settings
from embedstream.worker.fanout import Fanout


def rollout(new: str, old: str, state: str) -> dict:
    return {"new": new, "old": old, "modality": "text", "state": state, "history": []}


def test_routes_follow_the_rollout_states():
    settings = Settings(default_text_model="old")
    served = {"old": "text", "new": "text", "other": "text"}
    during = Control(1, (), {"new": rollout("new", "old", "backfilling")})
    routing = routing_for(settings, during, served)
    assert routing.targets["old"] == ("old", "new")  # dual write
    assert routing.targets["new"] == ("new",) and routing.targets["other"] == ("other",)
    assert routing.defaults == {"text": "old"}
    assert during.model_set(["old", "other"]) == ["new", "old", "other"]

    promoted = Control(2, (), {"new": rollout("new", "old", "promoted")})
    assert promoted.model_set(["old", "other"]) == ["new", "other"]
    routing = routing_for(settings, promoted, {"new": "text", "other": "text"})
    assert routing.targets["old"] == ("new",) and routing.defaults == {"text": "old"}
    assert promoted.serving("old") == "new" and promoted.serving("other") == "other"

    aborted = Control(3, (), {"new": rollout("new", "old", "aborted")})
    assert aborted.model_set(["old"]) == ["old"] and aborted.targets("old") == ("old",)


def test_a_new_model_never_becomes_the_default_while_old_serves():
    """Events naming no model go where they went: NEW sorts first but is not the default."""
    settings = Settings(default_text_model="absent")
    control = Control(1, (), {"a-new": rollout("a-new", "m", "ready")})
    routing = routing_for(settings, control, {"m": "text", "a-new": "text"})
    assert routing.defaults == {"text": "m"}


def test_serving_follows_chains_of_promotions():
    control = Control(4, (), {"b": rollout("b", "a", "promoted"),
                              "c": rollout("c", "b", "promoted")})
    assert control.serving("a") == "c" and control.targets("a") == ("c",)


def test_a_dual_written_record_is_done_when_every_model_finished():
    finished: list = []
    fanout = Fanout(finished.extend)
    fanout.expect(("t", 0, 5), 2)
    fanout.done([("t", 0, 5), ("t", 0, 6)])  # 6 went to one model only
    assert finished == [("t", 0, 6)]
    fanout.done([("t", 0, 5)])
    assert finished == [("t", 0, 6), ("t", 0, 5)] and fanout.waiting() == 0
    fanout.expect(("t", 1, 1), 2)
    fanout.forget([("t", 1)])
    assert fanout.waiting() == 0


def test_the_token_bucket_holds_the_backfill_to_its_rate():
    now = [0.0]
    bucket = TokenBucket(10, clock=lambda: now[0])
    assert bucket.wait_s() == 0
    bucket.take(10)  # a second's worth at once
    assert abs(bucket.wait_s() - 0.1) < 1e-9
    now[0] = 0.5
    assert bucket.wait_s() == 0  # five more tokens
    assert TokenBucket(0).wait_s() == 0  # no limit
