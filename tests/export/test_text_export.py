"""Export of text checkpoints: real models, real ONNX Runtime, no mocks.

The default checkpoint (all-MiniLM-L6-v2) is exported once per module; a tiny
random BERT saved as a plain transformers checkpoint covers the
no-sentence-transformers path.
"""

# The sentences are non-ASCII on purpose (look-alike letters included).
# ruff: noqa: RUF001

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer, normalizers
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from embedstream.cli import main as cli_main
from embedstream.errors import ExportError
from embedstream.export import check_parity, default_text_checkpoint, export_text_model
from embedstream.export.parity import encode_onnx
from embedstream.models.manifest import file_sha256, load_manifest

LONG_PASSAGE = (
    "Apache Kafka is a distributed event store and stream-processing platform. "
    "It aims to provide a unified, high-throughput, low-latency platform for handling "
    "real-time data feeds. Producers write records to topics that are split into "
    "partitions; consumers in a group share those partitions and commit offsets once "
    "their work is durable. "
)
SENTENCES = [
    # short queries
    "hello",
    "What is the capital of France?",
    "cheap flights to tokyo",
    "reset password",
    "?",
    "a",
    # cased, accented, unicode
    "The QUICK Brown FOX Jumps Over The LAZY Dog",
    "Crème brûlée, café au lait, naïve résumé, jalapeño piñata",
    "Ångström, Øresund, Łódź, Straße, Ǆemal",
    "Zürich and São Paulo are far apart.",
    "Привет, как дела? Это тест на кириллице.",
    "東京は日本の首都です。",
    "北京欢迎你",
    "안녕하세요, 세계!",
    "مرحبا بالعالم",
    "Γειά σου Κόσμε",
    "שלום עולם",
    "नमस्ते दुनिया",
    # emoji and symbols
    "I love this pizza 🍕🍕🍕!!!",
    "Deploy succeeded 🚀✅ – latency p99 ↓ 35%",
    "👍🏽👨‍👩‍👧‍👦🏳️‍🌈",
    "→ ∀x ∈ ℝ: x² ≥ 0 ∎",
    # numbers
    "Order #4521 shipped on 2024-03-15 for $1,299.99",
    "π ≈ 3.14159265358979, e ≈ 2.71828",
    "Call +1 (555) 010-9999 ext. 42",
    "SKU-00012345 qty=7 weight=0.25kg",
    # whitespace and control characters
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines",
    "zero\u200bwidth and non\u00a0breaking",
    # passages; the last two exceed 256 tokens, so truncation is exercised
    "Vector search finds the nearest neighbours of a query embedding among millions of "
    "documents, usually with an approximate index such as HNSW.",
    LONG_PASSAGE,
    LONG_PASSAGE * 4,
    ("Ünïcödé pässägé wïth äccents ánd ÇÅPITALS, 数字 12345 and emoji 🎉. " * 30),
]

MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return default_text_checkpoint()


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def minilm_dir(model_root: Path, out_root: Path) -> Path:
    """The session's export of the default checkpoint (``model_root``: each model is
    exported once per run), copied so that these tests may change their copy."""
    return Path(shutil.copytree(model_root / MINILM, out_root / MINILM))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """A random 2-layer BERT saved as a plain transformers checkpoint (no ST files)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(path)
    return path


def test_manifest(minilm_dir: Path, out_root: Path) -> None:
    assert minilm_dir == out_root / MINILM
    manifest = load_manifest(minilm_dir)
    assert manifest.name == MINILM
    assert manifest.modality == "text"
    assert manifest.dimension == 384
    assert manifest.pooling == "mean"
    assert manifest.normalize is True
    assert manifest.max_length == 256
    assert manifest.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.outputs == ["embedding"]
    assert manifest.tokenizer_files == ["tokenizer.json"]
    assert manifest.precision == "fp32"
    assert manifest.opset == 17
    assert manifest.sha256 == file_sha256(minilm_dir / "model.onnx")
    assert manifest.extra["pad_token_id"] == 0
    assert manifest.extra["pad_token"] == "[PAD]"
    assert manifest.extra["onnx_exporter"] == "torchscript"
    assert manifest.exported_at and manifest.exporter_version
    # Nothing but the finished model is left in the output root.
    assert sorted(p.name for p in out_root.iterdir()) == [MINILM]


def test_graph_contract(minilm_dir: Path) -> None:
    session = ort.InferenceSession(str(minilm_dir / "model.onnx"))
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        n: ("tensor(int64)", ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    }
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape) == ("embedding", "tensor(float)", ["batch", 384])


def test_tokenizer_matches_transformers(minilm_dir: Path, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    reference = AutoTokenizer.from_pretrained(str(checkpoint))
    for text in SENTENCES:
        expected = reference(text, truncation=True, max_length=256)["input_ids"]
        assert tokenizer.encode(text).ids == expected, text
    assert max(len(tokenizer.encode(t).ids) for t in SENTENCES) == 256


def test_parity_with_sentence_transformers(minilm_dir: Path, checkpoint: Path) -> None:
    assert len(SENTENCES) >= 30
    report = check_parity(minilm_dir, checkpoint, SENTENCES)
    print(
        f"\nparity over {len(report.cosines)} sentences: min cosine {report.min_cosine:.7f}, "
        f"mean {report.mean_cosine:.7f}, max abs diff {report.max_abs_diff:.2e}"
    )
    worst = {SENTENCES[i][:40]: c for i, c in enumerate(report.cosines) if c < 0.9999}
    assert not worst
    assert report.passed()


def test_variable_batch_and_sequence(minilm_dir: Path, checkpoint: Path) -> None:
    """Other shapes than the traced one, against sentence-transformers' torch forward."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(checkpoint), device="cpu")
    session = ort.InferenceSession(str(minilm_dir / "model.onnx"))
    rng = np.random.default_rng(7)
    for batch, seq in [(1, 5), (7, 200), (3, 256)]:
        ids = rng.integers(1000, 29000, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        for row in range(1, batch):  # rows after the first are padded to various lengths
            mask[row, int(rng.integers(2, seq + 1)) :] = 0
        ids[:, 0], ids[mask == 0] = 101, 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (got,) = session.run(["embedding"], feeds)
        with torch.no_grad():
            features = {k: torch.from_numpy(v) for k, v in feeds.items()}
            expected = reference(features)["sentence_embedding"].numpy()
        assert got.shape == (batch, 384)
        np.testing.assert_allclose(got, expected, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_embedding(minilm_dir: Path) -> None:
    manifest = load_manifest(minilm_dir)
    alone = encode_onnx(minilm_dir, manifest, [SENTENCES[1]])
    in_batch = encode_onnx(minilm_dir, manifest, [LONG_PASSAGE * 4, SENTENCES[1], "x"])
    np.testing.assert_allclose(alone[0], in_batch[1], atol=1e-5)


def test_plain_transformers_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = export_text_model(tiny_checkpoint, tmp_path, name="tiny-bert")
    manifest = load_manifest(model_dir)
    assert (manifest.dimension, manifest.pooling, manifest.normalize) == (32, "mean", True)
    assert manifest.max_length == 128  # model_max_length 512, capped by max_position_embeddings
    assert manifest.inputs == ["input_ids", "attention_mask", "token_type_ids"]

    got = encode_onnx(model_dir, manifest, SENTENCES)
    expected = _mean_pooled_reference(tiny_checkpoint, SENTENCES, max_length=128)
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pooling_override_and_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first = export_text_model(tiny_checkpoint, tmp_path, name="tiny")
    second = export_text_model(
        tiny_checkpoint, tmp_path, name="tiny", pooling="cls", normalize=False, overwrite=True
    )
    assert second == first
    manifest = load_manifest(second)
    assert (manifest.pooling, manifest.normalize) == ("cls", False)
    vectors = encode_onnx(second, manifest, ["not normalised"])
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) > 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_sentence_transformers_config_is_followed(
    tiny_checkpoint: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """Max pooling, no Normalize, max_seq_length 64 and do_lower_case over a cased tokenizer."""
    cased = tmp_path / "cased-st"
    shutil.copytree(tiny_checkpoint, cased)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.save(str(cased / "tokenizer.json"))
    config = json.loads((cased / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(do_lower_case=False, strip_accents=False)
    (cased / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (cased / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (cased / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_max_tokens": True}
    (cased / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    st_config = {"max_seq_length": 64, "do_lower_case": True}
    (cased / "sentence_bert_config.json").write_text(json.dumps(st_config), encoding="utf-8")

    model_dir = export_text_model(cased, tmp_path / "out")  # parity with ST runs inside
    manifest = load_manifest(model_dir)
    assert model_dir.name == "cased-st"
    assert (manifest.pooling, manifest.normalize, manifest.max_length) == ("max", False, 64)
    # The runtime does not lowercase: the exported tokenizer does it.
    exported = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert exported.encode("HELLO World").tokens == ["[CLS]", "hello", "world", "[SEP]"]
    assert manifest.extra["do_lower_case"] is False
    report = check_parity(model_dir, cased, SENTENCES)
    assert report.passed(), report.cosines


def test_dynamo_fallback_exporter(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The fallback path works today too, so it is ready when TorchScript export is gone."""
    from embedstream.export.text import SentenceEncoder, _check_graph, _export_dynamo

    names = ["input_ids", "attention_mask", "token_type_ids"]
    encoder = SentenceEncoder(AutoModel.from_pretrained(str(tiny_checkpoint)), "mean", True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    trace = tokenizer(["short", "a longer one to pad against"], padding=True, return_tensors="pt")
    path = tmp_path / "model.onnx"
    _export_dynamo(encoder, tuple(trace[n] for n in names), names, path, 17)
    assert _check_graph(path, names) == 18  # the dynamo exporter starts at 18

    batch = tokenizer(SENTENCES[:7], padding=True, truncation=True, max_length=128)
    feeds = {n: np.asarray(batch[n], dtype=np.int64) for n in names}
    (got,) = ort.InferenceSession(str(path)).run(["embedding"], feeds)
    with torch.no_grad():
        expected = encoder(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _mean_pooled_reference(checkpoint: Path, sentences: list[str], max_length: int) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModel.from_pretrained(str(checkpoint)).eval()
    batch = tokenizer(
        sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


# --- errors -------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_text_model(tmp_path / "no-such-checkpoint", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_transformers_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"not a transformers checkpoint: config\.json"):
        export_text_model(tmp_path / "empty", tmp_path / "out")


def test_unreachable_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="Hugging Face Hub"):
        export_text_model(Path("embedstream-tests/no-such-model"), tmp_path)


def test_export_command_over_the_same_export_is_a_no_op(
    minilm_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (minilm_dir / "manifest.json").read_text(encoding="utf-8")
    assert cli_main(["export", "--model-dir", str(out_root)]) == 0
    out = capsys.readouterr().out
    assert f"{minilm_dir} already holds this export" in out
    assert "nothing changed" in out
    assert (minilm_dir / "manifest.json").read_text(encoding="utf-8") == before
    assert not [p.name for p in out_root.iterdir() if p.name.startswith(".")]  # no staging left


def test_export_command_over_another_model_says_pass_overwrite(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = export_text_model(tiny_checkpoint, tmp_path, name="tiny")
    before = (existing / "manifest.json").read_text(encoding="utf-8")
    argv = ["export", str(tiny_checkpoint), "--name", "tiny", "--model-dir", str(tmp_path),
            "--pooling", "cls"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"model directory {existing} exists" in err
    assert "pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    assert (existing / "manifest.json").read_text(encoding="utf-8") == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Not A Name"}, "invalid model name"),
        ({"pooling": "weighted-ish"}, "pooling 'weighted-ish'"),
    ],
)
def test_bad_arguments(checkpoint: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export_text_model(checkpoint, tmp_path, **kwargs)


def test_unsupported_sentence_transformers_module(tiny_checkpoint: Path, tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    checkpoint = tmp_path / "with-dense"
    checkpoint.mkdir()
    (checkpoint / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(ExportError, match="Dense"):
        export_text_model(checkpoint, tmp_path / "out")


def test_import_is_cheap() -> None:
    """``import embedstream.export`` must not pull in torch or transformers."""
    code = (
        "import sys, embedstream.export as e; assert callable(e.default_text_checkpoint); "
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_graph_is_fused_for_onnx_runtime(minilm_dir: Path) -> None:
    """The exported graph uses ONNX Runtime's fused transformer kernels."""
    fusions = load_manifest(minilm_dir).extra["fusions"]
    assert fusions == {
        "EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6,
    }
