"""Images, audio and word vectors end to end on the real embedded broker and Redis.

One real worker serves five models (text transformer, EfficientNet-Lite0,
aiSFX, spaCy vectors, fastText) from real ONNX exports; events arrive in
every payload form, poison of every kind is dead-lettered with its reason,
and each model's vectors land in its own index with its own dimension.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import e2e_support
import numpy as np
import pytest
import soundfile as sf
from kafka import KafkaConsumer
from PIL import Image
from skimage import data as skdata

from embedstream.envelope import encode
from embedstream.producer import Producer, file_event_id, find_files, produce_files
from embedstream.runtime.loader import load_models
from embedstream.settings import Settings
from embedstream.sinks.redis import connect, index_name, result_key
from support.stack import wait_for

DIMS = {"all-minilm-l6-v2": 384, "efficientnet-lite0": 1280, "aisfx": 512, "spacy-en-md": 300,
        "lee-fasttext": 10}


def make_settings(stack, unique: str, root: Path, files: Path, **extra) -> Settings:
    return Settings(
        kafka_bootstrap=stack.bootstrap, redis_url=stack.redis_url,
        topic_text=f"{unique}.text", topic_image=f"{unique}.image", topic_audio=f"{unique}.audio",
        topic_dlq=f"{unique}.dlq", group_id=f"{unique}-group", key_prefix=unique,
        model_dir=root, session_timeout_ms=6000, heartbeat_interval_ms=1000, metrics_port=0,
        topic_partitions=2, uri_roots=[files], uri_allowed_hosts=["media.example.test"],
        image_max_pixels=10_000_000, audio_max_seconds=5.0, batch_max_items=8, **extra,
    )


def image_bytes(array: np.ndarray, fmt: str, size: int = 160) -> bytes:
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    if fmt == "GIF":
        frames = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def audio_bytes(seconds: float, rate: int, fmt: str, freq: float = 440.0, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels == 2:
        wave = np.stack([wave, wave * 0.5], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


class ThreadWorker(e2e_support.ThreadWorker):
    def total(self, name: str) -> float:
        """A metric summed over all its label sets."""
        return sum(s.value for m in self.metrics.registry.collect() for s in m.samples
                   if s.name == name)


def read_dead_letters(settings: Settings, expected: int) -> dict[str, str]:
    """Dead-letter key -> reason."""
    consumer = KafkaConsumer(
        settings.topic_dlq, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000,
    )
    out: dict[str, str] = {}
    for record in consumer:
        out[(record.key or b"").decode()] = dict(record.headers)["embedstream.reason"].decode()
        if len(out) >= expected:
            break
    consumer.close()
    return out


@pytest.fixture(scope="module")
def media_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media-files")
    (root / "photos" / "deep").mkdir(parents=True)
    (root / "photos" / "cat.jpg").write_bytes(image_bytes(skdata.chelsea(), "JPEG"))
    (root / "photos" / "deep" / "coffee.png").write_bytes(image_bytes(skdata.coffee(), "PNG"))
    (root / "photos" / "notes.txt").write_text("not an image")
    (root / "sounds").mkdir()
    (root / "sounds" / "tone.flac").write_bytes(audio_bytes(2.0, 22050, "FLAC", 330, channels=2))
    return root


def test_every_family_and_payload_form_end_to_end(stack, unique, media_model_root, media_files,
                                                   tmp_path):
    settings = make_settings(stack, unique, media_model_root, media_files)
    photos = {"astronaut": skdata.astronaut(), "rocket": skdata.rocket(), "camera": skdata.camera(),
              "coffee": skdata.coffee()}
    inline = {f"img-{name}-{fmt.lower()}": image_bytes(array, fmt) for (name, array), fmt in
              zip(photos.items(), ["JPEG", "PNG", "WEBP", "GIF"], strict=True)}
    raw_images = {"raw-chelsea": image_bytes(skdata.chelsea(), "JPEG")}
    clips = {"snd-wav": audio_bytes(3.0, 16000, "WAV"), "snd-ogg": audio_bytes(2.5, 48000, "OGG", 880)}
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")  # 25 Mpx, a few KB: over the 10 Mpx limit
    outside = tmp_path / "outside.png"
    outside.write_bytes(inline["img-rocket-png"])
    poison_images = {
        "p-corrupt": b"\xff\xd8\xff\xe0" + os.urandom(400),
        "p-truncated": inline["img-rocket-png"][:300],
        "p-tiff": b"II*\x00" + os.urandom(64),
        "p-bomb": bomb.getvalue(),
    }
    silence = io.BytesIO()
    sf.write(silence, np.zeros((0,), np.float32), 16000, format="WAV")
    poison_audio = {
        "p-empty-audio": silence.getvalue(),
        "p-long-audio": audio_bytes(6.0, 8000, "WAV"),
        "p-garbage-audio": b"RIFF\x00\x00\x00\x00WAVEfmt " + os.urandom(40),
    }
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as p:
            for key, data in inline.items():
                p.send_file("image", data=data, id=key, metadata={"src": "inline"})
            for key, data in raw_images.items():
                p.send_file("image", data=data, form="raw", id=key, content_type="image/jpeg")
            uri_ids = produce_files(p, "image", find_files([media_files / "photos"], "image"),
                                    form="uri")
            for key, data in clips.items():
                p.send_file("audio", data=data, id=key, form="raw" if key.endswith("ogg") else "inline")
            p.send_file("audio", uri=(media_files / "sounds" / "tone.flac").as_uri(), id="snd-flac")
            p.send_text("A cat sleeps on the sofa.", id="txt-default")
            p.send_text("The cat sat on the mat with a dog.", id="txt-spacy", model="spacy-en-md")
            p.send_text("the unseenword zzqx of bookkeeping", id="txt-fasttext", model="lee-fasttext")
            for key, data in {**poison_images}.items():
                p.send_file("image", data=data, id=key)
            for key, data in poison_audio.items():
                p.send_file("audio", data=data, id=key)
            topic_image = settings.topic_image
            p.send_raw(topic_image, "p-b64", encode("p-b64", data_b64="@@not base64@@"))
            p.send_raw(topic_image, "p-outside", encode("p-outside", uri=outside.as_uri()))
            p.send_raw(topic_image, "p-missing",
                       encode("p-missing", uri=(media_files / "nope.png").as_uri()))
            p.send_raw(topic_image, "p-host", encode("p-host", uri="http://evil.test/x.png"))
            p.send_raw(topic_image, "p-nodata", encode("p-nodata"))
            p.send_raw(topic_image, "p-textmodel",
                       encode("p-textmodel", data_b64="aGk=", model="all-minilm-l6-v2"))
            p.send_file("image", uri=(media_files / "photos" / "notes.txt").as_uri(), id="p-txtfile")
            p.send_text("zzqx qqzx", id="p-oov", model="spacy-en-md")
            p.flush()
        good = {
            "efficientnet-lite0": {*inline, *raw_images, *uri_ids},
            "aisfx": {*clips, "snd-flac"},
            "all-minilm-l6-v2": {"txt-default"},
            "spacy-en-md": {"txt-spacy"},
            "lee-fasttext": {"txt-fasttext"},
        }
        expected_reasons = {
            "p-corrupt": "invalid_image", "p-truncated": "invalid_image",
            "p-tiff": "unsupported_format", "p-bomb": "image_too_large",
            "p-empty-audio": "audio_empty", "p-long-audio": "audio_too_long",
            "p-garbage-audio": "invalid_audio", "p-b64": "invalid_base64",
            "p-outside": "uri_forbidden", "p-missing": "uri_unreachable",
            "p-host": "uri_forbidden", "p-nodata": "missing_data", "p-textmodel": "unknown_model",
            "p-txtfile": "unsupported_format", "p-oov": "empty_text",
        }
        client = connect(settings.redis)

        def stored(model: str) -> set[str]:
            pattern = result_key(unique, model, "*")
            return {k.decode().rsplit(":", 1)[-1] for k in client.scan_iter(match=pattern)}

        total_good = sum(len(v) for v in good.values())
        assert wait_for(lambda: worker.total("embedstream_events_embedded_total") >= total_good
                        and worker.total("embedstream_events_failed_total") >= len(expected_reasons),
                        90)
        for model, ids in good.items():
            assert stored(model) == ids, model
            info = client.ft(index_name(unique, model)).info()
            assert info, model
            for event_id in ids:
                fields = client.hgetall(result_key(unique, model, event_id))
                vector = np.frombuffer(fields[b"embedding"], dtype="<f4")
                assert vector.shape == (DIMS[model],) and fields[b"dim"] == str(DIMS[model]).encode()
        assert read_dead_letters(settings, len(expected_reasons)) == expected_reasons

        # Stored vectors are the query path's vectors of the same bytes.
        models = load_models(media_model_root, ["efficientnet-lite0", "aisfx"], providers=[],
                             threads=1)
        stored_vec = np.frombuffer(client.hget(result_key(unique, "efficientnet-lite0",
                                                          "img-rocket-png"), "embedding"), "<f4")
        assert float(stored_vec @ models["efficientnet-lite0"].embed_images(
            [inline["img-rocket-png"]])[0]) > 0.9999
        stored_vec = np.frombuffer(client.hget(result_key(unique, "aisfx", "snd-ogg"), "embedding"),
                                   "<f4")
        assert float(stored_vec @ models["aisfx"].embed_audio([clips["snd-ogg"]])[0]) > 0.9999
        meta = client.hgetall(result_key(unique, "efficientnet-lite0", uri_ids[0]))
        assert meta[b"modality"] == b"image" and meta[b"meta_path"].endswith(b"cat.jpg")
    finally:
        assert worker.stop() == 0

    # Search by example, as a user would: the same photo comes first.
    env = {**os.environ, "EMBEDSTREAM_REDIS_URL": settings.redis_url,
           "EMBEDSTREAM_KEY_PREFIX": unique, "EMBEDSTREAM_MODEL_DIR": str(media_model_root)}
    result = subprocess.run(
        [sys.executable, "-m", "embedstream", "search", "--image",
         str(media_files / "photos" / "cat.jpg"), "-k", "3", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    # The same photo went in twice (by uri and as raw bytes): both come first.
    cat_ids = {file_event_id(media_files / "photos" / "cat.jpg"), "raw-chelsea"}
    assert {h["id"] for h in hits[:2]} == cat_ids
    assert min(h["score"] for h in hits[:2]) > 0.999 > hits[2]["score"]


def test_token_mode_stores_contextual_token_vectors(stack, unique, tmp_path):
    """A text model exported in token mode stores per-token vectors beside the pooled one,
    equal to sentence-transformers' token embeddings."""
    from sentence_transformers import SentenceTransformer

    from embedstream.export import default_text_checkpoint, export_text_model

    root = tmp_path / "models"
    export_text_model(default_text_checkpoint(), root, "minilm-tokens", token_mode=True)
    settings = make_settings(stack, unique, root, tmp_path, default_text_model="minilm-tokens")
    texts = {"short": "A cat naps.", "long": "Streaming embeddings keep the search index fresh."}
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as p:
            for key, text in texts.items():
                p.send_text(text, id=key)
            p.flush()
        client = connect(settings.redis)
        assert wait_for(lambda: worker.total("embedstream_events_embedded_total") >= 2, 90)
    finally:
        assert worker.stop() == 0
    reference = SentenceTransformer(str(default_text_checkpoint()), device="cpu")
    for key, text in texts.items():
        fields = client.hgetall(result_key(unique, "minilm-tokens", key))
        count = int(fields[b"token_count"])
        tokens = np.frombuffer(fields[b"token_embeddings"], "<f4").reshape(count, 384)
        expected = reference.encode(text, output_value="token_embeddings", convert_to_numpy=True)
        expected = np.asarray(expected)
        assert tokens.shape == expected.shape
        cosines = np.sum(tokens * expected, 1) / (np.linalg.norm(tokens, axis=1)
                                                   * np.linalg.norm(expected, axis=1))
        print(f"\nPARITY text token mode {key}: min token cosine {cosines.min():.7f}")
        assert cosines.min() >= 0.9999
        assert np.frombuffer(fields[b"embedding"], "<f4").shape == (384,)
