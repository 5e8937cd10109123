"""``embedstream finetune`` on real pairs: numpy's own docstrings, the shipped MiniLM, CPU.

The pairs are generated from the installed numpy (a function's one-line
summary as the query, the rest of its docstring as the answer), so nothing
here is text we wrote. Runs are kept tiny (a token limit of 32, one epoch of
five steps, a learning rate high enough for five steps to show, one thread so
that a CPU shared with other work is not oversubscribed) to stay fast; the
README has a long run's figures.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedstream.cli import main
from embedstream.export.docpairs import docstring_pairs
from embedstream.export.finetune import REPORT_FILE
from embedstream.export.pairs import read_pairs, split_pairs
from embedstream.export.retrieval import evaluate, search_problem
from embedstream.models.manifest import find_models, load_manifest
from embedstream.runtime.loader import load_models


@pytest.fixture(scope="module")
def numpy_pairs() -> list[dict[str, str]]:
    """Every usable docstring pair of the installed numpy (several hundred)."""
    pairs = docstring_pairs(["numpy"])
    assert len(pairs) >= 400, len(pairs)
    return pairs


def _write(path: Path, pairs: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def _sample(pairs: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    return random.Random(seed).sample(pairs, n)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["finetune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_finetune_writes_a_model_that_loads_and_matches_its_report(
    numpy_pairs: list[dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs_file = _write(tmp_path / "numpy-docs.jsonl", _sample(numpy_pairs, 240, seed=1))
    root = tmp_path / "models"
    code, out, err = _cli(capsys, "--pairs", str(pairs_file), "--name", "numpy-docs",
                          "--model-dir", str(root), "--max-length", "32", "--batch-size", "32",
                          "--learning-rate", "1e-4", "--eval-size", "80", "--threads", "1",
                          "--no-progress", "--json")
    assert code == 0, err
    report = json.loads(out)
    directory = root / "numpy-docs"
    assert json.loads((directory / REPORT_FILE).read_text(encoding="utf-8")) == report
    assert report["pairs"]["read"] == 240
    assert report["pairs"]["train"] + report["pairs"]["held_out"] == 240
    assert report["pairs"]["held_out"] >= 80
    assert report["training"]["steps"] == math.ceil(report["pairs"]["train"] / 32)
    assert report["settings"] | {"epochs": 1, "max_length": 32, "loss":
                                 "MultipleNegativesRankingLoss"} == report["settings"]
    for side in ("base", "tuned"):
        figures = report["metrics"][side]
        assert 0 < figures["recall_at_1"] <= figures["recall_at_10"] <= 1
        assert figures["recall_at_1"] <= figures["mrr_at_10"] <= 1
    tuned = report["metrics"]["tuned"]
    assert tuned["mrr_at_10"] > report["metrics"]["base"]["mrr_at_10"]
    assert set(report["time_s"]) >= {"evaluate_base", "train", "evaluate_tuned", "export", "total"}
    assert report["parity"]["min_cosine"] >= 0.9999  # the exporter's gate, on the tuned model

    manifest = load_manifest(directory)  # checksum verified
    assert manifest.max_length == 32 and "fine-tuned on numpy-docs.jsonl" in manifest.source
    model = load_models(root, ["numpy-docs"], providers=["CPUExecutionProvider"],
                        threads=1)["numpy-docs"]
    # The ONNX model the worker runs reproduces the tuned figures on the same held-out pairs.
    _, held_out = split_pairs(read_pairs(pairs_file), 80, seed=13)
    problem = search_problem(held_out)
    served = evaluate(model.embed_texts, problem)
    assert served.queries == tuned["queries"] == len(problem.queries)
    tolerance = 1 / served.queries  # at most one near-tie ranked the other way
    assert abs(served.recall_at_1 - tuned["recall_at_1"]) <= tolerance
    assert abs(served.recall_at_10 - tuned["recall_at_10"]) <= tolerance
    assert abs(served.mrr_at_10 - tuned["mrr_at_10"]) <= tolerance
    # ...and it is not the base model: training moved the vectors.
    base = _base_vectors(problem.queries[:8])
    moved = np.sum(base * model.embed_texts(problem.queries[:8]), axis=1)
    assert moved.min() < 0.999, moved


def _base_vectors(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from embedstream.export import default_text_checkpoint

    st = SentenceTransformer(str(default_text_checkpoint()), device="cpu")
    st.max_seq_length = 32
    return np.asarray(st.encode(texts, normalize_embeddings=True))


def test_a_model_worse_than_the_base_is_refused_unless_forced(
    numpy_pairs: list[dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate of 0.1 wrecks the weights in three steps: a sure way to a worse model."""
    pairs_file = _write(tmp_path / "pairs.jsonl", _sample(numpy_pairs, 72, seed=2))
    root = tmp_path / "models"
    argv = ["--pairs", str(pairs_file), "--name", "wrecked", "--model-dir", str(root),
            "--max-length", "16", "--batch-size", "16", "--eval-size", "24",
            "--learning-rate", "0.1", "--threads", "1", "--no-progress"]
    code, out, err = _cli(capsys, *argv)
    assert code == 3
    assert "worse than the base" in err and "nothing was written" in err
    assert "To write it anyway, run:" in err
    suggested = err.rsplit("run:", 1)[1].strip()
    assert suggested == "embedstream finetune " + " ".join(argv) + " --force"
    assert "Traceback" not in err
    assert "MRR@10" in out and "verdict: worse, refused" in out  # the figures are shown
    assert not root.exists() or not any(root.iterdir())  # no model, no staging directory

    code, out, err = _cli(capsys, *argv, "--force", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["verdict"] == "worse, written with --force"
    assert report["metrics"]["tuned"]["mrr_at_10"] < report["metrics"]["base"]["mrr_at_10"]
    assert sorted(find_models(root)) == ["wrecked"]


def test_bad_pairs_fail_fast_on_the_command_line(tmp_path: Path) -> None:
    """Every bad line is listed (the first five, then a count), with no traceback, before
    any model (or torch) is loaded, and nothing is written."""
    path = tmp_path / "pairs.jsonl"
    lines = [b'{"query": "q%d", "positive": "p%d"}' % (i, i) for i in range(10)]
    for bad in (1, 3, 4, 6, 7, 8, 9):
        lines[bad] = b'{"query": "q", "positive": ""}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    code = ("import sys; from embedstream.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    result = subprocess.run(
        [sys.executable, "-c", code, "finetune", "--pairs", str(path), "--name", "x",
         "--model-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (f"embedstream: error: {path}: 7 bad lines: line 2: \"positive\" is empty; "
            'line 4: "positive" is empty; line 5') in result.stderr
    assert "(and 2 more)" in result.stderr
    assert not (tmp_path / "models").exists()


def test_a_plain_transformers_base_gets_the_exporters_defaults(
    numpy_pairs: list[dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without sentence-transformers files is tuned as `embedstream export`
    would serve it (mean pooling, normalised). A random 2-layer BERT: --force, since
    whether it gains on the held-out pairs is beside the point here."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedstream.export import default_text_checkpoint

    base = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(default_text_checkpoint())).save_pretrained(base)
    pairs_file = _write(tmp_path / "pairs.jsonl", _sample(numpy_pairs, 72, seed=3))
    root = tmp_path / "models"
    code, out, err = _cli(capsys, "--pairs", str(pairs_file), "--name", "tiny-docs",
                          "--base", str(base), "--model-dir", str(root), "--batch-size", "16",
                          "--eval-size", "24", "--threads", "1", "--force", "--no-progress",
                          "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["base"] == str(base) and report["settings"]["max_length"] == 128
    manifest = load_manifest(root / "tiny-docs")
    assert (manifest.pooling, manifest.normalize, manifest.dimension) == ("mean", True, 32)
    assert report["parity"]["min_cosine"] >= 0.9999
    vectors = load_models(root, ["tiny-docs"], providers=["CPUExecutionProvider"],
                          threads=1)["tiny-docs"].embed_texts(["numpy arrays", "a"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
