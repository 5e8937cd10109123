"""Naturally paired text from installed libraries: a docstring's summary and its body.

For every public function, class and method a package defines, the
docstring's first paragraph (its one-line summary) is the query and the rest
of the docstring is the positive: real, human-written text that
``embedstream finetune`` can learn from and be measured on. Each pair's
``group`` is its function, or its class for a class and its methods, so the
train / held-out split keeps a class's methods on one side.

Kept only when useful as a retrieval example: a summary of at least
``MIN_QUERY_WORDS`` words and a body of at least ``MIN_POSITIVE_WORDS``; a
first paragraph that is a call signature (``add(x1, x2, /, ...)``, as C
functions have) is skipped. A summary shared by several objects ("Fit the
model.") is ambiguous as a query, and a body shared by several is not an
answer to one of them: both are dropped. Objects re-exported under several
names count once.

Run it as a module::

    python -m embedstream.export.docpairs numpy scipy --out pairs.jsonl
    embedstream finetune --pairs pairs.jsonl --name minilm-docs

Pure Python; it imports the packages it reads (and their public submodules).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import pkgutil
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

MIN_QUERY_WORDS = 3
MIN_POSITIVE_WORDS = 15
# The body is cut here: the model's token limit cuts it far earlier anyway.
MAX_POSITIVE_CHARS = 4000
# "name(args)" or "name(args) -> type": a signature, not a summary.
_SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->.*)?$", re.DOTALL)
_PARAGRAPHS = re.compile(r"\n\s*\n")
# Submodules never read: tests and vendored or private code.
_SKIPPED_PARTS = {"tests", "test", "testing", "conftest", "setup", "__main__"}


def docstring_pairs(packages: list[str]) -> list[dict[str, str]]:
    """``{"query", "positive", "group", "source"}`` pairs from the public docstrings of ``packages``.

    Deterministic for given package versions: modules are walked in sorted
    order and the objects of each in name order.
    """
    candidates: list[dict[str, str]] = []
    seen: set[int] = set()
    for package in packages:
        for module in _public_modules(package):
            for source, group, obj in _documented(module, package):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                pair = split_docstring(inspect.getdoc(obj) or "")
                if pair is not None:
                    candidates.append({"query": pair[0], "positive": pair[1], "group": group,
                                       "source": source})
    return _unambiguous(candidates)


def split_docstring(doc: str) -> tuple[str, str] | None:
    """``(summary, body)`` of a docstring, or ``None`` when it is not a usable pair."""
    paragraphs = [p.strip() for p in _PARAGRAPHS.split(doc.strip()) if p.strip()]
    if paragraphs and _SIGNATURE.match(paragraphs[0]):
        paragraphs = paragraphs[1:]
    if len(paragraphs) < 2:
        return None
    summary = " ".join(paragraphs[0].split())
    body = "\n\n".join(paragraphs[1:])[:MAX_POSITIVE_CHARS]
    if len(summary.split()) < MIN_QUERY_WORDS or len(body.split()) < MIN_POSITIVE_WORDS:
        return None
    return summary, body


def _public_modules(package: str) -> Iterator[ModuleType]:
    """``package`` and its importable public submodules, in sorted order."""
    root = importlib.import_module(package)
    yield root
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), f"{package}.",
                                      onerror=lambda _name: None):
        parts = info.name.split(".")[1:]
        if any(p.startswith("_") or p in _SKIPPED_PARTS for p in parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield importlib.import_module(info.name)
        except Exception as err:  # an optional dependency missing, a platform module...
            log.debug("skipping %s: %s", info.name, err)


def _documented(module: ModuleType, package: str) -> Iterator[tuple[str, str, Any]]:
    """``(name, group, object)`` of the public callables ``module`` holds that ``package``
    defines, and of their public methods and properties. The group is the function, or
    the class for a class and its members."""
    # Sorted by name: a module's dict order can follow set order (``from x import *``
    # with a computed ``__all__``), which changes from one interpreter to the next.
    for name, obj in sorted(vars(module).items(), key=lambda item: item[0]):
        if name.startswith("_") or not callable(obj) or not _defined_in(obj, package):
            continue
        group = f"{getattr(obj, '__module__', None) or package}.{name}"
        yield f"{module.__name__}.{name}", group, obj
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items(), key=lambda item: item[0]):
                if isinstance(member, classmethod | staticmethod):
                    member = member.__func__
                if member_name.startswith("_") or not (callable(member)
                                                       or isinstance(member, property)):
                    continue
                yield f"{module.__name__}.{name}.{member_name}", group, member


def _defined_in(obj: Any, package: str) -> bool:
    """True for objects of ``package`` (numpy's ufuncs report no module: they are numpy's)."""
    owner = getattr(obj, "__module__", None)
    if owner is None and type(obj).__name__ == "ufunc":
        owner = "numpy"
    return isinstance(owner, str) and (owner == package or owner.startswith(f"{package}."))


def _unambiguous(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Pairs whose summary and body are each unique in the set."""
    queries = Counter(p["query"] for p in pairs)
    positives = Counter(p["positive"] for p in pairs)
    return [p for p in pairs if queries[p["query"]] == 1 and positives[p["positive"]] == 1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedstream.export.docpairs",
        description="Write (summary, body) docstring pairs of installed packages as JSONL "
                    "for 'embedstream finetune --pairs'.",
    )
    parser.add_argument("packages", nargs="+", help="importable package names, e.g. numpy scipy")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--limit", type=int,
                        help="keep this many pairs, a seeded sample (default: all)")
    parser.add_argument("--seed", type=int, default=13, help="seed of the --limit sample")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        pairs = docstring_pairs(args.packages)
    except ImportError as err:
        print(f"docpairs: cannot import {err.name or err}: is it installed?", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < len(pairs):
        keep = sorted(random.Random(args.seed).sample(range(len(pairs)), args.limit))
        pairs = [pairs[i] for i in keep]
    with args.out.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    groups = len({p["group"] for p in pairs})
    print(f"wrote {len(pairs)} pairs ({groups} functions and classes) of "
          f"{', '.join(args.packages)} "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
