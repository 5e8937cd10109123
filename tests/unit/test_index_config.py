"""Index settings per model: where they come from, how vectors are encoded for them, and
what happens when an existing index was made with others (no server: FT.INFO replies
are given as the server sends them)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import redis

from embedstream.errors import ConfigError
from embedstream.models.manifest import Manifest
from embedstream.settings import Settings
from embedstream.sinks.index import (
    PREVIOUS_DEFAULTS,
    IndexConfig,
    check_existing,
    creation_error,
    existing_config,
    explicit,
    index_config,
    stored_vector,
    vector_bytes,
    vector_field,
)


def manifest(**extra: Any) -> Manifest:
    return Manifest(name="m1", modality="text", dimension=4, pooling="mean", normalize=True,
                    inputs=["input_ids"], opset=17, sha256="0" * 64, extra=extra)


def info(algorithm: str = "HNSW", data_type: str = "FLOAT32", dim: int = 4, m: int = 16,
         efc: int = 64) -> dict[str, Any]:
    """FT.INFO as redis-py returns it over RESP2 (attributes as flat lists)."""
    attribute = ["identifier", "embedding", "attribute", "embedding", "type", "VECTOR",
                 "algorithm", algorithm, "data_type", data_type, "dim", dim,
                 "distance_metric", "COSINE"]
    if algorithm == "HNSW":
        attribute += ["M", m, "ef_construction", efc]
    return {"attributes": [["identifier", "model", "attribute", "model", "type", "TAG"],
                           attribute]}


class FakeClient:
    """Answers FT.DEBUG VECSIM_INFO with ``ef_runtime``, or refuses it (``None``)."""

    def __init__(self, ef_runtime: int | None) -> None:
        self.ef_runtime = ef_runtime

    def execute_command(self, *args: Any) -> Any:
        if self.ef_runtime is None:
            raise redis.ResponseError("unknown command 'FT.DEBUG'")
        return [b"ALGORITHM", b"TIERED", b"BACKEND_INDEX",
                [b"ALGORITHM", b"HNSW", b"EF_RUNTIME", self.ef_runtime]]


def test_settings_then_the_manifest_override() -> None:
    settings = Settings(index_m=24, index_ef_runtime=50)
    assert index_config(manifest(), settings.redis) == IndexConfig(m=24, ef_runtime=50)
    over = index_config(manifest(index={"algorithm": "flat", "type": "float16"}), settings.redis)
    assert (over.algorithm, over.vector_type, over.m) == ("FLAT", "FLOAT16", 24)


@pytest.mark.parametrize("raw", [
    {"algorithm": "IVF"}, {"vector_type": "BFLOAT16"}, {"m": 0}, {"ef_runtime": "many"},
    {"ef_construction": True}, {"graph": 3}, "HNSW",
])
def test_a_bad_manifest_override_names_the_model(raw: Any) -> None:
    with pytest.raises(ConfigError, match="model m1"):
        index_config(manifest(index=raw), Settings().redis)


def test_settings_refuse_what_the_server_cannot_make() -> None:
    with pytest.raises(ValueError):
        Settings(index_algorithm="IVF")
    with pytest.raises(ValueError):
        Settings(index_m=0)


def test_explicit_means_asked_for_not_defaulted() -> None:
    assert not explicit(manifest(), Settings().redis)
    assert explicit(manifest(), Settings(index_ef_construction=64).redis)
    assert explicit(manifest(index={"m": 8}), Settings().redis)


def test_create_attributes_per_algorithm() -> None:
    hnsw = IndexConfig(m=12, ef_construction=64, ef_runtime=80, vector_type="FLOAT16")
    assert hnsw.attributes(384) == {"TYPE": "FLOAT16", "DIM": 384, "DISTANCE_METRIC": "COSINE",
                                    "M": 12, "EF_CONSTRUCTION": 64, "EF_RUNTIME": 80}
    assert IndexConfig(algorithm="FLAT").attributes(4) == {
        "TYPE": "FLOAT32", "DIM": 4, "DISTANCE_METRIC": "COSINE"}
    svs = IndexConfig(algorithm="SVS-VAMANA").attributes(4)
    assert (svs["GRAPH_MAX_DEGREE"], svs["CONSTRUCTION_WINDOW_SIZE"],
            svs["SEARCH_WINDOW_SIZE"]) == (32, 64, 100)
    args = vector_field(hnsw, 384).redis_args()
    assert args[:3] == ["embedding", "VECTOR", "HNSW"] and args[3] == 12


def test_vector_bytes_round_trip_in_both_types() -> None:
    vector = np.array([0.5, -0.25, 0.125, 1.0], dtype=np.float32)
    for kind, size in (("FLOAT32", 16), ("FLOAT16", 8)):
        blob = vector_bytes(vector, kind)
        assert len(blob) == size
        assert np.array_equal(stored_vector(blob, 4), vector)
    assert vector_bytes(vector.astype(np.float64)) == vector.tobytes()  # float32 little-endian
    assert stored_vector(vector_bytes(vector, "FLOAT16"), 4).dtype == np.float32


def test_vector_bytes_refuses_what_float16_cannot_hold() -> None:
    with pytest.raises(ValueError, match="FLOAT16"):
        vector_bytes(np.array([1e5, 0.0], dtype=np.float32), "FLOAT16")
    with pytest.raises(ValueError, match="unknown vector type"):
        vector_bytes(np.zeros(2), "BFLOAT16")


def test_stored_vector_refuses_another_dimension() -> None:
    with pytest.raises(ValueError, match="not 3-d"):
        stored_vector(np.zeros(4, np.float32).tobytes(), 3)


def test_existing_config_reads_ft_info() -> None:
    assert existing_config(info(m=8, efc=64, dim=384)) == (
        IndexConfig(m=8, ef_construction=64), 384)
    assert existing_config(info("FLAT", "FLOAT16")) == (
        IndexConfig(algorithm="FLAT", vector_type="FLOAT16"), 4)
    assert existing_config(info(data_type="BFLOAT16")) == (None, 4)
    assert existing_config({"attributes": []}) == (None, None)


def test_the_same_index_kept_with_its_runtime_ef() -> None:
    wanted = IndexConfig(ef_runtime=50)
    assert check_existing(FakeClient(50), "i", manifest(), wanted, info(), asked=True) == wanted
    # A server that does not tell EF_RUNTIME: nothing to compare it with.
    assert check_existing(FakeClient(None), "i", manifest(), wanted, info(), asked=True) == wanted


def test_another_dimension_is_refused() -> None:
    with pytest.raises(ConfigError, match="holds 8-d vectors but model m1 makes 4-d"):
        check_existing(FakeClient(10), "i", manifest(), IndexConfig(), info(dim=8), asked=False)


@pytest.mark.parametrize(("wanted", "have", "ef"), [
    (IndexConfig(ef_construction=100), info(), 100),
    (IndexConfig(vector_type="FLOAT16"), info(), 100),
    (IndexConfig(algorithm="FLAT"), info(), 100),
    (IndexConfig(ef_runtime=100), info(), 10),
    (IndexConfig(), info("FLAT"), None),
])
def test_asking_for_other_settings_is_refused_with_the_way_out(
    wanted: IndexConfig, have: dict[str, Any], ef: int | None
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_existing(FakeClient(ef), "pre:idx:m1", manifest(), wanted, have, asked=True)
    message = str(caught.value)
    assert "pre:idx:m1 was created as" in message and wanted.describe() in message
    assert "roll out to a new index" in message and "m1-v2" in message
    assert "embedstream replay topic --model m1-v2" in message


def test_an_index_made_under_other_defaults_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    old = info(efc=PREVIOUS_DEFAULTS.ef_construction, m=PREVIOUS_DEFAULTS.m)
    with caplog.at_level(logging.WARNING):
        have = check_existing(FakeClient(PREVIOUS_DEFAULTS.ef_runtime), "i", manifest(),
                              IndexConfig(ef_construction=64, ef_runtime=100), old, asked=False)
    assert have == PREVIOUS_DEFAULTS  # writes follow the index as it is (its vector type)
    assert "kept as it is" in caplog.text


def test_flat_indexes_ignore_graph_settings() -> None:
    flat = IndexConfig(algorithm="FLAT", m=4, ef_construction=8)
    assert check_existing(FakeClient(None), "i", manifest(), flat, info("FLAT"), asked=True) \
        .algorithm == "FLAT"


def test_creation_error_names_what_the_server_lacks() -> None:
    err = redis.ResponseError("Bad arguments for vector similarity algorithm: Unknown argument")
    found = creation_error(IndexConfig(algorithm="SVS-VAMANA"), err)
    assert found is not None and "SVS-VAMANA needs Redis 8.2" in str(found)
    assert creation_error(IndexConfig(), redis.ResponseError("Index already exists")) is None
