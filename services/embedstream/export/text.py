"""Export a text checkpoint to an ONNX model directory (the only torch code).

The graph follows the contract in :mod:`embedstream.models.manifest`: inputs
``input_ids`` and ``attention_mask`` (plus ``token_type_ids`` when the model
takes them), int64 ``[batch, seq]``; output ``embedding`` float32
``[batch, dimension]``, pooled over the attention mask and L2-normalised when
the manifest says so. Batch and sequence axes are dynamic; the runtime pads
on the right.

The TorchScript exporter (``dynamo=False``) is used first: on BERT-like
models its graph is the one ONNX Runtime's transformer optimizer fuses fully
(EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu). The
dynamo exporter is the fallback for the day the TorchScript one is gone.

A model directory appears only once complete: everything is written to a
hidden staging directory beside it and renamed into place after the parity
check passed, so the runtime never sees half an export.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, normalizers

import embedstream
from embedstream.errors import ExportError
from embedstream.export.checkpoint import (
    DEFAULT_TEXT_NAME,
    TextCheckpoint,
    check_pooling,
    default_text_checkpoint,
    read_text_checkpoint,
)
from embedstream.export.common import staging_dir
from embedstream.export.parity import (
    PARITY_MIN_COSINE,
    PARITY_SENTENCES,
    ParityReport,
    check_parity,
)
from embedstream.models.manifest import NAME_PATTERN, Manifest, file_sha256

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "embedding"
TOKEN_OUTPUT_NAME = "token_embeddings"
# Tokenizers report "no limit" as a huge sentinel (int(1e30)); anything above this is one.
_NO_LIMIT = 1_000_000
# Sentences of the dummy input: two lengths, so one row is padded and the
# attention mask is really used while tracing.
_DUMMY_TEXTS = ["a short one", "a somewhat longer sentence to trace the encoder with padding"]


class SentenceEncoder(torch.nn.Module):
    """A transformer with pooling and optional L2 normalisation in one module.

    ``forward(input_ids, attention_mask[, token_type_ids]) -> [batch, dim]``.
    Padding must be on the right (``cls`` and ``lasttoken`` rely on it).
    """

    def __init__(
        self, transformer: torch.nn.Module, pooling: str, normalize: bool, token_mode: bool = False
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        self.token_mode = token_mode

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        embedding = pool(hidden, attention_mask, self.pooling)
        if self.normalize:
            embedding = F.normalize(embedding, p=2.0, dim=1)
        if self.token_mode:  # contextual token vectors too: the last layer, unpooled
            return embedding, hidden
        return embedding


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``[batch, seq, dim]`` token states to ``[batch, dim]`` as sentence-transformers does."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        # finfo.min rather than -inf: an all-padding row stays finite.
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden, 1, index).squeeze(1)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len_tokens":
        return summed / counts.sqrt()
    raise ExportError(f"pooling {mode!r} is not supported")


def export_text_model(
    checkpoint: Path | str,
    out_root: Path,
    name: str | None = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    opset: int = 17,
    overwrite: bool = False,
    token_mode: bool = False,
    optimize: bool = True,
    source: str | None = None,
    on_checked: Callable[[Path, ParityReport], None] | None = None,
) -> Path:
    """Export ``checkpoint`` to ``out_root/<name>/`` and return that directory.

    ``token_mode`` adds a second output, ``token_embeddings`` ``[batch, seq,
    dim]`` (the last layer's contextual token vectors, unnormalised), which
    the worker stores beside the pooled embedding.

    ``checkpoint`` is a sentence-transformers or plain transformers directory
    (or a Hub id, which needs network). ``pooling``, ``normalize`` and
    ``max_length`` override what the checkpoint declares; a plain transformers
    checkpoint defaults to mean pooling, normalised, and a limit of the
    tokenizer's ``model_max_length`` capped by ``max_position_embeddings``.
    ``name`` defaults to ``all-minilm-l6-v2`` for the default checkpoint and
    to the checkpoint's directory name otherwise.

    With ``optimize`` (the default) the graph is fused for ONNX Runtime
    (:func:`~embedstream.export.optimize.fuse_text_graph`) before the check.
    The result is checked against sentence-transformers on a fixed sentence
    set; a minimum cosine below 0.9999 fails the export. Raises
    :class:`ExportError` for every expected failure; nothing is left in
    ``out_root`` when it does. Without ``overwrite`` an existing directory is
    left as it is when it holds the very graph this export produced (same
    sha256: a no-op) and refused otherwise.

    ``source`` replaces the checkpoint's path in the manifest (for a checkpoint
    that is not kept, such as a fine-tuned one). ``on_checked`` is called with
    the staging directory and the parity report once the check passed, before
    the directory is renamed into place: files it writes there ship with the
    model, and an exception it raises aborts the export.
    """
    ckpt = read_text_checkpoint(checkpoint)
    name = _model_name(name, ckpt)
    pooling = check_pooling(pooling) if pooling else (ckpt.pooling or "mean")
    normalize = normalize if normalize is not None else (ckpt.normalize is not False)
    target = Path(out_root) / name

    model, hf_tokenizer = _load(ckpt)
    limit = _max_length(max_length, ckpt, model.config, hf_tokenizer)
    log.info("exporting %s as %s (pooling=%s, normalize=%s, max_length=%d)",
             ckpt.source, name, pooling, normalize, limit)
    with staging_dir(target, overwrite) as staging:
        manifest = _write_model_dir(
            staging, name, ckpt, model, hf_tokenizer, pooling, normalize, limit, opset, token_mode,
            source,
        )
        if optimize:
            manifest = _fuse(staging, manifest)
        report = check_parity(staging, ckpt.path, list(PARITY_SENTENCES))
        log.info("parity of %s: min cosine %.6f, mean %.6f over %d sentences",
                 name, report.min_cosine, report.mean_cosine, len(report.cosines))
        if not report.passed(PARITY_MIN_COSINE):
            worst = PARITY_SENTENCES[report.cosines.index(report.min_cosine)]
            raise ExportError(
                f"exported {name} disagrees with sentence-transformers: min cosine "
                f"{report.min_cosine:.6f} < {PARITY_MIN_COSINE}, on {worst[:60]!r}"
            )
        if on_checked is not None:
            on_checked(staging, report)
    log.info("exported %s to %s (dimension %d, sha256 %s)",
             name, target, manifest.dimension, manifest.sha256[:12])
    return target


def _write_model_dir(
    model_dir: Path,
    name: str,
    ckpt: TextCheckpoint,
    model: Any,
    hf_tokenizer: Any,
    pooling: str,
    normalize: bool,
    max_length: int,
    opset: int,
    token_mode: bool = False,
    source: str | None = None,
) -> Manifest:
    """Write graph, tokenizer and manifest into ``model_dir``; return the manifest."""
    encoder = SentenceEncoder(model, pooling, normalize, token_mode).eval()
    outputs = [OUTPUT_NAME, TOKEN_OUTPUT_NAME] if token_mode else [OUTPUT_NAME]
    input_names = ["input_ids", "attention_mask"]
    if _uses_token_types(model, hf_tokenizer):
        input_names.append("token_type_ids")
    dummy = hf_tokenizer(_DUMMY_TEXTS, padding=True, return_tensors="pt")
    args = tuple(dummy[n].to(torch.int64) for n in input_names)
    with torch.no_grad():
        result = encoder(*args)
        dimension = int((result[0] if isinstance(result, tuple) else result).shape[-1])
    onnx_path = model_dir / ONNX_FILE
    exporter, opset = export_graph(encoder, args, input_names, onnx_path, opset, outputs)
    extra = _write_tokenizer(ckpt, hf_tokenizer, model_dir / TOKENIZER_FILE, max_length)
    config = model.config
    extra.update(
        onnx_exporter=exporter,
        model_type=getattr(config, "model_type", ""),
        num_attention_heads=getattr(config, "num_attention_heads", 0),
        hidden_size=getattr(config, "hidden_size", 0),
        torch_version=torch.__version__,
        transformers_version=_transformers_version(),
    )
    manifest = Manifest(
        name=name,
        modality="text",
        dimension=dimension,
        pooling=pooling,
        normalize=normalize,
        onnx_file=ONNX_FILE,
        inputs=input_names,
        outputs=outputs,
        tokenizer_files=[TOKENIZER_FILE],
        max_length=max_length,
        opset=opset,
        precision="fp32",
        sha256=file_sha256(onnx_path),
        source=ckpt.source if source is None else source,
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        exporter_version=embedstream.__version__,
        extra=extra,
    )
    manifest.write(model_dir)
    return manifest


def _fuse(model_dir: Path, manifest: Manifest) -> Manifest:
    """Fuse the graph in place; record the fusion counts and the new checksum."""
    from embedstream.export.optimize import fuse_text_graph

    path = manifest.onnx_path(model_dir)
    extra = manifest.extra
    stats = fuse_text_graph(
        path, str(extra.get("model_type", "")),
        int(extra.get("num_attention_heads", 0)), int(extra.get("hidden_size", 0)),
    )
    fused = manifest.model_copy(
        update={"sha256": file_sha256(path), "extra": {**extra, "fusions": stats}}
    )
    fused.write(model_dir)
    return fused


def _model_name(name: str | None, ckpt: TextCheckpoint) -> str:
    if name is None:
        name = DEFAULT_TEXT_NAME if _is_default(ckpt.path) else _name_from(ckpt.source)
    if not NAME_PATTERN.match(name):
        raise ExportError(
            f"invalid model name {name!r}: use 1-64 of a-z, 0-9, '.', '_', '-' "
            "(starting with a letter or digit)"
        )
    return name


def _name_from(source: str) -> str:
    """A model name from a checkpoint path or Hub id: its last part, made plain."""
    stem = Path(source.rstrip("/")).name.lower()
    return re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")[:64]


def _is_default(path: Path) -> bool:
    try:
        return path.resolve() == default_text_checkpoint().resolve()
    except ExportError:
        return False


def _load(ckpt: TextCheckpoint) -> tuple[Any, Any]:
    """The transformers model (fp32, eval, eager attention) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    where = ckpt.transformer_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        # Eager attention: the plain MatMul/Softmax pattern ORT's fusions recognise,
        # and no SDPA kernel the TorchScript exporter has to decompose.
        model = AutoModel.from_pretrained(str(where), attn_implementation="eager")
    except Exception as err:  # transformers raises OSError, ValueError, KeyError...
        raise ExportError(f"cannot load a transformers model from {where}: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{where} did not load as a torch model")
    return model.float().eval(), tokenizer


def _uses_token_types(model: Any, hf_tokenizer: Any) -> bool:
    """True when the tokenizer produces token_type_ids and the model takes them."""
    produced = "token_type_ids" in getattr(hf_tokenizer, "model_input_names", [])
    return produced and "token_type_ids" in inspect.signature(model.forward).parameters


def _max_length(requested: int | None, ckpt: TextCheckpoint, config: Any, tokenizer: Any) -> int:
    """The token limit: requested, else sentence-transformers', else the tokenizer's.

    Always capped by the model's position embeddings, the hard limit of the graph.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if requested is not None:
        if requested < 1 or (positions and requested > positions):
            raise ExportError(
                f"max_length {requested} is out of range for this model (1..{positions})"
            )
        return requested
    candidates = [v for v in (ckpt.max_seq_length, positions) if v]
    if not ckpt.max_seq_length:
        model_max = getattr(tokenizer, "model_max_length", None)
        if model_max and model_max < _NO_LIMIT:
            candidates.append(int(model_max))
    if not candidates:
        raise ExportError(f"{ckpt.source} declares no sequence limit; pass max_length")
    return int(min(candidates))


def export_graph(
    encoder: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    path: Path,
    opset: int,
    output_names: list[str] | None = None,
) -> tuple[str, int]:
    """Write ``encoder`` to ``path`` as ONNX; return the exporter used and the graph's opset.

    TorchScript first (its graph fuses best in ONNX Runtime), dynamo second
    (which starts at opset 18, so the opset may be higher than asked).
    """
    outputs = output_names or [OUTPUT_NAME]
    try:
        _export_torchscript(encoder, args, input_names, path, opset, outputs)
    except Exception as first:  # any failure: the other exporter may still succeed
        log.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", first)
        try:
            _export_dynamo(encoder, args, input_names, path, opset)
        except Exception as second:
            raise ExportError(
                f"ONNX export failed with both exporters: TorchScript: {first}; dynamo: {second}"
            ) from second
        exporter = "dynamo"
    else:
        exporter = "torchscript"
    return exporter, _check_graph(path, input_names, outputs)


def _export_torchscript(
    encoder: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    path: Path,
    opset: int,
    output_names: list[str] | None = None,
) -> None:
    outputs = output_names or [OUTPUT_NAME]
    axes = {n: {0: "batch", 1: "sequence"} for n in [*input_names, TOKEN_OUTPUT_NAME]}
    axes[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter's own deprecation notice and the tracer's notes on Python
        # control flow (shape checks that hold for every encoder input) are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # transformers' mask builder indexes with aranges, never negative indices.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            encoder,
            args,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=outputs,
            dynamic_axes={n: a for n, a in axes.items() if n in [*input_names, *outputs]},
            opset_version=opset,
            do_constant_folding=True,
        )


def _export_dynamo(
    encoder: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    path: Path,
    opset: int,
) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in input_names}
    with warnings.catch_warnings(), torch.no_grad():
        # Notes on pytree internals and on every input sharing the two axes: noise here.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            encoder,
            args,
            None,
            dynamo=True,
            verbose=False,
            input_names=input_names,
            dynamic_shapes=shapes,
            opset_version=max(opset, 18),  # the dynamo exporter starts at opset 18
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    proto = program.model_proto
    # Naming the output at export time clashes with the value torch calls
    # "embedding" (the embedding lookup), so rename afterwards.
    _rename_output(proto.graph, OUTPUT_NAME)
    onnx.save(proto, str(path))


def _rename_output(graph: onnx.GraphProto, new: str) -> None:
    """Give the graph's single output the name ``new``, moving any value already called so."""
    old = graph.output[0].name
    if old == new:
        return
    _rename_value(graph, new, f"{new}__inner")
    _rename_value(graph, old, new)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for names in (node.input, node.output):
            for i, value in enumerate(names):
                if value == old:
                    names[i] = new
    for info in (*graph.output, *graph.value_info):
        if info.name == old:
            info.name = new


def _check_graph(path: Path, input_names: list[str], output_names: list[str] | None = None) -> int:
    """Check the graph is valid ONNX with exactly the contract's inputs and output.

    Returns its opset (of the default domain).
    """
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ExportError(f"exported graph {path} is not valid ONNX: {err}") from err
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    expected = output_names or [OUTPUT_NAME]
    if inputs != input_names or outputs != expected:
        raise ExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}; "
            f"expected {input_names} and {expected}"
        )
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _write_tokenizer(
    ckpt: TextCheckpoint, hf_tokenizer: Any, dest: Path, max_length: int
) -> dict[str, Any]:
    """Write the fast tokenizer the runtime loads; return the manifest's ``extra``.

    The checkpoint's ``tokenizer.json`` is kept as is, except for settings the
    runtime must not inherit: its saved truncation/padding (all-MiniLM-L6-v2
    ships a fixed padding to 128) become truncation to ``max_length`` and
    right padding to the longest in the batch, and sentence-transformers'
    ``do_lower_case`` becomes a Lowercase normaliser, so the runtime never
    lowercases itself (``extra["do_lower_case"]`` is therefore False).
    """
    source = ckpt.transformer_path / TOKENIZER_FILE
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if source.is_file():
        tokenizer = Tokenizer.from_file(str(source))
    elif backend is not None:
        tokenizer = Tokenizer.from_str(backend.to_str())
    else:
        raise ExportError(f"{ckpt.transformer_path} has no fast tokenizer ({TOKENIZER_FILE})")
    if ckpt.do_lower_case:
        current = tokenizer.normalizer
        steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
    pad_id, pad_token = _pad(hf_tokenizer)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token)
    _check_tokenizer(tokenizer, hf_tokenizer, max_length, ckpt.do_lower_case)
    tokenizer.save(str(dest))
    return {
        "pad_token_id": pad_id,
        "pad_token": pad_token,
        "padding_side": "right",
        "do_lower_case": False,
    }


def _pad(hf_tokenizer: Any) -> tuple[int, str]:
    """Pad id and token; models without one pad with id 0 (masked out anyway)."""
    if hf_tokenizer.pad_token_id is not None:
        return int(hf_tokenizer.pad_token_id), str(hf_tokenizer.pad_token)
    log.warning("tokenizer has no pad token; padding with id 0 (masked by attention_mask)")
    return 0, str(hf_tokenizer.convert_ids_to_tokens(0))


def _check_tokenizer(
    tokenizer: Tokenizer, hf_tokenizer: Any, max_length: int, lowercase: bool
) -> None:
    """The runtime's tokenizer must produce the ids sentence-transformers feeds the model."""
    for text in PARITY_SENTENCES:
        expected = hf_tokenizer(
            text.lower() if lowercase else text, truncation=True, max_length=max_length
        )["input_ids"]
        actual = tokenizer.encode(text).ids
        if list(actual) != list(expected):
            raise ExportError(
                f"tokenizer.json and the transformers tokenizer disagree on {text[:40]!r}: "
                f"{actual[:12]}... vs {expected[:12]}..."
            )


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
