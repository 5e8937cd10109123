"""A Redis Cluster of three Valkey masters (each with RediSearch, no coordinator): the sink
spreads documents over the masters with each document's keys on one slot, every master
indexes its own keys, search over the cluster gives the top k of one server holding the
same vectors, and a real worker stores into the cluster end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from e2e_support import MODEL, ThreadWorker, make_settings, wait_for
from redis.cluster import RedisCluster
from redis.crc import key_slot

from embedstream.devstack import DevStackConfig, embedded_stack
from embedstream.envelope import Event, RawRecord
from embedstream.models.manifest import Manifest
from embedstream.producer import Producer
from embedstream.runtime.loader import load_models
from embedstream.search import search_vector
from embedstream.settings import Settings
from embedstream.sinks import cluster as shards
from embedstream.sinks.base import Deletion, Embedded
from embedstream.sinks.redis import RedisSink, connect, result_key, tombstone_key

SHAPE = Manifest(name="cl-test", modality="text", dimension=32, pooling="mean", normalize=True,
                 inputs=["input_ids"], opset=17, sha256="0" * 64)
K = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStackConfig]:
    """A broker and a 3-master Redis Cluster, as `embedstream dev up --redis-shards 3`."""
    cfg = DevStackConfig.on_free_ports(tmp_path_factory.mktemp("cluster"), redis_shards=3)
    with embedded_stack(cfg):
        yield cfg


def vectors(count: int) -> np.ndarray:
    """Unit vectors around a few centres (neighbours close together, like embeddings)."""
    rng = np.random.default_rng(14)
    centres = rng.standard_normal((8, SHAPE.dimension))
    out = centres[rng.integers(0, 8, count)] + 0.6 * rng.standard_normal((count, SHAPE.dimension))
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def event(i: int) -> Event:
    record = RawRecord(topic="t", partition=0, offset=i, key=None, value=None, timestamp_ms=0)
    return Event(id=f"d{i}{{x}}" if i == 3 else f"d{i}", modality="text", model=SHAPE.name,
                 text=None, metadata={}, record=record)


def fill(url: str, prefix: str, data: np.ndarray) -> RedisSink:
    sink = RedisSink(Settings(redis_url=url, key_prefix=prefix).redis)
    sink.prepare([SHAPE])
    for start in range(0, len(data), 64):
        items = [Embedded(event(i), SHAPE, data[i]) for i in range(start, min(start + 64,
                                                                             len(data)))]
        assert sink.write(items).stored == len(items)
    return sink


def test_search_over_the_cluster_is_the_top_k_of_one_server(
    cluster: DevStackConfig, stack: DevStackConfig, unique: str
) -> None:
    data = vectors(600)
    sink = fill(cluster.redis_url, unique, data)
    fill(stack.redis_url, unique, data)
    client = connect(Settings(redis_url=cluster.redis_url).redis)
    one = connect(Settings(redis_url=stack.redis_url).redis)
    assert isinstance(client, RedisCluster) and sink.tagged and sink.ping()
    assert shards.search_mode(client) == "shards"

    # Every master holds some documents and indexes exactly its own.
    held = []
    for node in shards.masters(client):
        node_client = shards.node_client(client, node)
        name = shards.shard_index_name(client, node, unique, SHAPE.name)
        assert shards.node_of_key(client, name).name == node.name
        held.append(int(node_client.ft(name).info()["num_docs"]))
    assert sum(held) == len(data) and min(held) > len(data) / 6

    # The cluster's top k is one server's top k (both HNSW: up to its approximation),
    # and both find each query's own vector first with the same score.
    overlaps = []
    for q in range(0, 600, 30):
        got = search_vector(client, unique, SHAPE.name, data[q], K)
        want = search_vector(one, unique, SHAPE.name, data[q], K)
        assert got[0].id == want[0].id == event(q).id
        assert got[0].score == pytest.approx(want[0].score, abs=1e-5)
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
        overlaps.append(len({h.id for h in got} & {h.id for h in want}) / K)
    assert np.mean(overlaps) >= 0.95

    # An id with braces keeps one slot for its keys; a delete removes it from search.
    keys = [result_key(unique, SHAPE.name, "d3{x}", tagged=True),
            tombstone_key(unique, SHAPE.name, "d3{x}", tagged=True)]
    assert len({key_slot(k.encode()) for k in keys}) == 1 and client.exists(keys[0])
    assert search_vector(client, unique, SHAPE.name, data[3], 1)[0].id == "d3{x}"
    later = event(3)
    later = Event(id=later.id, modality="text", model=SHAPE.name, text=None, metadata={},
                  record=RawRecord("t", 0, 9999, None, None, 0))
    assert sink.delete([Deletion(later, SHAPE)]).deleted == 1
    assert search_vector(client, unique, SHAPE.name, data[3], 1)[0].id != "d3{x}"
    sink.close()


def test_a_worker_stores_into_the_cluster(
    cluster: DevStackConfig, unique: str, model_root: Path
) -> None:
    settings = make_settings(cluster, unique, model_root, batch_max_items=16)
    texts = [f"Note {i} about {topic}." for i, topic in
             enumerate(["rockets", "cooking", "football", "music"] * 8)]
    texts.append("word " * 400)  # two chunks: their keys share the document's slot
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as producer:
            ids = [producer.send_text(t) for t in texts]
            producer.flush()
        client = connect(settings.redis)
        pattern = result_key(unique, MODEL, "*", tagged=True)  # chunk 0 of each document
        assert wait_for(lambda: sum(1 for _ in client.scan_iter(match=pattern)) == len(ids))
        chunks = [result_key(unique, MODEL, ids[-1], c, tagged=True) for c in (0, 1)]
        assert client.hget(chunks[1], "chunks") == b"2"
        assert key_slot(chunks[0].encode()) == key_slot(chunks[1].encode())
        model = load_models(model_root, [MODEL], providers=[], threads=1)[MODEL]
        hits = search_vector(client, unique, MODEL, model.embed_texts(["rocket launch"])[0], 3)
        assert all("rockets" in h.fields["text"] for h in hits)
        assert worker.worker.sink.ping()
    finally:
        assert worker.stop() == 0
