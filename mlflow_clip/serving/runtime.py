"""Runtime ownership: one session per loaded model, explicit runtime, providers and settings.

The classifier depends on a session's `run`, not on onnxruntime or OpenVINO themselves, so the
runtime settings (runtime, providers, threads, arena) live in one place and are read from the
model's MLmodel. `open_session` picks the runtime: onnxruntime (`OrtSession`, the default) or
OpenVINO (`openvino_runtime.OpenVinoSession`, an optional dependency imported only when chosen, and the
only runtime that runs a bf16 model at bf16).

    >>> session = open_session("model.onnx", RuntimeSettings(runtime="openvino"), precision="bf16")  # doctest: +SKIP
    >>> probabilities, embeddings = session.run(batch)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import MlflowClipError
from .openvino_runtime import OPENVINO_INSTALL_HINT, OpenVinoSession, openvino_available

_logger = logging.getLogger("mlflow_clip.serving.runtime")

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
# Environment overrides, for operators who cannot change the model: MLFLOW_CLIP_INTRA_OP_NUM_THREADS=2
_ENV_PREFIX = "MLFLOW_CLIP_"
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES: tuple[str, ...] = (ONNXRUNTIME, OPENVINO)
# Precisions that only OpenVINO runs as such (an fp32 graph computed with a bf16 inference hint).
OPENVINO_PRECISIONS: tuple[str, ...] = ("bf16",)


class RuntimeUnavailableError(MlflowClipError, ImportError):
    """The model needs a runtime this environment lacks; the message names the fix."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How the onnxruntime session runs; stored in MLmodel, overridable at load time."""

    # Which library runs the graphs: onnxruntime, or OpenVINO (`pip install "mlflow-clip[openvino]"`).
    runtime: str = ONNXRUNTIME
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    # The OpenVINO device (CPU, GPU, AUTO, ...); onnxruntime uses `providers` instead.
    openvino_device: str = "CPU"
    intra_op_num_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_num_threads: int = 0
    # Largest batch handed to onnxruntime at once; larger inputs run in chunks.
    chunk_size: int = 32
    # onnxruntime's CPU memory arena grows with every new input shape and never shrinks;
    # a server fed varying batch sizes keeps a flat footprint without it.
    enable_cpu_mem_arena: bool = False
    graph_optimization_level: str = "all"
    # Decode JPEGs at a reduced DCT scale (never below the model's input size) before the exact
    # resize: several times faster on photos, with small, measured probability differences.
    jpeg_draft: bool = False
    # Threads decoding and preprocessing images (0: min(4, CPU count)).
    decode_workers: int = 0
    # A request's images are split into this many shards that run concurrently, each decoding
    # its own images and then running the graph, so that decoding one shard overlaps inference
    # on another (0: the intra-op thread count, or the CPU count; 1: decode all, then one run).
    shards: int = 0
    # onnxruntime's worker threads busy-wait between operators by default; that spinning takes
    # the cores the decoding threads need.
    allow_spinning: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("jpeg_draft", "allow_spinning", "enable_cpu_mem_arena"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Received {name}={getattr(self, name)!r}; expected true or false.")
        for name in ("intra_op_num_threads", "inter_op_num_threads", "decode_workers", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Received {name}={value!r}; expected a whole number, 0 for the default.")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"Received chunk_size={self.chunk_size!r}; expected a whole number of images, at least 1.")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"Received runtime={self.runtime!r}; expected one of {list(RUNTIMES)}.")
        if not isinstance(self.openvino_device, str) or not self.openvino_device:
            raise ValueError(f"Received openvino_device={self.openvino_device!r}; expected a device name such as CPU.")
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise ValueError(
                f"Received graph_optimization_level={self.graph_optimization_level!r}; expected one of "
                f"{sorted(_OPT_LEVELS)}."
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RuntimeSettings":
        data = dict(data or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Received unknown runtime settings {unknown}; expected any of {sorted(known)}.")
        if "providers" in data:
            data["providers"] = tuple(data["providers"])
        return cls(**data)

    @property
    def shard_count(self) -> int:
        """How many shards a request's images are split into (see `shards`)."""
        return self.shards or self.intra_op_num_threads or os.cpu_count() or 1

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "RuntimeSettings":
        """These settings, then the `MLFLOW_CLIP_*` environment, then `overrides` on top.

        MLflow hands a pyfunc its whole saved `model_config` merged with the caller's, so a
        value equal to the saved one is not an override: it must not hide the environment's.
        """
        saved = self.to_dict()
        explicit = {
            k: v for k, v in dict(overrides or {}).items() if k not in saved or _comparable(v) != _comparable(saved[k])
        }
        return RuntimeSettings.from_dict({**saved, **_env_overrides(), **explicit})


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _env_overrides() -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in ("intra_op_num_threads", "inter_op_num_threads", "chunk_size", "decode_workers", "shards"):
        value = os.environ.get(_ENV_PREFIX + name.upper())
        if value:
            overrides[name] = int(value)
    for name in ("jpeg_draft", "allow_spinning"):
        value = os.environ.get(_ENV_PREFIX + name.upper())
        if value:
            overrides[name] = value.strip().lower() in ("1", "true", "yes", "on")
    for name in ("runtime", "openvino_device"):
        value = os.environ.get(_ENV_PREFIX + name.upper())
        if value:
            overrides[name] = value.strip()
    providers = os.environ.get(_ENV_PREFIX + "PROVIDERS")
    if providers:
        overrides["providers"] = tuple(p.strip() for p in providers.split(",") if p.strip())
    return overrides


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def select_providers(requested: tuple[str, ...]) -> tuple[str, ...]:
    """Keep the requested providers that this onnxruntime build has, in order, and say so."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = tuple(p for p in requested if p in available)
    dropped = [p for p in requested if p not in available]
    if dropped:
        _logger.warning(
            "Execution providers %s requested by the model are not available in this "
            "onnxruntime build (available: %s); install the matching onnxruntime package "
            "(e.g. onnxruntime-gpu) to use them.",
            dropped,
            available,
        )
    if not chosen:
        _logger.warning("Falling back to CPUExecutionProvider.")
        chosen = ("CPUExecutionProvider",)
    return chosen


def choose_runtime(settings: RuntimeSettings, precision: str = "fp32") -> str:
    """The runtime that will run a graph at `precision` under `settings`, and why, logged.

    OpenVINO requested but not installed: an fp32/fp16/int8 graph falls back to onnxruntime
    with a warning (the same graph, the same results); a bf16 model is refused, naming the fix,
    unless `runtime` was set to onnxruntime explicitly (its graph then runs in fp32)."""
    if settings.runtime == ONNXRUNTIME:
        if precision in OPENVINO_PRECISIONS:
            _logger.warning(
                "mlflow-clip: this %s model runs on onnxruntime as asked (runtime=onnxruntime): its graph "
                "computes in fp32, not %s.",
                precision,
                precision,
            )
        return ONNXRUNTIME
    if openvino_available():
        return OPENVINO
    if precision in OPENVINO_PRECISIONS:
        raise RuntimeUnavailableError(
            f"This model's precision is {precision}, which needs OpenVINO, not installed here: "
            f'{OPENVINO_INSTALL_HINT} (or load it with model_config={{"runtime": "onnxruntime"}} to run it in fp32).'
        )
    _logger.warning(
        "mlflow-clip: runtime=openvino was requested but OpenVINO is not installed (%s); falling back to "
        "onnxruntime, which runs the same %s graph.",
        OPENVINO_INSTALL_HINT,
        precision,
    )
    return ONNXRUNTIME


def open_session(model_path: str | Path, settings: RuntimeSettings = RuntimeSettings(), precision: str = "fp32"):
    """An `OrtSession` or an `OpenVinoSession` for the graph (`choose_runtime` decides)."""
    if choose_runtime(settings, precision) == OPENVINO:
        return OpenVinoSession(model_path, settings, precision)
    return OrtSession(model_path, settings)


class OrtSession:
    """One onnxruntime InferenceSession; `run` is safe to call from concurrent threads."""

    runtime = ONNXRUNTIME

    def __init__(self, model_path: str | Path, settings: RuntimeSettings = RuntimeSettings()):
        import onnxruntime as ort

        self.settings = settings
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_num_threads
        options.inter_op_num_threads = settings.inter_op_num_threads
        options.enable_cpu_mem_arena = settings.enable_cpu_mem_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[settings.graph_optimization_level]
        )
        providers = select_providers(settings.providers)
        self._session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.input_name: str = self._session.get_inputs()[0].name
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        self.description = f"onnxruntime {ort.__version__} (execution providers {', '.join(self.providers)})"
        _logger.info("Loaded %s with execution providers %s", Path(model_path).name, self.providers)

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph once on `batch` (callers split their rows: `chunk_size`)."""
        return self._session.run(outputs or self.output_names, {self.input_name: batch})
