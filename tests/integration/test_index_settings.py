"""Index settings against the real embedded Redis (Valkey + RediSearch): the index is made
as configured, a change is refused, an index made under older defaults is kept, an
algorithm the server lacks is named, and a FLOAT16 index is queried in its own type."""

from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest
import redis
from redis.commands.search.index_definition import IndexDefinition, IndexType

from embedstream.devstack import DevStackConfig
from embedstream.envelope import Event, RawRecord
from embedstream.errors import ConfigError
from embedstream.models.manifest import Manifest
from embedstream.search import search_vector
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded
from embedstream.sinks.index import (
    IndexConfig,
    existing_config,
    runtime_ef,
    vector_bytes,
    vector_field,
)
from embedstream.sinks.redis import RedisSink, index_name, result_key

MODEL = Manifest(name="idx-test", modality="text", dimension=8, pooling="mean", normalize=True,
                 inputs=["input_ids"], opset=17, sha256="0" * 64)


def sink(stack: DevStackConfig, prefix: str, **index: object) -> RedisSink:
    return RedisSink(Settings(redis_url=stack.redis_url, key_prefix=prefix, **index).redis)


def index_of(client: redis.Redis, prefix: str) -> IndexConfig | None:
    return existing_config(client.ft(index_name(prefix, MODEL.name)).info())[0]


def test_the_index_is_made_as_configured(stack: DevStackConfig, unique: str) -> None:
    made = sink(stack, unique, index_m=8, index_ef_construction=64, index_ef_runtime=40)
    made.prepare([MODEL])
    client = redis.Redis.from_url(stack.redis_url)
    assert index_of(client, unique) == IndexConfig(m=8, ef_construction=64)
    assert runtime_ef(client, index_name(unique, MODEL.name)) == 40
    assert made.index_configs[MODEL.name] == IndexConfig(m=8, ef_construction=64,
                                                         ef_runtime=40)
    made.prepare([MODEL])  # a restart with the same settings: accepted


def test_other_settings_for_an_existing_index_are_refused(
    stack: DevStackConfig, unique: str
) -> None:
    sink(stack, unique, index_ef_construction=100).prepare([MODEL])
    for change in ({"index_ef_construction": 64}, {"index_ef_runtime": 50},
                   {"index_vector_type": "FLOAT16"}, {"index_algorithm": "FLAT"}):
        with pytest.raises(ConfigError, match="roll out to a new index"):
            sink(stack, unique, **change).prepare([MODEL])
    with pytest.raises(ConfigError, match="idx-test-v2"):
        RedisSink(Settings(redis_url=stack.redis_url, key_prefix=unique).redis,
                  ).prepare([MODEL.model_copy(update={"extra": {"index": {"m": 4}}})])


def test_an_index_made_under_older_defaults_is_kept(
    stack: DevStackConfig, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink(stack, unique, index_algorithm="FLAT").prepare([MODEL])
    defaults = RedisSink(Settings(redis_url=stack.redis_url, key_prefix=unique).redis)
    with caplog.at_level(logging.WARNING):
        defaults.prepare([MODEL])
    assert "kept as it is" in caplog.text
    # Writes follow the index as it is (its vector type), not the defaults.
    assert defaults.index_configs[MODEL.name] == IndexConfig(algorithm="FLAT")
    assert index_of(redis.Redis.from_url(stack.redis_url), unique) == IndexConfig(
        algorithm="FLAT")


def test_float16_only_where_the_sink_writes_it(stack: DevStackConfig, unique: str) -> None:
    made = sink(stack, unique, index_vector_type="FLOAT16")
    if "FLOAT16" not in RedisSink.WRITES_VECTOR_TYPES:
        # An index whose vectors the sink cannot write would index nothing: refused.
        with pytest.raises(ConfigError, match="FLOAT16 vectors are not written"):
            made.prepare([MODEL])
        return
    made.prepare([MODEL])
    vectors = unit_vectors(20)
    outcome = made.write([Embedded(event(i), MODEL, v) for i, v in enumerate(vectors)])
    assert outcome.stored == 20
    client = redis.Redis.from_url(stack.redis_url)
    assert len(client.hget(result_key(unique, MODEL.name, "d3"), "embedding")) == 2 * 8
    info = client.ft(index_name(unique, MODEL.name)).info()
    assert int(info["num_docs"]) == 20 and int(info["hash_indexing_failures"]) == 0
    assert search_vector(client, unique, MODEL.name, vectors[3], 1)[0].id == "d3"


def unit_vectors(count: int) -> np.ndarray:
    vectors = np.random.default_rng(4).standard_normal((count, MODEL.dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def event(i: int) -> Event:
    record = RawRecord(topic="t", partition=0, offset=i, key=None, value=None, timestamp_ms=0)
    return Event(id=f"d{i}", modality="text", model=MODEL.name, text=None, metadata={},
                 record=record)


def test_an_algorithm_the_server_lacks_is_named(stack: DevStackConfig, unique: str) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    version = next(int(m[b"ver"]) for m in client.module_list() if m[b"name"] == b"search")
    if version >= 80200:
        pytest.skip("this server has SVS-VAMANA")
    with pytest.raises(ConfigError, match=r"SVS-VAMANA needs Redis 8\.2"):
        sink(stack, unique, index_algorithm="SVS-VAMANA").prepare([MODEL])


@pytest.mark.parametrize("kind", ["FLOAT16", "FLOAT32"])
def test_queries_are_sent_in_the_index_type(stack: DevStackConfig, unique: str, kind: str) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    client.ft(index_name(unique, MODEL.name)).create_index(
        [vector_field(IndexConfig(vector_type=kind, ef_runtime=20), MODEL.dimension)],
        definition=IndexDefinition(prefix=[result_key(unique, MODEL.name, "")],
                                   index_type=IndexType.HASH))
    vectors = unit_vectors(50)
    for i, vector in enumerate(vectors):  # stored as the write path stores them
        client.hset(result_key(unique, MODEL.name, f"d{i}"),
                    mapping={"embedding": vector_bytes(vector, kind), "model": MODEL.name})
    info = client.ft(index_name(unique, MODEL.name)).info()
    assert int(info["num_docs"]) == 50 and int(info["hash_indexing_failures"]) == 0
    for ef in (None, 50):
        hits = search_vector(client, unique, MODEL.name, vectors[7], 3, ef_runtime=ef)
        assert hits[0].id == "d7" and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[0].score >= hits[1].score >= hits[2].score


def test_the_embedded_search_module_has_no_worker_threads(tmp_path) -> None:
    """Found here: RediSearch 2.10 as shipped for the dev stack refuses WORKERS (and
    WORKER_THREADS), so it indexes inside each write. When it accepts them, the dev stack
    and the store bench should use them."""
    from embedstream.devstack import free_port, redis_binary, search_module_path

    module = search_module_path()
    if module is None:
        pytest.skip("no search module installed")
    for argument in ("WORKERS", "WORKER_THREADS"):
        proc = subprocess.run(
            [str(redis_binary()), "--port", str(free_port()), "--save", "", "--dir",
             str(tmp_path), "--loadmodule", str(module), argument, "2"],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        assert f"No such configuration option `{argument}`" in proc.stdout + proc.stderr
