"""Fine-tune a text checkpoint on the user's pairs and export it (``embedstream finetune``).

One run, in order, and nothing written until the end:

1. read and validate the pairs (:mod:`embedstream.export.pairs`), split off a
   seeded held-out set in which no query or answer is shared with training
   (or take the held-out pairs from a file of their own);
2. load the base checkpoint as sentence-transformers would serve it (a plain
   transformers checkpoint gets mean pooling and normalisation, the same
   defaults ``embedstream export`` applies);
3. measure the base on the held-out set (recall@1, recall@10, MRR@10:
   :mod:`embedstream.export.retrieval`);
4. train with sentence-transformers' trainer and MultipleNegativesRankingLoss
   (in-batch negatives, plus the pair's own negative when the file has them),
   batches free of duplicate texts;
5. measure the tuned model the same way; when its MRR@10 is below the base's,
   stop with :class:`FinetuneRefused` (unless ``force``): nothing is written;
6. export through :func:`~embedstream.export.text.export_text_model`, the same
   exporter and parity gate as ``embedstream export`` (cosine >= 0.9999 against
   the tuned PyTorch model), with the report written into the model directory
   (:data:`REPORT_FILE`) before it appears.

torch, transformers, sentence-transformers and datasets are imported only when
a run gets to step 2, so the pairs are checked in a second and nothing here
ever loads in the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import embedstream
from embedstream.errors import ExportError
from embedstream.export.checkpoint import (
    TextCheckpoint,
    default_text_checkpoint,
    read_text_checkpoint,
)
from embedstream.export.pairs import Pair, PairsError, overlap, read_pairs, split_pairs
from embedstream.export.retrieval import RetrievalScores, SearchProblem, evaluate, search_problem
from embedstream.models.manifest import NAME_PATTERN

log = logging.getLogger(__name__)

REPORT_FILE = "finetune.json"
LOSS = "MultipleNegativesRankingLoss"
# The figure a tuned model must not lose against the base to be written.
GATE_METRIC = "mrr_at_10"
_ENCODE_BATCH = 32


@dataclass(frozen=True, slots=True)
class FinetuneSettings:
    """Everything one run depends on. The CLI builds it from its flags."""

    pairs: Path
    """JSONL file of ``{"query", "positive"[, "negative"][, "group"]}`` objects."""
    name: str
    """Name of the new model directory under ``model_dir``."""
    model_dir: Path
    """Root of the model directories."""
    base: str | None = None
    """Checkpoint to adapt (directory or Hub id); ``None``: the shipped all-MiniLM-L6-v2."""
    epochs: int = 1
    """Passes over the training pairs. More helps until the held-out figures stop rising."""
    batch_size: int = 32
    """Pairs per step. Every other pair of a batch is a negative, so larger batches make
    a harder task (and a better model) at the cost of memory."""
    learning_rate: float = 2e-5
    """AdamW peak learning rate, reached after the warm-up and decayed linearly to 0."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up from 0."""
    max_length: int | None = None
    """Token limit while training and measuring, and of the exported model; ``None``:
    the base's. Lower is faster (attention costs grow with the square of the length)."""
    eval_size: float = 0.1
    """Held-out share of the pairs (below 1) or count of pairs (1 or more)."""
    eval_pairs: Path | None = None
    """A pairs file to measure on instead of splitting ``pairs``; pairs in it whose query
    or answer is also a training text are dropped."""
    seed: int = 13
    """Seed of the split, of the batch order and of the training."""
    threads: int = 0
    """CPU threads torch trains and embeds with; 0: the cores this process may use (its
    CPU affinity). Set it to a pod's CPU limit, which affinity does not show; on a CPU
    other work is busy with, fewer threads than cores can be much faster."""
    force: bool = False
    """Write the model even when it ranks worse than the base on the held-out set."""
    overwrite: bool = False
    """Replace an existing model directory of the same name."""
    progress: bool = True
    """Show progress bars (on stderr)."""

    def check(self) -> None:
        """Raise :class:`ExportError` for a setting no run could use."""
        if not NAME_PATTERN.match(self.name):
            raise ExportError(
                f"invalid model name {self.name!r}: use 1-64 of a-z, 0-9, '.', '_', '-' "
                "(starting with a letter or digit)"
            )
        problems = [
            f"{label} must be {rule}, got {value}"
            for label, value, ok, rule in (
                ("epochs", self.epochs, self.epochs >= 1, "at least 1"),
                ("batch size", self.batch_size, self.batch_size >= 2,
                 "at least 2 (the other pairs of a batch are the negatives)"),
                ("learning rate", self.learning_rate,
                 math.isfinite(self.learning_rate) and self.learning_rate > 0, "positive"),
                ("warm-up ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                ("max length", self.max_length, self.max_length is None or self.max_length >= 1,
                 "at least 1"),
                ("held-out size", self.eval_size, self.eval_size > 0, "positive"),
                ("threads", self.threads, self.threads >= 0, "0 (auto) or more"),
            )
            if not ok
        ]
        if problems:
            raise ExportError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class FinetuneResult:
    """The model directory written and its report (also in ``directory / REPORT_FILE``)."""

    directory: Path
    report: dict[str, Any]


class FinetuneRefused(ExportError):
    """The tuned model ranks worse than the base on the held-out set; nothing was written."""

    def __init__(self, report: dict[str, Any]) -> None:
        base = report["metrics"]["base"][GATE_METRIC]
        tuned = report["metrics"]["tuned"][GATE_METRIC]
        super().__init__(
            f"the tuned model is worse than the base on the held-out pairs "
            f"(MRR@10 {tuned:.4f} < {base:.4f}); nothing was written"
        )
        self.report = report


@dataclass(slots=True)
class _Clock:
    """Wall-clock seconds per phase of a run."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return fn()
        finally:
            self.phases[phase] = round(time.monotonic() - start, 2)

    def as_dict(self) -> dict[str, float]:
        return {**self.phases, "total": round(time.monotonic() - self.started, 2)}


def finetune(settings: FinetuneSettings) -> FinetuneResult:
    """Run the whole fine-tuning (see the module docstring); return what was written.

    Raises :class:`~embedstream.export.pairs.PairsError` for a bad pairs file,
    :class:`FinetuneRefused` for a model worse than the base (without
    ``force``) and :class:`ExportError` for every other expected failure.
    """
    clock = _Clock()
    settings.check()
    target = Path(settings.model_dir) / settings.name
    if target.exists() and not settings.overwrite:
        raise ExportError(f"model directory {target} exists; pass --overwrite to replace it")
    train, held_out, pairs_info = prepare_pairs(settings)
    ckpt = read_text_checkpoint(settings.base if settings.base else default_text_checkpoint())
    _require_training_extra()
    with _torch_threads(settings.threads), _transformers_bars(settings.progress):
        return _run(settings, ckpt, train, held_out, pairs_info, clock)


def _run(
    settings: FinetuneSettings, ckpt: TextCheckpoint, train: list[Pair], held_out: list[Pair],
    pairs_info: dict[str, Any], clock: _Clock,
) -> FinetuneResult:
    """Steps 2 to 6 of the module docstring, on validated input."""
    model = _load_model(ckpt)
    model.max_seq_length = _limit(settings.max_length, model)
    problem = search_problem(held_out)
    embed = _embedder(model, settings.progress)
    base_scores: RetrievalScores = clock.timed("evaluate_base", lambda: evaluate(embed, problem))
    log.info("base on %d held-out queries: %s", len(problem.queries), base_scores)
    training = clock.timed("train", lambda: _train(model, train, settings))
    tuned_scores: RetrievalScores = clock.timed("evaluate_tuned", lambda: evaluate(embed, problem))
    log.info("tuned: %s", tuned_scores)
    report = _report(settings, ckpt, pairs_info, problem, base_scores, tuned_scores,
                     training, int(model.max_seq_length))
    worse = getattr(tuned_scores, GATE_METRIC) < getattr(base_scores, GATE_METRIC)
    report["verdict"] = ("worse, written with --force" if worse and settings.force
                         else "worse, refused" if worse else "not worse than the base")
    if worse and not settings.force:
        report["time_s"] = clock.as_dict()
        raise FinetuneRefused(report)
    directory = _export(model, ckpt, settings, report, clock)
    return FinetuneResult(directory, report)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the run and restored after it (a process-wide knob)."""
    import torch

    from embedstream.runtime.onnx import default_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") on or off for the
    run, as they were after it (another process-wide switch)."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.is_progress_bar_enabled()
    if enabled:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()


def prepare_pairs(settings: FinetuneSettings) -> tuple[list[Pair], list[Pair], dict[str, Any]]:
    """``(train, held_out, what the report says about them)`` for ``settings``' pairs.

    Pure file work (no torch). With ``eval_pairs``, held-out pairs that share a query
    or an answer with a training pair are dropped and counted.
    """
    pairs = read_pairs(settings.pairs)
    info: dict[str, Any] = {
        "file": Path(settings.pairs).name,
        "sha256": hashlib.sha256(Path(settings.pairs).read_bytes()).hexdigest(),
        "read": len(pairs),
        "negatives": pairs[0].negative is not None,
    }
    if settings.eval_pairs is None:
        train, held_out = split_pairs(pairs, settings.eval_size, settings.seed)
        info["held_out_from"] = f"seeded split of the pairs (size {settings.eval_size:g})"
    else:
        train = pairs
        candidates = read_pairs(settings.eval_pairs)
        shared = {id(p) for p in overlap(train, candidates)}
        held_out = [p for p in candidates if id(p) not in shared]
        info["held_out_from"] = Path(settings.eval_pairs).name
        info["held_out_dropped_as_seen_in_training"] = len(shared)
        if len(held_out) < 2:
            raise PairsError(
                f"{settings.eval_pairs}: {len(held_out)} held-out pairs left after dropping "
                f"{len(shared)} that share a text with the training pairs; need at least 2"
            )
    info.update(train=len(train), held_out=len(held_out))
    log.info("pairs: %d read, %d to train on, %d held out", len(pairs), len(train), len(held_out))
    return train, held_out, info


def _require_training_extra() -> None:
    try:
        import accelerate  # noqa: F401  (the trainer's, checked here for a clear message)
        import datasets  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"fine-tuning needs the export and finetune extras "
            f"(pip install 'embedstream[export,finetune]'): {err}"
        ) from err


def _load_model(ckpt: TextCheckpoint) -> Any:
    """The checkpoint as a SentenceTransformer on the best device, pooled as exported."""
    from sentence_transformers import SentenceTransformer

    from embedstream.export.parity import st_modules

    try:
        if ckpt.sentence_transformers:
            return SentenceTransformer(str(ckpt.path))
        transformer_cls, pooling_cls, normalize_cls = st_modules()
        transformer = transformer_cls(str(ckpt.transformer_path), do_lower_case=ckpt.do_lower_case)
        dimension = int(transformer.auto_model.config.hidden_size)
        return SentenceTransformer(
            modules=[transformer, pooling_cls(dimension, pooling_mode="mean"), normalize_cls()]
        )
    except Exception as err:  # transformers raises OSError, ValueError, KeyError...
        raise ExportError(f"sentence-transformers cannot load {ckpt.source}: {err}") from err


def _limit(requested: int | None, model: Any) -> int:
    """The token limit for the run: ``requested`` within the model's positions, else the base's."""
    positions = getattr(model[0].auto_model.config, "max_position_embeddings", None)
    if requested is None:
        return int(model.max_seq_length)
    if positions and requested > positions:
        raise ExportError(f"max length {requested} exceeds the base's {positions} positions")
    return requested


def _embedder(model: Any, progress: bool) -> Callable[[list[str]], np.ndarray]:
    def embed(texts: list[str]) -> np.ndarray:
        vectors = model.encode(texts, batch_size=_ENCODE_BATCH, convert_to_numpy=True,
                               show_progress_bar=progress)
        return np.asarray(vectors, dtype=np.float32)

    return embed


def _train(model: Any, train: list[Pair], settings: FinetuneSettings) -> dict[str, Any]:
    """Train ``model`` in place; return the steps, device and logged losses."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    columns = {"anchor": [p.query for p in train], "positive": [p.positive for p in train]}
    if train[0].negative is not None:
        columns["negative"] = [p.negative or "" for p in train]
    steps = math.ceil(len(train) / settings.batch_size) * settings.epochs
    losses: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="embedstream-finetune-") as workdir:
        args = SentenceTransformerTrainingArguments(
            output_dir=workdir,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            warmup_steps=math.ceil(steps * settings.warmup_ratio),
            seed=settings.seed,
            data_seed=settings.seed,
            batch_sampler="no_duplicates",  # a duplicate text in a batch is a false negative
            save_strategy="no",
            logging_steps=max(1, steps // 20),
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=_has_cuda(),
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(columns),
            loss=_loss(model), callbacks=[_progress(settings.progress, losses)],
        )
        # The trainer's own bar and printer write loss dicts to stdout; ours writes to stderr.
        # The model-card collector is of no use (no card is written) and draws a bar of its own.
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, ProgressCallback | PrinterCallback) or (
                type(callback).__name__ == "ModelCardCallback"
            ):
                trainer.remove_callback(callback)
        try:
            state = trainer.train()
        except Exception as err:
            raise ExportError(f"training failed: {err}") from err
    return {"steps": int(state.global_step), "device": str(model.device),
            "train_loss": round(float(state.training_loss), 4), "loss": losses}


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _loss(model: Any) -> Any:
    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import (  # type: ignore[no-redef]
            MultipleNegativesRankingLoss,
        )
    return MultipleNegativesRankingLoss(model)


def _progress(enabled: bool, losses: list[dict[str, float]]) -> Any:
    """A trainer callback: a tqdm bar of steps on stderr, the latest loss beside it."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, unit="step", desc="fine-tuning",
                            file=sys.stderr, disable=not enabled)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(1)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append({"step": int(state.global_step), "loss": round(logs["loss"], 4)})
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    return Progress()


def _report(
    settings: FinetuneSettings,
    ckpt: TextCheckpoint,
    pairs_info: dict[str, Any],
    problem: SearchProblem,
    base: RetrievalScores,
    tuned: RetrievalScores,
    training: dict[str, Any],
    max_length: int,
) -> dict[str, Any]:
    import sentence_transformers
    import torch
    import transformers

    return {
        "name": settings.name,
        "base": ckpt.source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pairs": pairs_info,
        "held_out": {"queries": len(problem.queries), "corpus": len(problem.corpus)},
        "metrics": {"base": base.as_dict(), "tuned": tuned.as_dict(), "gate": GATE_METRIC},
        "settings": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "warmup_ratio": settings.warmup_ratio,
            "max_length": max_length,
            "eval_size": settings.eval_size if settings.eval_pairs is None else None,
            "seed": settings.seed,
            "threads": settings.threads or "auto",
            "loss": LOSS,
            "batch_sampler": "no_duplicates",
        },
        "training": training,
        "versions": {
            "embedstream": embedstream.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
    }


def _export(
    model: Any, ckpt: TextCheckpoint, settings: FinetuneSettings, report: dict[str, Any],
    clock: _Clock,
) -> Path:
    """Save the tuned model, export it with the parity gate, report inside the directory."""
    from embedstream.export.parity import ParityReport
    from embedstream.export.text import export_text_model

    exporting = time.monotonic()

    def write_report(staging: Path, parity: ParityReport) -> None:
        report["parity"] = {"min_cosine": parity.min_cosine, "mean_cosine": parity.mean_cosine,
                            "sentences": len(parity.cosines)}
        report["time_s"] = {**clock.phases, "export": round(time.monotonic() - exporting, 2),
                            "total": round(time.monotonic() - clock.started, 2)}
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="embedstream-finetuned-") as checkpoint:
        model.save(checkpoint, create_model_card=False)
        return export_text_model(
            Path(checkpoint), settings.model_dir, settings.name,
            max_length=int(model.max_seq_length), overwrite=settings.overwrite,
            source=f"{ckpt.source}, fine-tuned on {Path(settings.pairs).name}",
            on_checked=write_report,
        )


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    pairs, s, t = report["pairs"], report["settings"], report.get("time_s", {})
    lines = [
        f"fine-tuning {report['name']} from {report['base']}",
        f"pairs: {pairs['train']} to train on, {pairs['held_out']} held out "
        f"({report['held_out']['queries']} queries against {report['held_out']['corpus']} "
        f"texts; held out: {pairs['held_out_from']})",
        f"{'':12}{'base':>8}{'tuned':>8}{'change':>9}",
    ]
    for label, key in (("recall@1", "recall_at_1"), ("recall@10", "recall_at_10"),
                       ("MRR@10", "mrr_at_10")):
        lines.append(f"{label:12}{base[key]:8.4f}{tuned[key]:8.4f}{tuned[key] - base[key]:+9.4f}")
    lines.append(
        f"settings: {s['epochs']} epoch(s), {report['training']['steps']} steps, batch "
        f"{s['batch_size']}, learning rate {s['learning_rate']:g}, warm-up {s['warmup_ratio']:g}, "
        f"max length {s['max_length']}, seed {s['seed']}, {s['loss']} "
        f"on {report['training']['device']}"
    )
    if t:
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in t.items()))
    if "parity" in report:
        lines.append(f"parity of the ONNX export: min cosine {report['parity']['min_cosine']:.7f}")
    lines.append(f"verdict: {report.get('verdict', '')}")
    return "\n".join(lines)
