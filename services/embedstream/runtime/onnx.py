"""ONNX Runtime backend: TensorRT, CUDA or CPU, picked from what is installed."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from embedstream.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Preference order when the user names none. TensorRT first: where it is
# installed it is the fastest; CUDA next; CPU always works.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})


def choose_providers(requested: list[str]) -> list[str]:
    """The providers to open a session with.

    ``requested`` empty: every preferred provider that this onnxruntime build
    offers, best first. Otherwise exactly the requested ones, each of which
    must be available (a typo must not fall back silently to CPU): a missing
    one is a :class:`ConfigError`.
    """
    available = ort.get_available_providers()
    if not requested:
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in requested if p not in available]
    if missing:
        raise ConfigError(
            f"execution provider(s) {missing} not available in this onnxruntime build; "
            f"available: {available}"
        )
    return list(requested)


def check_active_providers(requested: list[str], active: list[str], onnx_path: str) -> None:
    """Refuse a session that did not get every provider it was configured with.

    An onnxruntime-gpu build lists the CUDA and TensorRT providers whether or
    not their libraries load; when they do not (CUDA, cuDNN or TensorRT missing
    from the image, no GPU visible to the container), onnxruntime logs an error
    and quietly runs the session on the CPU. A pool configured for a GPU would
    then serve at a fraction of its rate while looking healthy, so explicitly
    requested providers must all be active. ``requested`` empty (pick the best
    available) accepts whatever loaded.
    """
    missing = [p for p in requested if p not in active]
    if missing:
        raise ConfigError(
            f"{onnx_path}: execution provider(s) {missing} were configured but onnxruntime "
            f"could not start them and would run on {active} instead; refusing to fall back "
            "silently. For CUDA/TensorRT: check that the container sees a GPU (the nvidia "
            "runtime class, an nvidia.com/gpu limit) and that the image's CUDA, cuDNN and "
            "TensorRT libraries match this onnxruntime build (onnxruntime's log above names "
            "the library that failed to load)"
        )


def engine_cache_dir(onnx_path: str) -> Path:
    """Where TensorRT keeps the engines and timing cache of one model.

    Never beside the model: model directories are read-only wherever they are
    deployed (baked into an image, a read-only volume, an init container's copy
    mounted read-only). ``<tempdir>/embedstream-trt/<model directory name>``:
    ``TMPDIR`` moves it, and the Helm chart mounts a volume at
    ``/tmp/embedstream-trt`` in TensorRT pools so a restarted container reuses
    the engines it built.
    """
    return Path(tempfile.gettempdir()) / "embedstream-trt" / Path(onnx_path).parent.name


def provider_options(provider: str, onnx_path: str) -> dict[str, Any]:
    """Tuned options of a GPU provider (untested on a GPU in this repository so far).

    TensorRT builds an engine per input shape range, which takes minutes: the
    engines are cached in :func:`engine_cache_dir` so a restart reuses them;
    fp16 lets TensorRT pick half precision where it keeps accuracy.
    """
    if provider == "TensorrtExecutionProvider":
        cache = engine_cache_dir(onnx_path)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"TensorRT engine cache {cache} is not writable ({err}): give the worker a "
                "writable volume there, or point TMPDIR at one"
            ) from err
        return {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
        }
    if provider == "CUDAExecutionProvider":
        # Inputs are copied on the default stream, so no extra sync is needed.
        return {"do_copy_in_default_stream": True, "cudnn_conv_use_max_workspace": "1"}
    return {}


_arena_lock = threading.Lock()
_arena_registered = False


def shared_cpu_arena() -> None:
    """Register one CPU memory arena for every session of this process (once).

    ONNX Runtime gives each session its own CPU arena by default, and an arena
    keeps the largest activations its session ever ran (the warm-up batch) for
    reuse. A worker serving several models therefore held one such high-water
    mark per model; with the arena registered on the process's environment and
    ``session.use_env_allocators`` set, the models share one, and it holds what
    the largest concurrent batches need. Measured on MiniLM (32 x 256 tokens,
    two sessions warmed one after the other): 836-862 MB with an arena each,
    550-615 MB sharing one; the same CPU time per text. Arena settings left at
    ONNX Runtime's defaults: ``kSameAsRequested`` measured no smaller (the
    memory pattern asks for one block per batch shape either way), no arena at
    all cost 10% more CPU (page faults on every batch), and a cap turns the
    warm-up batch into an out-of-memory error rather than saving anything.
    """
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        # max_mem 0 (no cap), default extend strategy, chunk sizes and dead bytes.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _arena_registered = True


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity, e.g. taskset or cgroups)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend:
    """One ONNX Runtime inference session. See :class:`~embedstream.runtime.base.Backend`.

    Safe to call from several threads at once (ONNX Runtime sessions are): the
    worker's inference threads share one backend per model, so the weights are
    held once per process, and with ``threads`` 1 each call computes on its
    caller's thread, side by side with the others.

    ``provider_overrides`` replaces or adds options of a provider (the GPU check
    sets TensorRT's shape profiles and precision this way).
    """

    def __init__(
        self, onnx_path: str, *, providers: list[str], threads: int,
        provider_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        shared_cpu_arena()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        # One batch at a time per session: parallelism comes from intra-op threads.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: idle intra-op threads that spin take the
        # cores the worker's other stages (decode, Redis writes, polling) need,
        # which under light load, many small batches, starves them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # CPU activations come from the process's one arena (see shared_cpu_arena).
        options.add_session_config_entry("session.use_env_allocators", "1")
        chosen = choose_providers(providers)
        overrides = provider_overrides or {}
        configured = [(p, {**provider_options(p, onnx_path), **overrides.get(p, {})})
                      for p in chosen]
        try:
            self._session = ort.InferenceSession(onnx_path, options, providers=configured)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load {onnx_path}: {err}") from err
        active = list(self._session.get_providers())
        check_active_providers(providers, active, onnx_path)
        if active[0] != chosen[0]:
            log.warning("%s: %s did not start, running on %s", onnx_path, chosen[0], active[0])
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name
        # On a GPU, bind inputs and the output explicitly (I/O binding): ORT
        # then copies each once instead of staging through its own buffers.
        self._bind = self.provider in GPU_PROVIDERS
        log.info(
            "loaded %s on %s with %d threads",
            onnx_path, self.provider, options.intra_op_num_threads,
        )

    @property
    def provider(self) -> str:
        """The provider the session really runs on (``embedstream_model_info``'s
        ``provider`` label), not the one asked for."""
        return str(self._session.get_providers()[0])

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (out,) = self.run(inputs, [self._output])
        return out

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """Named outputs as float32 (token mode asks for ``token_embeddings`` too)."""
        feed = {name: array for name, array in inputs.items() if name in self._input_names}
        try:
            if self._bind:
                return self._run_bound(feed, outputs)
            results = self._session.run(outputs, feed)
        except Exception as err:
            raise ModelError(f"inference failed: {err}") from err
        return [np.asarray(out, dtype=np.float32) for out in results]

    def _run_bound(self, feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """CUDA with I/O binding: inputs copied once, outputs kept on the device until read."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        return [np.asarray(out, dtype=np.float32) for out in binding.copy_outputs_to_cpu()]
