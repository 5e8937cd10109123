"""Keys on a Redis Cluster: a document's keys share one slot whatever its id, the id reads
back from any of them, and `dev up --redis-shards N` lays its nodes out predictably."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from embedstream.devstack import DevStackConfig
from embedstream.errors import DevStackError
from embedstream.search import _id_from_key
from embedstream.sinks.layout import id_of_segment, key_segment, result_key, tombstone_key

IDS = ["plain", "page#1", "50%", "a{b}c", "}x{", "{}", "%7B", "ünï#%{}"]


@pytest.mark.parametrize("doc", IDS)
def test_a_documents_keys_share_a_slot_and_give_back_its_id(doc: str) -> None:
    keys = [result_key("p", "m", doc, c, tagged=True) for c in range(3)]
    keys.append(tombstone_key("p", "m", doc, tagged=True))
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert id_of_segment(key_segment(doc, tagged=True), tagged=True) == doc
    assert id_of_segment(key_segment(doc), tagged=False) == doc
    assert all(_id_from_key("p", "m", k) == doc for k in keys[:3])  # hashes without "id"


def test_documents_spread_over_slots_and_one_server_keys_are_unchanged() -> None:
    slots = {key_slot(result_key("p", "m", f"d{i}", tagged=True).encode()) for i in range(100)}
    assert len(slots) > 90
    assert result_key("p", "m", "a{b}", 2) == "p:m:a{b}#2"
    assert result_key("p", "m", "a{b}", 2, tagged=True) == "p:m:{a%7Bb%7D}#2"


def test_shards_lay_out_ports_from_the_usual_one() -> None:
    assert DevStackConfig.with_shards(1).redis_cluster == ()
    three = DevStackConfig.with_shards(3, redis_port=7000)
    assert three.redis_cluster == ((7000, 17000), (7001, 17001), (7002, 17002))
    assert three.redis_shards == 3 and three.redis_url == "redis://127.0.0.1:7000/0"
    with pytest.raises(DevStackError, match="at least 1"):
        DevStackConfig.with_shards(0)
