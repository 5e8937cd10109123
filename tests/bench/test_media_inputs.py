"""The bench's generated images and clips: seeded, varied, unique, small enough to send inline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from embedstream.bench import media
from embedstream.errors import BenchError


def test_generated_images_are_seeded_varied_and_unique() -> None:
    images = media.generated_images(24, seed=3)
    assert images == media.generated_images(24, seed=3)
    assert images != media.generated_images(24, seed=4)
    assert len(set(images)) == 24
    assert all(len(data) <= media.MAX_FILE_BYTES for data in images)
    facts = media.describe_images(images)
    assert set(facts["formats"]) == {"JPEG", "PNG"}
    low, high = media.IMAGE_SIDES
    assert low <= facts["width_px"][0] < facts["width_px"][1] <= high
    assert low <= facts["height_px"][0] < facts["height_px"][1] <= high
    pixels = np.asarray(Image.open(io.BytesIO(images[0])).convert("L"), dtype=np.float32)
    assert pixels.std() > 5  # structure, not one colour


def test_generated_clips_are_seeded_varied_and_unique() -> None:
    clips = media.generated_clips(24, seed=3)
    assert clips == media.generated_clips(24, seed=3)
    assert len(set(clips)) == 24
    assert all(len(data) <= media.MAX_FILE_BYTES for data in clips)
    seconds, rates, formats, _ = media.clip_headers(clips)
    assert formats == {"WAV": 24} and len(set(rates)) >= 3
    assert media.CLIP_SECONDS[0] <= min(seconds) < max(seconds) <= media.CLIP_SECONDS[1]
    samples, _ = sf.read(io.BytesIO(clips[0]))
    assert 0.05 < np.abs(samples).max() <= 1.0


def test_file_media_walks_a_directory_and_leaves_out_large_files(tmp_path: Path) -> None:
    images = media.generated_images(3, seed=1)
    for i, data in enumerate(images):
        suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
        (tmp_path / f"{i}{suffix}").write_bytes(data)
    (tmp_path / "huge.jpg").write_bytes(b"\xff\xd8\xff" + bytes(media.MAX_FILE_BYTES))
    (tmp_path / "notes.txt").write_text("not an image")
    assert sorted(media.file_media(tmp_path, "image")) == sorted(images)
    assert len(media.file_media(tmp_path, "image", limit=2)) == 2
    with pytest.raises(BenchError):
        media.file_media(tmp_path, "audio")
