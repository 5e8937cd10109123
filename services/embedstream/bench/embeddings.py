"""``embedstream bench --embeddings``: the gateway's dynamic batching, on loopback.

A gateway app (the real one, the default text model, no broker or Redis
needed) serves ``POST /v1/embeddings`` from uvicorn on 127.0.0.1, in a process
of its own; an async httpx client offers the same texts three ways:

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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstream.bench.inputs import file_texts, generated_texts
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
    """No store: no control document (every model serves its own name)."""

    def get(self, key: str) -> None:
        return None

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _serve_forever(settings: Settings, model: str, port: int) -> None:
    """The gateway (child process): the real app, the model, no broker or Redis."""
    import uvicorn

    from embedstream.gateway.app import create_app
    from embedstream.gateway.query import Searcher
    from embedstream.runtime.loader import load_configured
    from embedstream.testing import MemoryPublisher

    models = load_configured(settings, [model], threads=settings.intra_op_threads or 1)
    searcher = Searcher(settings, models, _NoRedis())  # type: ignore[arg-type]
    uvicorn.run(create_app(settings, MemoryPublisher(), searcher), host="127.0.0.1", port=port,
                log_config=None, access_log=False)


def _serve(settings: Settings, model: str) -> tuple[Any, int]:
    """The gateway in a process of its own, so that the load generator does not take the
    server's interpreter lock (one process for both measured the lock, not the batching)."""
    import multiprocessing
    import socket

    from embedstream.devstack import free_port

    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_forever, args=(settings, model, port), daemon=True)
    process.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            if time.monotonic() > deadline or not process.is_alive():
                process.kill()
                raise BenchError("the gateway did not start") from None
            time.sleep(0.1)


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
    process, port = _serve(settings, model)
    try:
        row = asyncio.run(_offer(f"http://127.0.0.1:{port}", model, texts, clients, per_request))
    finally:
        process.terminate()
        process.join(30)
    return Row(name, row.texts, row.seconds, row.latencies_s)


def _in_process(settings: Settings, model: str, name: str, texts: list[str]) -> Row:
    """The batcher alone, no HTTP: ``CLIENTS`` threads, each embedding one text at a time
    through the gateway's own ``Searcher`` (prepare, submit, wait)."""
    from concurrent.futures import ThreadPoolExecutor

    from embedstream.gateway.query import Searcher
    from embedstream.runtime.loader import load_configured

    models = load_configured(settings, [model], threads=settings.intra_op_threads or 1)
    searcher = Searcher(settings, models, _NoRedis())  # type: ignore[arg-type]
    info = searcher.model_for(model, "text")
    latencies: list[float] = []

    def one(text: str) -> None:
        started = time.perf_counter()
        (future,) = searcher.submit(info, searcher.prepare(info, [text]))
        future.result()
        latencies.append(time.perf_counter() - started)

    try:
        searcher.embed(info, texts[0])  # warm
        with ThreadPoolExecutor(CLIENTS) as pool:
            started = time.perf_counter()
            list(pool.map(one, texts))
            seconds = time.perf_counter() - started
    finally:
        searcher.close()
    return Row(name, len(texts), seconds, latencies)


def run_embeddings_command(settings: Settings, args: argparse.Namespace) -> int:
    model = args.model or settings.default_text_model
    count = 256 if args.smoke else args.texts
    if args.file:  # the user's own texts (e.g. their queries), repeated up to the count
        own = file_texts(args.file)
        texts = [own[i % len(own)] for i in range(count)]
    else:
        texts = generated_texts(count, args.seed)
    single = settings.model_copy(update={"batch_max_items": 1})
    rows = [
        _in_process(settings, model, f"no HTTP: {CLIENTS} threads, 1 each", texts),
        _in_process(single, model, "no HTTP: same, batching off", texts),
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
