"""The query side of rollouts: which model answers for a name, embedded and searched as one.

A query for a name is embedded with the model serving that name (NEW once a
rollout replacing it is promoted, from the control document) and searched in
that model's own index, so its vector and the index are always of one space.
A promotion that lands between the two is caught (:class:`IndexMoved`, or a
dimension the index refuses) and the query is embedded again with NEW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from embedstream.errors import SinkError
from embedstream.rollout.state import read_control
from embedstream.search import Hit, search_vector
from embedstream.sinks.cluster import Client

_ATTEMPTS = 3


def serving(client: Client, prefix: str, name: str) -> str:
    """The model whose vectors answer queries for ``name`` now."""
    try:
        return read_control(client, prefix).serving(name)
    except redis.RedisError as err:
        raise SinkError(f"cannot read the model control document: {err}") from err


def search_serving(
    client: Client, prefix: str, name: str, embed: Callable[[str], np.ndarray], k: int,
    **options: Any,
) -> tuple[str, list[Hit]]:
    """(model, hits) of a query for ``name``: ``embed(model)`` gives the query's vector
    for the model serving ``name``; ``options`` go to :func:`search_vector`."""
    for attempt in range(_ATTEMPTS):
        model = serving(client, prefix, name)
        vector = embed(model)
        try:
            return model, search_vector(client, prefix, model, vector, k, **options)
        except SinkError:
            if attempt == _ATTEMPTS - 1 or serving(client, prefix, name) == model:
                raise
    raise AssertionError("unreachable")
