"""``embedstream bench``: throughput, latency and quality; the store; memory; clients.

The arguments of every bench live here; what each bench does lives in
:mod:`embedstream.bench` (``run_bench_command`` picks the one asked for).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedstream.cli.flags import add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", choices=["text", "image", "audio"], default="text",
                       help="which kind of model to bench (default text)")
    parser.add_argument("--texts", type=int, default=2000, help="generated texts (default 2000)")
    parser.add_argument("--images", type=int, default=400, help="generated images (default 400)")
    parser.add_argument("--clips", type=int, default=300, help="generated audio clips (default 300)")
    parser.add_argument("--file", type=Path, help="your own inputs instead: texts one per line, "
                       "or a directory (or file) of images / audio files (--store: the texts "
                       "whose embeddings seed the vectors)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated inputs")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every row")
    parser.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    parser.add_argument("--rows", type=lambda s: s.split(","),
                       help="comma-separated rows: peer, ort-fp32, ort-int8, pipeline-fp32, "
                       "pipeline-int8 (default: all; images and audio: no int8 rows)")
    parser.add_argument("--rounds", type=int, default=2,
                       help="interleaved rounds of the in-process rows; the best counts")
    parser.add_argument("--latency-s", type=float, default=20.0,
                       help="seconds of the offered-load (latency) run per pipeline row")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--model", help="fp32 model (default: the modality's default model)")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the bench works")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                       help="instead: a worker under steady load for SECONDS (600 for the "
                       "10-minute check); reports its memory growth")
    parser.add_argument("--soak-rate", type=float, default=40.0,
                       help="events per second offered during the soak (default 40)")
    parser.add_argument("--soak-sample-s", type=float, default=30.0,
                       help="seconds between memory samples of the soak (default 30)")
    parser.add_argument("--memory", action="store_true",
                       help="memory per worker instead: RSS of the worker's models after their "
                       "warm-up and after the texts, beside the peer's, each in a fresh process")
    parser.add_argument("--memory-models", choices=["default", "all"], default="default",
                       help="--memory: also one row per model in the model directory and one "
                       "serving them all (all)")
    parser.add_argument("--documents", type=int, metavar="N",
                       help="long documents instead: N documents of several windows each "
                       "(or your own, one per line of --file) chunked vs truncated, one worker "
                       "each: documents/s, vectors/s, real and padded tokens")
    parser.add_argument("--clients", action="store_true",
                       help="Kafka client ceilings instead: produce and consume msg/s of each "
                       "client library and of our Sources, no model (README: Performance)")
    parser.add_argument("--embeddings", action="store_true",
                       help="the gateway's dynamic batching instead: POST /v1/embeddings on "
                       "loopback, 64 concurrent single-text clients vs one client sending "
                       "batches; texts/s, p50/p99 (README: OpenAI-compatible embeddings)")
    parser.add_argument("--messages", type=int, default=100_000,
                       help="--clients: messages per client and value size (default 100000; "
                       "--smoke: 2000)")
    parser.add_argument("--store", action="store_true",
                       help="the store instead: write rate, memory and recall@10 of each index "
                       "configuration as the index grows, and the pipeline into the full index")
    parser.add_argument("--vectors", type=int, default=1_000_000,
                       help="--store: vectors per configuration (default 1000000; --smoke: 3000)")
    parser.add_argument("--dim", type=int, help="--store: vector dimension (default: the model's)")
    parser.add_argument("--store-configs", type=lambda s: s.split(","),
                       help="--store: comma-separated index configurations: today (before index "
                       "settings), default (these settings), flat, none, or specs like "
                       "hnsw:m=16:efc=64:efr=100:type=float16 (default: today,default)")
    parser.add_argument("--store-steps", type=lambda s: [int(v) for v in s.split(",")],
                       help="--store: index sizes to measure at, ending at --vectors "
                       "(default: 1-2-5 steps from --vectors/100)")
    parser.add_argument("--queries", type=int, default=200,
                       help="--store: held-out queries for recall@10 (default 200)")
    parser.add_argument("--store-shards", type=int, default=0, metavar="N",
                       help="--store: also write --vectors vectors into one server and into a "
                       "Redis Cluster of N masters (the --store-pipeline configuration), and "
                       "report writes/s of each (default 0: not measured)")
    parser.add_argument("--store-pipeline", default="default", metavar="CONFIG",
                       help="--store: configuration the pipeline row writes into at its final "
                       "size, with --texts texts ('off': no pipeline row; default: default)")
    add_settings_flags(parser, ("model_dir",))


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedstream.bench.command import run_bench_command

    return run_bench_command(settings, args)


COMMANDS = (Command("bench", "throughput, latency and quality: peer vs ORT vs pipeline",
                    add_arguments, run),)
