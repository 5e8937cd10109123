"""int8 quantization: the quality gate keeps a good model and refuses a bad one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from embedstream.errors import ExportError
from embedstream.export import optimize
from embedstream.export.optimize import quantize_int8
from embedstream.models.manifest import find_models, load_manifest
from embedstream.runtime.loader import load_model

MODEL = "all-minilm-l6-v2"


@pytest.fixture
def models(model_root: Path, tmp_path: Path) -> Path:
    """A private copy of the exported fp32 model (the session root stays as it is)."""
    shutil.copytree(model_root / MODEL, tmp_path / MODEL)
    return tmp_path


def test_int8_passes_the_gate(models: Path) -> None:
    target, report = quantize_int8(models / MODEL)
    assert target == models / f"{MODEL}-int8"
    assert report.mean_cosine >= 0.99 and report.min_cosine >= 0.98
    manifest = load_manifest(target)  # checksum verified
    assert manifest.precision == "int8"
    assert manifest.extra["quality_vs_fp32"]["mean_cosine"] >= 0.99
    vectors = load_model(target, providers=[], threads=1).embed_texts(["hello", "a longer one"])
    assert vectors.shape == (2, 384)


def test_int8_below_the_gate_is_refused(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize, "INT8_MIN_COSINE", 0.99999)
    monkeypatch.setattr(optimize, "_STRATEGIES", (("matmul-only", ["MatMul"]),))
    with pytest.raises(ExportError, match="below the gate"):
        quantize_int8(models / MODEL, "refused")
    assert sorted(find_models(models)) == [MODEL]  # nothing written, no staging left
    assert sorted(p.name for p in models.iterdir()) == [MODEL]
    kept, report = quantize_int8(models / MODEL, "forced", force=True)
    assert kept.is_dir() and not report.passed()


def test_only_fp32_is_quantized(models: Path) -> None:
    target, _ = quantize_int8(models / MODEL)
    with pytest.raises(ExportError, match="quantize an fp32 model"):
        quantize_int8(target)
