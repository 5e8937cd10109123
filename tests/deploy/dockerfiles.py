"""Read the Dockerfiles in deploy/: instructions, stages, build arguments, and the Python
installs of a stage, so tests can check and replay what an image build does."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from deploy_manifests import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args))
            pending = ""
    assert not pending, f"{path}: dangling continuation"
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, args in instructions(path):
        if keyword == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            result[current] = [("FROM", args)]
        elif current is not None:
            result[current].append((keyword, args))
    return result


def build_args(path: Path) -> dict[str, str]:
    """Every ARG with a default (global and per stage), as the build uses them unset."""
    return {m.group(1): m.group(2).strip('"')
            for k, a in instructions(path) if k == "ARG" and (m := re.match(r"(\w+)=(.*)", a))}


def base_image(path: Path, stage: str) -> str:
    """The image a stage starts from, ARGs resolved."""
    image = stages(path)[stage][0][1].split()[0]
    return expand(image, build_args(path))


def expand(text: str, variables: dict[str, str]) -> str:
    """Dockerfile-style substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR:+word}."""
    def one(match: re.Match[str]) -> str:
        name, op, word = match.group(1) or match.group(4), match.group(2), match.group(3)
        value = variables.get(name, "")
        if op == ":-":
            return value or expand(word, variables)
        if op == ":+":
            return expand(word, variables) if value else ""
        return value
    pattern = r"\$\{(\w+)(?:(:[-+])((?:[^{}]|\{[^{}]*\})*))?\}|\$(\w+)"
    return re.sub(pattern, one, text)


@dataclass
class PythonInstalls:
    """The pip commands of a stage's RUN instructions, in order."""

    steps: list[tuple[str, list[str]]] = field(default_factory=list)  # ("install"|"uninstall", args)
    skipped: list[str] = field(default_factory=list)  # conditional installs (inside `if`)
    extras: set[str] = field(default_factory=set)  # extras of the embedstream wheel


def python_installs(path: Path, stage: str, wheel: str, constraints: str) -> PythonInstalls:
    """The stage's `pip install` / `pip uninstall` commands with ARG defaults, the wheel and
    the constraints file substituted; `--no-cache-dir` dropped. Installs inside `if ...; fi`
    (optional parts such as TensorRT) are listed in ``skipped``."""
    variables = {**build_args(path), "wheel": wheel}
    out = PythonInstalls()
    for keyword, args in stages(path)[stage]:
        if keyword != "RUN":
            continue
        for segment in re.split(r"\s*&&\s*", args):
            if segment.startswith("if ") and "pip install" in segment:
                out.skipped.append(expand(segment, variables))
                continue
            if not re.match(r"pip (un)?install\b", segment):
                continue
            extras = re.search(r"\$\{wheel\}\[([\w,]+)\]", segment)
            if extras:
                out.extras |= set(extras.group(1).split(","))
            words = shlex.split(expand(segment, variables))[2:]
            words = [constraints if w == "/tmp/constraints.txt" else w
                     for w in words if w != "--no-cache-dir"]
            out.steps.append(("uninstall" if segment.startswith("pip uninstall") else "install", words))
    return out
