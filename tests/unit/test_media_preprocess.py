"""Image, audio and word-vector preprocessing, and payload resolution, without a broker."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from embedstream.envelope import Event, RawRecord
from embedstream.errors import EnvelopeError
from embedstream.models.manifest import Manifest
from embedstream.payloads import PayloadResolver
from embedstream.preprocess.audio import AudioPreprocessor, decode_audio, mel_filters, resample
from embedstream.preprocess.base import Limits, Prepared
from embedstream.preprocess.image import ImagePreprocessor, decode_image
from embedstream.preprocess.wordvec import WordVectorPreprocessor
from embedstream.settings import Settings


def encoded(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    image = Image.new(mode, size, color=(200, 30, 40) if mode == "RGB" else 1)
    buffer = io.BytesIO()
    if fmt == "GIF":
        second = Image.new("RGB", size, (0, 0, 255))
        image.save(buffer, format="GIF", save_all=True, append_images=[second])
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def reason(fn, *args) -> str:
    with pytest.raises(EnvelopeError) as info:
        fn(*args)
    return info.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_supported_image_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(fmt), 10_000)
    assert image.mode == "RGB" and image.size == (64, 48)
    red, green, _ = image.getpixel((10, 10))
    assert red > 150 and green < 80  # the GIF's first frame, not the blue second one


def test_bad_images_are_rejected_with_their_reason():
    png = encoded("PNG")
    assert reason(decode_image, png[:60], 10_000) == "invalid_image"  # truncated
    assert reason(decode_image, b"\xff\xd8\xff" + b"\x00" * 50, 10_000) == "invalid_image"
    assert reason(decode_image, b"BM" + b"\x00" * 60, 10_000) == "unsupported_format"  # BMP
    assert reason(decode_image, b"", 10_000) == "invalid_image"
    bomb = encoded("PNG", (4000, 4000), mode="1")
    assert len(bomb) < 100_000
    assert reason(decode_image, bomb, 1_000_000) == "image_too_large"


def test_image_transform_resizes_crops_and_normalises():
    manifest = Manifest(name="m", modality="image", dimension=4, pooling="mean", normalize=True,
                        inputs=["pixel_values"], opset=17, sha256="-", max_length=0, source="",
                        extra={"image_size": [32, 32], "resize": 40, "crop": "center",
                               "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3})
    prep = ImagePreprocessor(manifest, Path("."), Limits())
    results = prep.prepare([encoded("PNG", (80, 40)), b"junk"])
    assert isinstance(results[0], Prepared) and isinstance(results[1], EnvelopeError)
    packed = prep.pack([results[0], results[0]])
    assert packed["pixel_values"].shape == (2, 3, 32, 32)
    assert np.allclose(packed["pixel_values"][0, 0], 200 / 255 / 0.5 - 1, atol=0.02)


def wav(seconds: float, rate: int = 16000, fmt: str = "WAV", channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32) * 0.5
    data = np.stack([wave, -wave * 0], axis=1) if channels == 2 else wave
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_audio_formats_decode_and_downmix(fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile has no {fmt}")
    wave, rate = decode_audio(wav(1.0, 16000 if fmt != "MP3" else 44100, fmt, channels=2), 60)
    assert wave.ndim == 1 and abs(wave.shape[0] / rate - 1.0) < 0.1
    assert 0.15 < float(np.abs(wave).max()) < 0.35  # mean of the tone and a silent channel


def test_bad_audio_is_rejected_with_its_reason():
    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 16000, format="WAV")
    assert reason(decode_audio, empty.getvalue(), 60) == "audio_empty"
    assert reason(decode_audio, b"", 60) == "audio_empty"
    assert reason(decode_audio, wav(3.0), 2.0) == "audio_too_long"
    assert reason(decode_audio, wav(1.0)[:5000], 60) == "invalid_audio"  # truncated WAV
    flac = wav(1.0, fmt="FLAC")
    assert reason(decode_audio, flac[: len(flac) // 2], 60) == "invalid_audio"
    assert reason(decode_audio, b"%PDF-1.4 not audio at all" * 4, 60) == "unsupported_format"


def test_resample_keeps_the_tone():
    wave, rate = decode_audio(wav(1.0, 48000), 60)
    out = resample(wave, rate, 16000)
    assert out.shape[0] == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(int(spectrum.argmax()) - 440) <= 1


def test_mel_filters_are_triangles_normalised_as_asked():
    htk = mel_filters(44100, 2048, 96, 0.0, 22050.0, htk=True, norm=1.0)
    assert htk.shape == (96, 1025) and np.allclose(htk.sum(axis=1), 1.0, atol=1e-5)
    slaney = mel_filters(16000, 400, 80, 0.0, 8000.0, htk=False, norm="slaney")
    assert (slaney >= 0).all() and (slaney.argmax(axis=1)[1:] >= slaney.argmax(axis=1)[:-1]).all()


def test_aisfx_front_end_blocks_and_masks():
    extra = {"frontend": "aisfx_blocks", "sample_rate": 44100, "n_fft": 2048, "hop_length": 1024,
             "n_mels": 96, "htk": True, "mel_norm": 1.0, "norm_min": 0.0, "norm_max": 9.4578,
             "block_frames": 100, "block_hop": 50}
    manifest = Manifest(name="a", modality="audio", dimension=512, pooling="mean", normalize=True,
                        inputs=["features", "block_mask"], opset=17, sha256="-", max_length=0,
                        source="", extra=extra)
    prep = AudioPreprocessor(manifest, Path("."), Limits(audio_max_seconds=30))
    long_clip, short_clip = prep.prepare([wav(5.0, 22050), wav(0.5, 44100)])
    assert isinstance(long_clip, Prepared) and isinstance(short_clip, Prepared)
    assert long_clip.value.shape[1:] == (100, 96) and long_clip.value.shape[0] == 3
    assert short_clip.value.shape[0] == 1 and short_clip.cost == 100
    packed = prep.pack([long_clip, short_clip])
    assert packed["features"].shape == (2, 3, 100, 96)
    assert packed["block_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_word_vectors_lookup_subwords_and_unknown(tmp_path):
    (tmp_path / "vocab.txt").write_text("cat\ndog\nThe\t1\n", encoding="utf-8")
    manifest = Manifest(name="w", modality="text", dimension=4, pooling="mean", normalize=True,
                        inputs=["input_ids", "weights"], tokenizer_files=["vocab.txt"], opset=17,
                        sha256="-", max_length=0, source="",
                        extra={"kind": "wordvec", "lowercase": False,
                               "subwords": {"minn": 3, "maxn": 4, "bucket": 100, "offset": 3}})
    prep = WordVectorPreprocessor(manifest, tmp_path)
    entries = prep.entries("cat") + prep.entries("The")
    assert entries == [(0, 1.0), (1, 1.0)]
    unseen = prep.entries("zebra")
    assert all(3 <= row < 103 for row, _ in unseen) and abs(sum(w for _, w in unseen) - 1) < 1e-6
    manifest.extra["subwords"] = None
    plain = WordVectorPreprocessor(manifest, tmp_path)
    result = plain.prepare(["zebra !", "cat dog"])
    assert isinstance(result[0], EnvelopeError) and result[0].reason == "empty_text"
    packed = plain.pack([r for r in result if isinstance(r, Prepared)])
    assert packed["input_ids"].tolist() == [[0, 1]] and packed["weights"].tolist() == [[1.0, 1.0]]


# ----------------------------------------------------------------- payloads
def event(**fields) -> Event:
    record = RawRecord("t", 0, 0, None, b"", 0)
    return Event(id="e", modality="image", model=None, text=None, metadata={}, record=record,
                 **fields)


@pytest.fixture
def http_files(tmp_path) -> Iterator[str]:
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.test/a.bin")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_payload_forms_and_limits(tmp_path, http_files):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.bin").write_bytes(b"hello")
    (root / "big.bin").write_bytes(b"x" * 3000)
    (root / "escape").symlink_to(tmp_path)
    settings = Settings(uri_roots=[root], uri_allowed_hosts=["127.0.0.1"], fetch_max_bytes=2048,
                        payload_max_inline_bytes=1024, fetch_timeout_s=5)
    # An allowed host on a loopback address is still refused by default (no SSRF) ...
    guarded = PayloadResolver(settings.payloads)
    assert reason(guarded.resolve, event(uri=f"http://{http_files}/a.bin")) == "uri_forbidden"
    # ... and so is every other non-public address, whatever the allow list says.
    for host in ("10.0.0.1", "169.254.169.254", "192.168.1.1", "[::1]", "0.0.0.0"):
        open_list = PayloadResolver(settings.model_copy(
            update={"uri_allowed_hosts": [host.strip("[]")]}).payloads)
        assert reason(open_list.resolve, event(uri=f"http://{host}/x")) == "uri_forbidden", host
    settings = settings.model_copy(update={"uri_allow_private_networks": True})
    resolver = PayloadResolver(settings.payloads)
    assert resolver.resolve(event(raw=b"bytes")) == b"bytes"
    assert resolver.resolve(event(data_b64=base64.b64encode(b"hi").decode())) == b"hi"
    assert resolver.resolve(event(uri=(root / "ok.bin").as_uri())) == b"hello"

    def why(**fields) -> str:
        return reason(resolver.resolve, event(**fields))

    assert why(data_b64="not base64!") == "invalid_base64"
    assert why(data_b64=base64.b64encode(b"x" * 2000).decode()) == "payload_too_large"
    assert why(uri=(root / "big.bin").as_uri()) == "payload_too_large"
    assert why(uri=(root / "missing.bin").as_uri()) == "uri_unreachable"
    assert why(uri=(tmp_path / "outside.bin").as_uri()) == "uri_forbidden"
    assert why(uri=(root / "escape" / "root" / ".." / "x").as_uri()) == "uri_forbidden"
    assert why(uri="s3://bucket/key") == "uri_forbidden"
    assert why(uri="http://not-allowed.test/a.bin") == "uri_forbidden"
    port = http_files.split(":")[1]
    assert why(uri=f"http://localhost:{port}/a.bin") == "uri_forbidden"  # only the exact name
    assert why(uri=f"http://{http_files}/a.bin") == "payload_too_large"  # 5000 > 2048
    assert why(uri=f"http://{http_files}/nope.bin") == "uri_unreachable"
    assert why(uri=f"http://{http_files}/away") == "uri_forbidden"  # redirect elsewhere
    small = PayloadResolver(settings.model_copy(update={"fetch_max_bytes": 10_000}).payloads)
    assert small.resolve(event(uri=f"http://{http_files}/a.bin")) == b"x" * 5000
    assert reason(PayloadResolver(Settings().payloads).resolve, event(uri=(root / "ok.bin").as_uri())) \
        == "uri_forbidden"  # no roots configured: file:// is off


def test_the_preprocess_interface_imports_none_of_its_implementations() -> None:
    """No cycle: the modality modules import ``preprocess``, never the other way round."""
    import ast

    import embedstream.preprocess.base as interface

    tree = ast.parse(Path(interface.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert "embedstream.runtime" not in imported
    assert not {f"embedstream.runtime.{m}" for m in ("text", "wordvec", "image", "audio")} & imported


def test_a_manifest_with_no_preprocessor_is_a_config_error(tmp_path: Path) -> None:
    from embedstream.errors import ConfigError
    from embedstream.preprocess.modalities import build_preprocessor

    manifest = Manifest(name="m", modality="text", dimension=4, pooling="mean", normalize=True,
                        inputs=["x"], opset=17, sha256="0", extra={"kind": "no-such-kind"})
    with pytest.raises(ConfigError, match=r"no preprocessor for modality/kind \('text', 'no-such-kind'\)"):
        build_preprocessor(manifest, tmp_path, Limits())
