"""The one staging primitive every exporter installs model directories through.

Real directories and files; the graph is a few bytes standing in for ONNX (the
primitive reads only the manifest's checksum of it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from embedstream.errors import ExportError
from embedstream.export.common import staging_dir, write_manifest
from embedstream.models.manifest import load_manifest


def _fill(model_dir: Path, graph: bytes) -> None:
    (model_dir / "model.onnx").write_bytes(graph)
    write_manifest(model_dir, name=model_dir.name.lstrip(".").split(".")[0], modality="text",
                   dimension=4, pooling="mean", normalize=True, inputs=["input_ids"], opset=17)


def _install(target: Path, graph: bytes, overwrite: bool = False) -> None:
    with staging_dir(target, overwrite) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".")
        _fill(staging, graph)


def _hidden(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_a_new_directory_appears_complete(tmp_path: Path) -> None:
    _install(tmp_path / "m", b"graph-1")
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"graph-1"
    assert load_manifest(tmp_path / "m").name == "m"
    assert _hidden(tmp_path) == []


def test_a_failed_export_leaves_nothing_and_keeps_the_old_model(tmp_path: Path) -> None:
    _install(tmp_path / "m", b"graph-1")
    with pytest.raises(RuntimeError, match="parity"), staging_dir(tmp_path / "m", True) as staging:
        _fill(staging, b"graph-2")
        raise RuntimeError("parity failed")
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"graph-1"
    assert _hidden(tmp_path) == []


def test_the_same_graph_again_is_a_no_op(tmp_path: Path) -> None:
    _install(tmp_path / "m", b"graph-1")
    before = (tmp_path / "m" / "manifest.json").stat()
    _install(tmp_path / "m", b"graph-1")
    after = (tmp_path / "m" / "manifest.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _hidden(tmp_path) == []


def test_another_graph_is_refused_without_overwrite(tmp_path: Path) -> None:
    _install(tmp_path / "m", b"graph-1")
    with pytest.raises(ExportError, match=r"exists and holds another model.*pass --overwrite"):
        _install(tmp_path / "m", b"graph-2")
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"graph-1"
    assert _hidden(tmp_path) == []


def test_overwrite_replaces_and_removes_the_old_directory(tmp_path: Path) -> None:
    _install(tmp_path / "m", b"graph-1")
    _install(tmp_path / "m", b"graph-2", overwrite=True)
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"graph-2"
    assert load_manifest(tmp_path / "m").sha256 != ""
    assert _hidden(tmp_path) == []


def test_overwrite_puts_the_old_model_back_when_the_new_cannot_move_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path / "m", b"graph-1")
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name.startswith(".m.export-"):
            raise OSError("disk trouble")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"):
        _install(tmp_path / "m", b"graph-2", overwrite=True)
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"graph-1"
    assert _hidden(tmp_path) == []
