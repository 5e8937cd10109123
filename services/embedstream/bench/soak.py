"""``embedstream bench --soak SECONDS``: does the worker's memory stay flat?

A real ``embedstream worker`` process serves a steady offered load (unique
texts at ``--soak-rate`` per second) through the embedded broker and Redis for
the whole duration, while its resident memory (``VmRSS``) is sampled. Memory
grows while the process warms up: ONNX Runtime's arena grows to the largest
batch it has run (the worker runs that batch at startup, see
``embedstream.runtime.warmup``); tokenizer caches and client buffers settle in
the first minute. Growth is measured from the first
sample after that minute (or a fifth of a shorter run) to the last one; the
target is at most 5%. Every offered event must
also be stored, or the run fails: a worker that falls behind holds a growing
backlog, and that is not the leak this measures.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedstream.bench.pipeline import WorkerProcess, bench_stack, wait_stored
from embedstream.errors import BenchError
from embedstream.producer import Producer
from embedstream.settings import Settings

log = logging.getLogger(__name__)

GROWTH_LIMIT = 0.05
"""Most growth of RSS from the end of the warm-up to the end of the run."""


@dataclass(frozen=True, slots=True)
class SoakConfig:
    texts: list[str]
    """Offered in order, one per event; as many as rate x duration."""
    model: str
    rate: float
    duration_s: float
    sample_s: float
    warmup_s: float
    threads: int
    batch_size: int


@dataclass(slots=True)
class SoakResult:
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the load started, worker RSS in MB)."""
    offered: int = 0
    stored: int = 0
    baseline_index: int = 0
    """The first sample after the warm-up (the last sample if none is later)."""

    @property
    def baseline_mb(self) -> float:
        return self.samples[self.baseline_index][1]

    @property
    def final_mb(self) -> float:
        return self.samples[-1][1]

    @property
    def growth(self) -> float:
        return self.final_mb / self.baseline_mb - 1.0

    def summary(self) -> str:
        peak = max(rss for _, rss in self.samples)
        at = self.samples[self.baseline_index][0]
        return (
            f"soak: {self.offered} events offered over {self.samples[-1][0]:.0f} s, "
            f"{self.stored} stored; worker RSS {self.baseline_mb:.0f} MB at {at:.0f} s -> "
            f"{self.final_mb:.0f} MB at the end ({100 * self.growth:+.1f}%), peak {peak:.0f} MB"
        )

    def target(self) -> dict[str, Any]:
        # >=: a redelivered event (after a rebalance) counts twice, and loses nothing.
        met = self.growth <= GROWTH_LIMIT and self.stored >= self.offered
        return {"target": f"worker memory flat under load (growth <= {GROWTH_LIMIT:.0%})",
                "met": met, "figure": f"{100 * self.growth:+.1f}%, "
                f"{self.stored}/{self.offered} stored"}

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(baseline_mb=self.baseline_mb, final_mb=self.final_mb, growth=self.growth)
        return data


def run_soak(base: Settings, config: SoakConfig) -> SoakResult:
    """Run the soak on a fresh embedded stack; raises BenchError if events go missing."""
    with bench_stack("bench-soak") as stack:
        run = "s" + uuid.uuid4().hex[:8]
        settings = base.model_copy(update={
            "kafka_bootstrap": stack.bootstrap, "redis_url": stack.redis_url,
            "topic_text": f"{run}.text", "topic_dlq": f"{run}.dlq",
            "group_id": f"{run}-group", "key_prefix": run,
        })
        warm = _warm_up_events(settings, config, run)
        worker = WorkerProcess(settings, config.model, config.threads, config.batch_size)
        try:
            worker.wait_ready()
            wait_stored(worker, warm, timeout_s=120)
            result = _offer(settings, worker, config, run)
            wait_stored(worker, warm + result.offered, timeout_s=120)
            result.stored = int(worker.stored()) - warm
        finally:
            worker.stop()
    return result


def _warm_up_events(settings: Settings, config: SoakConfig, run: str) -> int:
    """Queue the warm-up before the worker starts; return how many events it holds.

    One batch of the longest texts and one of ordinary ones, queued before the
    worker joins: the group join and the first real batches happen before the
    measurement. (The worker's own warm-up has already run the largest batch
    shape by then, see ``embedstream.runtime.warmup``.)
    """
    longest = sorted(config.texts, key=len)[-config.batch_size:]
    warm = longest + config.texts[: config.batch_size]
    with Producer(settings.kafka) as producer:  # also creates the topics
        for i, text in enumerate(warm):
            producer.send_text(text, id=f"{run}-warm-{i}")
        producer.flush()
    return len(warm)


def _offer(settings: Settings, worker: WorkerProcess, config: SoakConfig, run: str) -> SoakResult:
    """Offer events at the configured rate, sampling the worker's RSS as it goes."""
    result = SoakResult()
    total = min(len(config.texts), int(config.rate * config.duration_s))
    with Producer(settings.kafka, create_topics=False) as producer:
        start = time.monotonic()
        next_sample = start
        while result.offered < total:
            now = time.monotonic()
            due = min(total, int((now - start) * config.rate) + 1)
            for i in range(result.offered, due):
                producer.send_text(config.texts[i], id=f"{run}-{i}")
            result.offered = due
            if now >= next_sample:
                result.samples.append((now - start, _rss_mb(worker)))
                elapsed, rss = result.samples[-1]
                log.info("soak: %.0f s, %d offered, RSS %.0f MB", elapsed, result.offered, rss)
                next_sample += config.sample_s
            time.sleep(min(0.05, max(0.0, start + due / config.rate - time.monotonic())))
        producer.flush()
    result.samples.append((time.monotonic() - start, _rss_mb(worker)))
    after_warmup = [i for i, (t, _) in enumerate(result.samples) if t >= config.warmup_s]
    result.baseline_index = after_warmup[0] if after_warmup else len(result.samples) - 1
    return result


def _rss_mb(worker: WorkerProcess) -> float:
    if worker.proc.poll() is not None:
        raise BenchError(f"the worker exited with {worker.proc.returncode} during the soak")
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError("cannot read the worker's memory (VmRSS)")
