"""The ``embedstream`` command. The only place that configures logging.

Every flag that names a setting overrides its ``EMBEDSTREAM_*`` environment
variable; unset flags leave the environment (or the default) in force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from embedstream import __version__
from embedstream.errors import EmbedstreamError
from embedstream.settings import Settings

log = logging.getLogger("embedstream")


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers [EMBEDSTREAM_KAFKA_BOOTSTRAP]")
    p.add_argument("--redis-url", help="Redis URL [EMBEDSTREAM_REDIS_URL]")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, help="root of model dirs [EMBEDSTREAM_MODEL_DIR]")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help="ONNX Runtime providers, comma-separated [EMBEDSTREAM_PROVIDERS]")
    p.add_argument("--intra-op-threads", type=int,
                   help="inference threads per process [EMBEDSTREAM_INTRA_OP_THREADS]")
    p.add_argument("--inference-instances", type=int,
                   help="model instances per process, each on its own inference thread; 0: auto "
                   "(2 on CPU with 2+ threads, else 1) "
                   "[EMBEDSTREAM_INFERENCE_INSTANCES]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedstream",
        description="Real-time embeddings: Kafka events in, ONNX Runtime workers, Redis vectors out.",
    )
    parser.add_argument("--version", action="version", version=f"embedstream {__version__}")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING [EMBEDSTREAM_LOG_LEVEL]")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="consume events, embed them, store them in Redis")
    _add_connection_flags(worker)
    _add_model_flags(worker)
    worker.add_argument("--models", type=lambda s: s.split(","),
                        help="models to serve, comma-separated (default: all in --model-dir)")
    worker.add_argument("--group-id", help="consumer group [EMBEDSTREAM_GROUP_ID]")
    worker.add_argument("--kafka-client", choices=["kafka-python", "confluent"],
                        help="Kafka client library of the consumer and dead letters; "
                        "confluent needs the confluent extra [EMBEDSTREAM_KAFKA_CLIENT]")
    worker.add_argument("--processes", type=int, help="worker processes [EMBEDSTREAM_PROCESSES]")
    worker.add_argument("--metrics-port", type=int,
                        help="port of /metrics /healthz /readyz, 0 = off [EMBEDSTREAM_METRICS_PORT]")
    worker.add_argument("--metrics-host", help="bind address [EMBEDSTREAM_METRICS_HOST]")
    worker.add_argument("--batch-max-items", type=int, help="[EMBEDSTREAM_BATCH_MAX_ITEMS]")
    worker.add_argument("--batch-max-tokens", type=int, help="[EMBEDSTREAM_BATCH_MAX_TOKENS]")
    worker.add_argument("--batch-max-wait-ms", type=int, help="[EMBEDSTREAM_BATCH_MAX_WAIT_MS]")
    worker.add_argument("--topic-partitions", type=int,
                        help="partitions of created topics [EMBEDSTREAM_TOPIC_PARTITIONS]")
    worker.add_argument("--shutdown-timeout-s", type=float,
                        help="drain time on SIGTERM [EMBEDSTREAM_SHUTDOWN_TIMEOUT_S]")

    produce = sub.add_parser("produce", help="publish events to Kafka")
    produce_sub = produce.add_subparsers(dest="modality", required=True)
    text = produce_sub.add_parser("text", help="plain lines or JSONL envelopes")
    text.add_argument("path", help="file to read, or - for standard input")
    text.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_connection_flags(text)
    for modality in ("image", "audio"):
        files = produce_sub.add_parser(modality, help=f"{modality} files and directories (recursive)")
        files.add_argument("paths", nargs="+", help="files, or directories to walk")
        files.add_argument("--form", choices=["inline", "raw", "uri"], default="inline",
                           help="inline: base64 in the envelope (default); raw: the record value "
                           "is the file; uri: a file:// claim check (the worker needs uri_roots)")
        files.add_argument("--model", help=f"model to embed with (default: the {modality} default)")
        files.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_connection_flags(files)

    search = sub.add_parser("search", help="nearest stored items to a text, image or audio query")
    search.add_argument("query", nargs="?", help="query text")
    example = search.add_mutually_exclusive_group()
    example.add_argument("--image", type=Path, help="search by example: an image file")
    example.add_argument("--audio", type=Path, help="search by example: an audio file")
    search.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    search.add_argument("--model", help="model to search (default: the modality's default model)")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.add_argument("--all-chunks", action="store_true",
                        help="every matching chunk, not one hit per document (its best chunk)")
    _add_connection_flags(search)
    _add_model_flags(search)

    gateway = sub.add_parser("gateway", help="HTTP ingest gateway, search API and search page")
    gateway.add_argument("--host", dest="gateway_host", help="bind address [EMBEDSTREAM_GATEWAY_HOST]")
    gateway.add_argument("--port", dest="gateway_port", type=int,
                         help="port [EMBEDSTREAM_GATEWAY_PORT]")
    gateway.add_argument("--api-keys-file", dest="gateway_api_keys_file", type=Path,
                         help="file of API keys, one a line [EMBEDSTREAM_GATEWAY_API_KEYS_FILE]")
    gateway.add_argument("--allow-anonymous", dest="gateway_allow_anonymous",
                         action="store_const", const=True,
                         help="serve a non-loopback address without API keys, on purpose "
                         "[EMBEDSTREAM_GATEWAY_ALLOW_ANONYMOUS]")
    gateway.add_argument("--no-search", dest="gateway_search", action="store_const", const=False,
                         help="ingest only: load no models [EMBEDSTREAM_GATEWAY_SEARCH=false]")
    gateway.add_argument("--models", type=lambda s: s.split(","),
                         help="models to search, comma-separated (default: all in --model-dir)")
    _add_connection_flags(gateway)
    _add_model_flags(gateway)

    api_key = sub.add_parser("api-key", help="make a gateway API key and its keys-file line")
    api_key.add_argument("--scopes", default="ingest,search",
                         help="comma-separated: ingest, search, admin (default ingest,search)")
    api_key.add_argument("--tenant", help="bind the key to this tenant")
    api_key.add_argument("--name", help="a label for logs (never the key)")
    api_key.add_argument("--rate", type=float, help="requests per second (default: the gateway's)")
    api_key.add_argument("--plain", action="store_true",
                         help="print the line with the key itself instead of its salted hash")

    export = sub.add_parser("export", help="export a checkpoint to an ONNX model directory")
    export.add_argument("checkpoint", nargs="?",
                        help="text: sentence-transformers / transformers checkpoint dir (default: "
                        "all-MiniLM-L6-v2); image/audio: weights file or transformers dir "
                        "(default: EfficientNet-Lite0 / aiSFX); wordvec: the vectors file")
    export.add_argument("--kind", choices=["text", "image", "audio", "wordvec"], default="text",
                        help="model family to export (default text)")
    export.add_argument("--family", help="image: efficientnet-lite | transformers; "
                        "audio: aisfx | transformers")
    export.add_argument("--format", dest="fmt", default="word2vec",
                        help="wordvec: word2vec | word2vec-text | glove | fasttext | gensim | spacy")
    export.add_argument("--sif", type=float, help="wordvec: SIF weighting with this 'a' (e.g. 1e-3)")
    export.add_argument("--name", help="model name (default all-minilm-l6-v2 for the default)")
    export.add_argument("--model-dir", type=Path, help="output root [EMBEDSTREAM_MODEL_DIR]")
    export.add_argument("--pooling", choices=["mean", "cls", "max"], help="override pooling")
    export.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    export.add_argument("--max-length", type=int, help="override the token limit")
    export.add_argument("--token-mode", action="store_true",
                        help="text: also output per-token contextual vectors (stored beside the "
                        "pooled one as token_embeddings)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--overwrite", action="store_true", help="replace an existing model dir")
    export.add_argument("--no-optimize", action="store_true",
                        help="keep the exporter's graph (default: fuse it for ONNX Runtime)")

    quantize = sub.add_parser(
        "quantize", help="derive an int8 (CPU) or fp16 (GPU) model, with a quality gate")
    quantize.add_argument("model", help="name of an fp32 model under --model-dir")
    precision = quantize.add_mutually_exclusive_group()
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8",
                           help="int8 dynamic, per-channel weights, for CPUs (the default)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 weights and activations, for GPUs")
    quantize.set_defaults(precision="int8")
    quantize.add_argument("--name", help="new model name (default <model>-int8 / -fp16)")
    quantize.add_argument("--model-dir", type=Path, help="models root [EMBEDSTREAM_MODEL_DIR]")
    quantize.add_argument("--force", action="store_true",
                          help="keep the result even below the gate (int8: mean cosine 0.99, min 0.98; "
                          "fp16: 0.9999, 0.999)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing model dir")

    finetune = sub.add_parser(
        "finetune", help="adapt a text model to your pairs, measure it, export it (ONNX)")
    finetune.add_argument("--pairs", type=Path, required=True,
                          help='JSONL of {"query": ..., "positive": ...} (optional "negative", '
                          '"group")')
    finetune.add_argument("--name", required=True, help="name of the new model directory")
    finetune.add_argument("--base", help="sentence-transformers / transformers checkpoint to "
                          "adapt (default: all-MiniLM-L6-v2)")
    finetune.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    finetune.add_argument("--batch-size", type=int, default=32,
                          help="pairs per step; the rest of the batch are the negatives (default 32)")
    finetune.add_argument("--learning-rate", type=float, default=2e-5, help="default 2e-5")
    finetune.add_argument("--warmup-ratio", type=float, default=0.1,
                          help="share of the steps warming the learning rate up (default 0.1)")
    finetune.add_argument("--max-length", type=int,
                          help="token limit for training, measuring and the exported model "
                          "(default: the base's); lower is faster")
    finetune.add_argument("--eval-size", type=float, default=0.1,
                          help="held-out pairs: a share below 1, else a count (default 0.1)")
    finetune.add_argument("--eval-pairs", type=Path,
                          help="measure on this pairs file instead of a held-out split")
    finetune.add_argument("--seed", type=int, default=13,
                          help="seed of the split and of the training (default 13)")
    finetune.add_argument("--threads", type=int, default=0,
                          help="CPU threads for torch (default 0: the cores this process may "
                          "use); fewer can be faster on a busy machine")
    finetune.add_argument("--model-dir", type=Path, help="output root [EMBEDSTREAM_MODEL_DIR]")
    finetune.add_argument("--force", action="store_true",
                          help="write the model even if it ranks worse than the base (MRR@10)")
    finetune.add_argument("--overwrite", action="store_true", help="replace an existing model dir")
    finetune.add_argument("--json", action="store_true", help="print the report as JSON")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="throughput, latency and quality: peer vs ORT vs pipeline")
    bench.add_argument("--modality", choices=["text", "image", "audio"], default="text",
                       help="which kind of model to bench (default text)")
    bench.add_argument("--texts", type=int, default=2000, help="generated texts (default 2000)")
    bench.add_argument("--images", type=int, default=400, help="generated images (default 400)")
    bench.add_argument("--clips", type=int, default=300, help="generated audio clips (default 300)")
    bench.add_argument("--file", type=Path, help="your own inputs instead: texts one per line, "
                       "or a directory (or file) of images / audio files (--store: the texts "
                       "whose embeddings seed the vectors)")
    bench.add_argument("--seed", type=int, default=7, help="seed of the generated inputs")
    bench.add_argument("--batch-size", type=int, default=32, help="batch size of every row")
    bench.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    bench.add_argument("--rows", type=lambda s: s.split(","),
                       help="comma-separated rows: peer, ort-fp32, ort-int8, pipeline-fp32, "
                       "pipeline-int8 (default: all; images and audio: no int8 rows)")
    bench.add_argument("--rounds", type=int, default=2,
                       help="interleaved rounds of the in-process rows; the best counts")
    bench.add_argument("--latency-s", type=float, default=20.0,
                       help="seconds of the offered-load (latency) run per pipeline row")
    bench.add_argument("--json", type=Path, help="also write the results as JSON here")
    bench.add_argument("--model", help="fp32 model (default: the modality's default model)")
    bench.add_argument("--model-dir", type=Path, help="models root [EMBEDSTREAM_MODEL_DIR]")
    bench.add_argument("--smoke", action="store_true", help="tiny run to check the bench works")
    bench.add_argument("--soak", type=float, metavar="SECONDS",
                       help="instead: a worker under steady load for SECONDS (600 for the "
                       "10-minute check); reports its memory growth")
    bench.add_argument("--soak-rate", type=float, default=40.0,
                       help="events per second offered during the soak (default 40)")
    bench.add_argument("--soak-sample-s", type=float, default=30.0,
                       help="seconds between memory samples of the soak (default 30)")
    bench.add_argument("--memory", action="store_true",
                       help="memory per worker instead: RSS of the worker's models after their "
                       "warm-up and after the texts, beside the peer's, each in a fresh process")
    bench.add_argument("--memory-models", choices=["default", "all"], default="default",
                       help="--memory: also one row per model in the model directory and one "
                       "serving them all (all)")
    bench.add_argument("--documents", type=int, metavar="N",
                       help="long documents instead: N documents of several windows each "
                       "(or your own, one per line of --file) chunked vs truncated, one worker "
                       "each: documents/s, vectors/s, real and padded tokens")
    bench.add_argument("--clients", action="store_true",
                       help="Kafka client ceilings instead: produce and consume msg/s of each "
                       "client library and of our Sources, no model (README: Performance)")
    bench.add_argument("--embeddings", action="store_true",
                       help="the gateway's dynamic batching instead: POST /v1/embeddings on "
                       "loopback, 64 concurrent single-text clients vs one client sending "
                       "batches; texts/s, p50/p99 (README: OpenAI-compatible embeddings)")
    bench.add_argument("--messages", type=int, default=100_000,
                       help="--clients: messages per client and value size (default 100000; "
                       "--smoke: 2000)")
    bench.add_argument("--store", action="store_true",
                       help="the store instead: write rate, memory and recall@10 of each index "
                       "configuration as the index grows, and the pipeline into the full index")
    bench.add_argument("--vectors", type=int, default=1_000_000,
                       help="--store: vectors per configuration (default 1000000; --smoke: 3000)")
    bench.add_argument("--dim", type=int, help="--store: vector dimension (default: the model's)")
    bench.add_argument("--store-configs", type=lambda s: s.split(","),
                       help="--store: comma-separated index configurations: today (before index "
                       "settings), default (these settings), flat, none, or specs like "
                       "hnsw:m=16:efc=64:efr=100:type=float16 (default: today,default)")
    bench.add_argument("--store-steps", type=lambda s: [int(v) for v in s.split(",")],
                       help="--store: index sizes to measure at, ending at --vectors "
                       "(default: 1-2-5 steps from --vectors/100)")
    bench.add_argument("--queries", type=int, default=200,
                       help="--store: held-out queries for recall@10 (default 200)")
    bench.add_argument("--store-shards", type=int, default=0, metavar="N",
                       help="--store: also write --vectors vectors into one server and into a "
                       "Redis Cluster of N masters (the --store-pipeline configuration), and "
                       "report writes/s of each (default 0: not measured)")
    bench.add_argument("--store-pipeline", default="default", metavar="CONFIG",
                       help="--store: configuration the pipeline row writes into at its final "
                       "size, with --texts texts ('off': no pipeline row; default: default)")

    replay = sub.add_parser("replay", help="re-drive dead letters, re-embed a topic range")
    replay_sub = replay.add_subparsers(dest="what", required=True)
    redrive = replay_sub.add_parser("dlq", help="publish dead letters back to their source topics")
    redrive.add_argument("--reason", action="append", help="only this reason (repeatable)")
    redrive.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    _add_connection_flags(redrive)
    reembed = replay_sub.add_parser("topic", help="re-publish a topic range for another model")
    reembed.add_argument("topic", help="input topic to read")
    reembed.add_argument("--model", required=True, help="model (version) to embed with")
    reembed.add_argument("--partition", type=int, action="append", help="default: all")
    reembed.add_argument("--from-offset", type=int, default=0)
    reembed.add_argument("--to-offset", type=int, help="exclusive; default: the end")
    _add_connection_flags(reembed)

    from embedstream.rollout.commands import add_parsers as add_rollout_parsers

    add_rollout_parsers(sub, _add_connection_flags)

    dev = sub.add_parser("dev", help="the embedded development stack (broker + Redis)")
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument("--broker-port", type=int, default=9092)
    dev.add_argument("--redis-port", type=int, default=6379)
    dev.add_argument("--redis-shards", type=int, default=1,
                     help="up: a Redis Cluster of this many masters (ports --redis-port, +1, "
                     "...; cluster bus ports 10000 above); 1 (default): one server")
    dev.add_argument("--state-dir", type=Path, default=Path(".devstack"),
                     help="pid files, data and logs (default .devstack)")

    demo = sub.add_parser("demo", help="run the whole pipeline end to end on the embedded stack")
    demo.add_argument("--events", type=int, default=300, help="sample events to send")
    demo.add_argument("--model-dir", type=Path, help="root of model dirs [EMBEDSTREAM_MODEL_DIR]")
    return parser


# Flags whose dest is a Settings field; any that is set overrides the environment.
def _settings(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    overrides: dict[str, Any] = {
        name: value for name, value in vars(args).items()
        if name in fields and value is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise SystemExit(f"embedstream: invalid settings:\n{err}") from err


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to suggest a command line back
    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # kafka-python logs every connection at INFO; keep its warnings only.
        logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return int(_dispatch(args, settings) or 0)
    except EmbedstreamError as err:
        print(f"embedstream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    # Imports are per command: the worker never loads export code (torch).
    if args.command == "worker":
        from embedstream.worker.service import run_pool

        return run_pool(settings)
    if args.command == "produce":
        from embedstream.commands import produce_files, produce_text

        if args.modality == "text":
            return produce_text(settings, args.path, progress=not args.no_progress)
        return produce_files(settings, args.modality, args.paths, form=args.form,
                             model=args.model, progress=not args.no_progress)
    if args.command == "search":
        from embedstream.commands import search_example, search_text

        if args.image or args.audio:
            modality, path = ("image", args.image) if args.image else ("audio", args.audio)
            return search_example(settings, modality, path, k=args.k, model=args.model,
                                  as_json=args.json, all_chunks=args.all_chunks)
        if not args.query:
            raise SystemExit("embedstream search: give a query text, --image FILE or --audio FILE")
        return search_text(settings, args.query, k=args.k, model=args.model, as_json=args.json,
                           all_chunks=args.all_chunks)
    if args.command == "gateway":
        from embedstream.commands import gateway

        return gateway(settings)
    if args.command == "api-key":
        from embedstream.commands import make_api_key

        return make_api_key(args)
    if args.command == "export":
        from embedstream.commands import export_model

        return export_model(settings, args)
    if args.command == "quantize":
        from embedstream.commands import quantize_model

        return quantize_model(settings, args)
    if args.command == "finetune":
        from embedstream.commands import finetune_model

        return finetune_model(settings, args)
    if args.command == "bench":
        from embedstream.bench.command import run_bench_command

        return run_bench_command(settings, args)
    if args.command == "replay":
        from embedstream.commands import replay

        return replay(settings, args)
    if args.command in ("rollout", "models"):
        from embedstream.rollout.commands import run as run_rollout

        return run_rollout(settings, args)
    if args.command == "dev":
        from embedstream.commands import dev

        return dev(args.action, args.broker_port, args.redis_port, args.state_dir,
                   args.redis_shards)
    if args.command == "demo":
        from embedstream.demo import run_demo

        return run_demo(settings, events=args.events)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
