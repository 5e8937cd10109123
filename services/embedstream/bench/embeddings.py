"""``embedstream bench --embeddings``: the gateway's dynamic batching, on loopback.

A gateway app (the real one, the default text model, no broker or Redis
needed) serves ``POST /v1/embeddings`` from uvicorn on 127.0.0.1; an async
httpx client offers the same texts three ways:

- ``64 clients, 1 text each``: 64 concurrent clients, each sending one text per
  request, back to back (what N application threads embedding queries do);
- ``same, batching off``: the same load with the batch budget at one item, so
  every request is its own model call (what the gateway did before batching);
- ``1 client, batches``: one client sending ``--batch-size`` texts per request.

Throughput counts texts per second; latency is per request (p50, p99). Bounded:
``--texts`` texts per row, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstream.bench.inputs import generated_texts
from embedstream.errors import BenchError
from embedstream.settings import Settings

CLIENTS = 64


@dataclass(frozen=True)
class Row:
    name: str
    texts: int
    seconds: float
    latencies_s: list[float]

    def line(self) -> str:
        lat = np.asarray(self.latencies_s) * 1000
        return (f"{self.name:<28} {self.texts / self.seconds:>9.0f} {np.percentile(lat, 50):>9.1f} "
                f"{np.percentile(lat, 99):>9.1f}")


class _NoRedis:
    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _serve(settings: Settings, model: str) -> tuple[Any, int, threading.Thread]:
    import uvicorn

    from embedstream.devstack import free_port
    from embedstream.gateway.app import create_app
    from embedstream.gateway.query import Searcher
    from embedstream.runtime.loader import load_models
    from embedstream.testing import MemoryPublisher

    models = load_models(settings.model_dir, [model], providers=settings.providers,
                         threads=settings.intra_op_threads or 1)
    searcher = Searcher(settings, models, _NoRedis())  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, MemoryPublisher(), searcher),
                                           host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise BenchError("the gateway did not start")
        time.sleep(0.05)
    return server, port, thread


async def _offer(url: str, model: str, texts: list[str], clients: int, per_request: int) -> Row:
    import httpx

    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    pending = iter(requests)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for batch in pending:  # the clients share one iterator: each request is sent once
            started = time.perf_counter()
            res = await http.post("/v1/embeddings", json={"model": model, "input": batch})
            if res.status_code != 200:
                raise BenchError(f"/v1/embeddings answered {res.status_code}: {res.text[:200]}")
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await http.post("/v1/embeddings", json={"model": model, "input": texts[:8]})  # warm
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return Row("", len(texts), seconds, latencies)


def _row(settings: Settings, model: str, name: str, texts: list[str], clients: int,
         per_request: int) -> Row:
    server, port, thread = _serve(settings, model)
    try:
        row = asyncio.run(_offer(f"http://127.0.0.1:{port}", model, texts, clients, per_request))
    finally:
        server.should_exit = True
        thread.join(30)
    return Row(name, row.texts, row.seconds, row.latencies_s)


def run_embeddings_command(settings: Settings, args: argparse.Namespace) -> int:
    model = args.model or settings.default_text_model
    count = 256 if args.smoke else args.texts
    texts = generated_texts(count, args.seed)
    single = settings.model_copy(update={"batch_max_items": 1})
    rows = [
        _row(settings, model, f"{CLIENTS} clients, 1 text each", texts, CLIENTS, 1),
        _row(single, model, "same, batching off", texts, CLIENTS, 1),
        _row(settings, model, f"1 client, {args.batch_size} per request", texts, 1,
             args.batch_size),
    ]
    print(f"POST /v1/embeddings on loopback, {model}, {count} texts per row, "
          f"batch budget {settings.batch_max_items} items / {settings.batch_max_tokens} tokens, "
          f"{settings.intra_op_threads or 1} inference thread(s)")
    print(f"{'row':<28} {'texts/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for row in rows:
        print(row.line())
    return 0
