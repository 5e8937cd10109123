"""Pairs files: validation with line numbers, the leak-free split, docstring pairs.

Pure Python (no torch): the docstring pairs come from the installed numpy.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedstream.export.docpairs import docstring_pairs, main, split_docstring
from embedstream.export.finetune import FinetuneSettings, prepare_pairs
from embedstream.export.pairs import Pair, PairsError, read_pairs, split_pairs


@pytest.fixture(scope="module")
def numpy_pairs() -> list[dict[str, str]]:
    pairs = docstring_pairs(["numpy"])
    assert len(pairs) >= 400, len(pairs)
    return pairs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"query": "a", "positive": "b"', "line 2: not JSON"),
        (b'["a", "b"]', "line 2: expected a JSON object, got list"),
        (b'{"query": "a"}', 'line 2: "positive" is missing'),
        (b'{"query": "  ", "positive": "b"}', 'line 2: "query" is empty'),
        (b'{"query": 7, "positive": "b"}', 'line 2: "query" must be a string, got int'),
        (b'{"query": "a", "positive": "b", "group": [1]}', 'line 2: "group" must be a string'),
        (b'{"query": "\\ud800", "positive": "b"}', 'line 2: "query" holds a lone surrogate'),
        (b'{"query": "caf\xe9", "positive": "b"}', "line 2: not UTF-8 (byte 15)"),
    ],
)
def test_a_bad_line_is_named_by_its_number(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"query": "q", "positive": "p"}\n' + line + b"\n\n")
    with pytest.raises(PairsError, match="1 bad line") as caught:
        read_pairs(path)
    assert message in str(caught.value)


def test_pairs_mixing_negatives_and_none_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "positive": "b", "negative": "c"}\n'
                    '{"query": "d", "positive": "e", "negative": null}\n', encoding="utf-8")
    with pytest.raises(PairsError, match=r'1 pairs have a "negative" and 1 do not .*line 2'):
        read_pairs(path)


def test_the_split_shares_no_text_or_group_and_is_seeded() -> None:
    pairs = [Pair(f"q{i}", f"p{i}", group=f"g{i // 3}", line=i + 1) for i in range(60)]
    pairs += [Pair("q0", "another answer", line=61), Pair("q-new", "p5", line=62)]
    train, held_out = split_pairs(pairs, 0.2, seed=5)
    assert len(train) + len(held_out) == len(pairs) and len(held_out) >= 12
    for key in ("query", "positive", "group"):
        shared = ({getattr(p, key) for p in train} & {getattr(p, key) for p in held_out}) - {None}
        assert not shared, (key, shared)
    assert split_pairs(pairs, 0.2, seed=5) == (train, held_out)
    assert split_pairs(pairs, 0.2, seed=6) != (train, held_out)
    assert len(split_pairs(pairs, 30, seed=5)[1]) >= 30  # a count, not a share
    with pytest.raises(PairsError, match="cannot split"):
        split_pairs(pairs[:3], 0.5, seed=5)


def test_docstring_pairs_are_real_unique_and_grouped(numpy_pairs: list[dict[str, str]]) -> None:
    queries = [p["query"] for p in numpy_pairs]
    assert len(set(queries)) == len(queries)
    assert len({p["positive"] for p in numpy_pairs}) == len(numpy_pairs)
    # Each pair is its object's docstring, split into summary and body.
    for pair in random.Random(3).sample(numpy_pairs, 25):
        doc = inspect.getdoc(_resolve(pair["source"])) or ""
        assert split_docstring(doc) == (pair["query"], pair["positive"]), pair["source"]
        assert pair["query"] in " ".join(doc.split())
    # A ufunc's docstring opens with its signature: the summary is the next paragraph.
    add = inspect.getdoc(np.add) or ""
    assert add.startswith("add(x1, x2, /")
    summary, body = split_docstring(add) or ("", "")
    assert summary == "Add arguments element-wise." and body.startswith("Parameters")
    methods = [p for p in numpy_pairs if p["source"].startswith("numpy.ndarray.")]
    assert methods and {p["group"] for p in methods} == {"numpy.ndarray"}


def _resolve(dotted: str) -> object:
    """The object named ``package.module.Class.member``: the longest importable module first."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise AssertionError(dotted)


def test_held_out_pairs_from_a_file_drop_what_training_saw(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    held = tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n"
                             for i in range(5)), encoding="utf-8")
    held.write_text(
        json.dumps({"query": "q1", "positive": "new answer"}) + "\n"    # query seen
        + json.dumps({"query": "new", "positive": "p2"}) + "\n"         # answer seen
        + "".join(json.dumps({"query": f"h{i}", "positive": f"a{i}"}) + "\n" for i in range(3)),
        encoding="utf-8")
    settings = FinetuneSettings(pairs=train, name="m", model_dir=tmp_path, eval_pairs=held)
    kept_train, held_out, info = prepare_pairs(settings)
    assert len(kept_train) == 5 and [p.query for p in held_out] == ["h0", "h1", "h2"]
    assert info["held_out_dropped_as_seen_in_training"] == 2
    assert info["held_out_from"] == "held.jsonl" and info["train"] == 5

    held.write_text(json.dumps({"query": "q1", "positive": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(PairsError, match="0 held-out pairs left after dropping 1"):
        prepare_pairs(settings)


def test_docpairs_writes_a_pairs_file_finetune_reads(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs.jsonl"
    assert main(["numpy", "--out", str(out), "--limit", "50", "--seed", "4"]) == 0
    assert "wrote 50 pairs" in capsys.readouterr().out
    pairs = read_pairs(out)
    assert len(pairs) == 50 and all(p.group and p.negative is None for p in pairs)
    assert main(["no_such_package_here", "--out", str(out)]) == 2
    assert "cannot import no_such_package_here" in capsys.readouterr().err


def test_docpairs_are_the_same_in_every_interpreter(tmp_path: Path) -> None:
    """String hashing differs between interpreters (and with it some modules' dict order):
    the pairs, and so a seeded sample of them, must not."""
    files = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"pairs-{hash_seed}.jsonl"
        subprocess.run(
            [sys.executable, "-m", "embedstream.export.docpairs", "numpy", "--out", str(out),
             "--limit", "300"],
            env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True, capture_output=True,
            timeout=120,
        )
        files.append(out.read_bytes())
    assert files[0] == files[1] and files[0].count(b"\n") == 300
