"""The transformers export paths for images and audio, with tiny random-weight models.

Each model is built from a small config, saved with its processor config,
exported, and checked: ONNX against PyTorch (cosine >= 0.9999, the
exporter's own check, re-measured here), and the runtime's numpy
preprocessing against the transformers processor on a real photo or clip.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from embedstream.export.audio import AUDIO_FAMILIES, export_audio_model, sample_clips
from embedstream.export.common import runtime_parity
from embedstream.export.image import IMAGE_FAMILIES, export_image_model, sample_images
from embedstream.runtime.loader import load_model

MIN_COSINE = 0.9999


def _vision(kind: str, path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small))
        processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=32, patch_size=8, **small))
        processor = tf.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)
    elif kind == "resnet":
        model = tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    elif kind == "convnext":
        model = tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    else:  # clip: vision and text towers, one projection space
        config = tf.CLIPConfig(
            vision_config=dict(image_size=32, patch_size=8, **small),
            text_config=dict(vocab_size=99, max_position_embeddings=16, **small),
            projection_dim=16,
        )
        model = tf.CLIPModel(config)
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))


@pytest.mark.parametrize("kind", ["vit", "dinov2", "resnet", "convnext", "clip"])
def test_transformers_vision_encoders_export_with_parity(tmp_path, kind):
    from transformers import AutoImageProcessor

    checkpoint = tmp_path / f"tiny-{kind}"
    _vision(kind, checkpoint)
    directory = export_image_model(checkpoint, tmp_path / "models", family="transformers")
    parity = runtime_parity(directory, IMAGE_FAMILIES["transformers"](str(checkpoint)).module,
                          sample_images())
    print(f"\nPARITY image transformers/{kind}: min cosine {parity.min_cosine:.7f}")
    assert parity.min_cosine >= MIN_COSINE

    # The runtime's numpy preprocessing reproduces the transformers processor.
    photo = Image.fromarray(skdata.chelsea())
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    ours = load_model(directory, providers=[], threads=0).preprocessor.prepare_one(buffer.getvalue())
    theirs = AutoImageProcessor.from_pretrained(str(checkpoint))(photo, return_tensors="np")
    assert ours.value.shape == theirs["pixel_values"][0].shape
    assert np.abs(ours.value - theirs["pixel_values"][0]).mean() < 0.02


def _audio(kind: str, path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    conv = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    if kind == "wav2vec2":
        model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(**small, **conv, feat_extract_norm="layer"))
        extractor = tf.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True,
                                                return_attention_mask=True)
    elif kind == "hubert":
        model = tf.HubertModel(tf.HubertConfig(**small, **conv, feat_extract_norm="layer"))
        extractor = tf.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True,
                                                return_attention_mask=True)
    else:
        config = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                  max_source_positions=50, max_target_positions=16, vocab_size=64,
                                  pad_token_id=1, bos_token_id=2, eos_token_id=3,
                                  decoder_start_token_id=2)
        model = tf.WhisperModel(config)
        extractor = tf.WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    model.save_pretrained(str(path))
    extractor.save_pretrained(str(path))


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "whisper"])
def test_transformers_audio_encoders_export_with_parity(tmp_path, kind):
    checkpoint = tmp_path / f"tiny-{kind}"
    _audio(kind, checkpoint)
    directory = export_audio_model(checkpoint, tmp_path / "models", family="transformers")
    clips = sample_clips(seconds=1.0 if kind == "whisper" else 2.0)
    parity = runtime_parity(directory, AUDIO_FAMILIES["transformers"](str(checkpoint)).module, clips)
    print(f"\nPARITY audio transformers/{kind}: min cosine {parity.min_cosine:.7f}")
    assert parity.min_cosine >= MIN_COSINE

    if kind == "whisper":  # the numpy log-mel reproduces WhisperFeatureExtractor
        from transformers import WhisperFeatureExtractor

        model = load_model(directory, providers=[], threads=0)
        wave = model.preprocessor.load(clips[2]).wave  # type: ignore[attr-defined]
        ours = model.preprocessor.frontend.features(wave).value  # type: ignore[attr-defined]
        theirs = WhisperFeatureExtractor.from_pretrained(str(checkpoint))(
            wave, sampling_rate=16000, return_tensors="np")["input_features"][0]
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 1e-3
