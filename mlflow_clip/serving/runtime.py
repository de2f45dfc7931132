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

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import RuntimeUnavailableError, SettingsError, shown
from .openvino_runtime import OPENVINO_INSTALL_HINT, OpenVinoSession, openvino_available

_logger = logging.getLogger("mlflow_clip.serving.runtime")

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
# Environment overrides, for operators who cannot change the model: MLFLOW_CLIP_<FIELD>, such as
# MLFLOW_CLIP_INTRA_OP_NUM_THREADS=2, one for every field of RuntimeSettings.
ENV_PREFIX = "MLFLOW_CLIP_"
# The one truthiness rule for a setting given as text (environment or model_config).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Settings that 0.1 and 0.2 wrote into MLmodel and that no longer do anything: such a model still
# loads, with a warning naming the key. `extra` was never read; no session used onnxruntime's
# parallel mode (`inter_op_num_threads`); `graph_optimization_level` answered no documented need.
REMOVED_SETTINGS: tuple[str, ...] = ("extra", "inter_op_num_threads", "graph_optimization_level")
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
# auto: the runtime the served precision was gated on and runs fastest (models gated at several
# precisions, `variants.py`; for another model, the runtime its precision needs).
AUTO = "auto"
RUNTIMES: tuple[str, ...] = (ONNXRUNTIME, OPENVINO, AUTO)
PINNABLE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "bf16")
# Precisions that only OpenVINO runs as such (an fp32 graph computed with a bf16 inference hint).
OPENVINO_PRECISIONS: tuple[str, ...] = ("bf16",)


@dataclass(frozen=True)
class RuntimeSettings:
    """How the onnxruntime session runs; stored in MLmodel, overridable at load time."""

    # Which library runs the graphs: onnxruntime, or OpenVINO (`pip install "mlflow-clip[openvino]"`),
    # or auto (see AUTO).
    runtime: str = ONNXRUNTIME
    # For a model gated at several precisions: the one to serve ("" the fastest native here,
    # `variants.py`); a model gated at one precision serves that one.
    precision: str = ""
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    # The OpenVINO device (CPU, GPU, AUTO, ...); onnxruntime uses `providers` instead.
    openvino_device: str = "CPU"
    intra_op_num_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    # Largest batch handed to onnxruntime at once; larger inputs run in chunks.
    chunk_size: int = 32
    # onnxruntime's CPU memory arena grows with every new input shape and never shrinks;
    # a server fed varying batch sizes keeps a flat footprint without it.
    enable_cpu_mem_arena: bool = False
    # Decode JPEGs at a reduced DCT scale (never below the model's input size) before the exact
    # resize: several times faster on photos, with small, measured probability differences.
    jpeg_draft: bool = False
    # Threads decoding and preprocessing images (0: min(4, CPU count)).
    decode_workers: int = 0
    # A request's images are split into this many shards that run concurrently, each decoding
    # its own images and then running the graph (1: the decode workers decode all, then one run).
    # 0: one, on every runtime: the graph keeps every core busy, so concurrent shards only contend
    # (a shard per thread measured slower in 31 of 34 side-by-side comparisons, docs/performance.md).
    shards: int = 0
    # onnxruntime's worker threads busy-wait between operators by default; that spinning takes
    # the cores the decoding threads need.
    allow_spinning: bool = False
    # Options per execution provider, passed to onnxruntime as they are: {"CUDAExecutionProvider":
    # {"device_id": 0}, "TensorrtExecutionProvider": {"trt_engine_cache_enable": True, ...}}.
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("jpeg_draft", "allow_spinning", "enable_cpu_mem_arena"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"Received {name}={getattr(self, name)!r}; expected true or false.")
        for name in ("intra_op_num_threads", "decode_workers", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"Received {name}={value!r}; expected a whole number, 0 for the default.")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise SettingsError(
                f"Received chunk_size={self.chunk_size!r}; expected a whole number of images, at least 1."
            )
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"Received runtime={self.runtime!r}; expected one of {list(RUNTIMES)}.")
        if self.precision and self.precision not in PINNABLE_PRECISIONS:
            raise SettingsError(
                f"Received precision={self.precision!r}; expected one of {list(PINNABLE_PRECISIONS)}, or nothing for "
                "the fastest one the model was gated for."
            )
        if not isinstance(self.openvino_device, str) or not self.openvino_device:
            raise SettingsError(
                f"Received openvino_device={self.openvino_device!r}; expected a device name such as CPU."
            )
        options = self.provider_options
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise SettingsError(
                f"Received provider_options={options!r}; expected options per provider, such as "
                '{"CUDAExecutionProvider": {"device_id": 0}}.'
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["provider_options"] = {name: dict(options) for name, options in self.provider_options.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RuntimeSettings":
        data = dict(data or {})
        for name in REMOVED_SETTINGS:
            if name in data:
                del data[name]
                _logger.warning(
                    "mlflow-clip: the runtime setting %r no longer does anything (removed in 0.3); ignored.", name
                )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"Received unknown runtime settings {unknown}; expected any of {sorted(known)}.")
        if "providers" in data:
            data["providers"] = tuple(data["providers"])
        return cls(**data)

    @property
    def shard_count(self) -> int:
        """How many shards a request's images are split into (see `shards`)."""
        return self.shards or 1

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "RuntimeSettings":
        """These settings, then the `MLFLOW_CLIP_*` environment, then `overrides` on top.

        MLflow hands a pyfunc its whole saved `model_config` merged with the caller's, so a
        value equal to the saved one is not an override: it must not hide the environment's.
        """
        saved = self.to_dict()
        explicit = {
            k: parse_setting(k, v) if isinstance(v, str) else v
            for k, v in dict(overrides or {}).items()
            if k not in saved or _comparable(v) != _comparable(saved[k])
        }
        return RuntimeSettings.from_dict({**saved, **env_overrides(), **explicit})


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `MLFLOW_CLIP_<FIELD>` variables that are set (and not empty), one per settings field."""
    environ = os.environ if environ is None else environ
    names = [f.name for f in fields(RuntimeSettings)]
    return {
        name: parse_setting(name, environ[ENV_PREFIX + name.upper()])
        for name in names
        if environ.get(ENV_PREFIX + name.upper(), "").strip()
    }


def parse_setting(name: str, text: str) -> Any:
    """A setting given as text, read by its field's type: a bool by one rule (1/true/yes/on,
    0/false/no/off), an int as a whole number, providers as a comma-separated list, provider
    options as JSON."""
    kind = {f.name: str(f.type) for f in fields(RuntimeSettings)}.get(name)
    value = text.strip()
    if kind == "bool":
        if value.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise SettingsError(f"Received {name}={shown(text)}; expected one of {list(TRUE_WORDS + FALSE_WORDS)}.")
        return value.lower() in TRUE_WORDS
    if kind == "int":
        try:
            return int(value)
        except ValueError:
            raise SettingsError(f"Received {name}={shown(text)}; expected a whole number.") from None
    if kind is not None and kind.startswith("tuple"):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if kind is not None and kind.startswith("Mapping"):
        try:
            return json.loads(value)
        except ValueError:
            raise SettingsError(
                f"Received {name} that is not JSON; expected options per provider, such as "
                '{"CUDAExecutionProvider": {"device_id": 0}}.'
            ) from None
    return value


def select_providers(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested providers this onnxruntime build has, in order (CPU if none of them)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return tuple(p for p in requested if p in available) or ("CPUExecutionProvider",)


_WARNED_FALLBACKS: set[tuple[str, str]] = set()


def log_providers(model_name: str, requested: tuple[str, ...], active: tuple[str, ...]) -> None:
    """Say which provider serves the graph, at INFO; if it is not the one the model asks for
    first, one warning saying why and the fix (once per process: a model's text encoder falls
    back the same way as its image graph)."""
    import onnxruntime as ort

    serving = active[0] if active else "none"
    _logger.info("%s runs on %s (execution providers %s)", model_name, serving, active)
    if not requested or serving == requested[0] or (requested[0], serving) in _WARNED_FALLBACKS:
        return
    _WARNED_FALLBACKS.add((requested[0], serving))
    available = ort.get_available_providers()
    wanted = requested[0]
    if wanted not in available:
        why = (
            f"this onnxruntime build ({ort.__version__}) has only {available}; install {_package_for(wanted)} "
            "in place of onnxruntime to use it"
        )
    else:
        why = (
            f"{wanted} is in this onnxruntime build but did not start (no GPU, or its CUDA, cuDNN or TensorRT "
            "libraries were not found: onnxruntime's own error above says which)"
        )
    _logger.warning("mlflow-clip: %s asks for %s first, but runs on %s: %s.", model_name, wanted, serving, why)


def _package_for(provider: str) -> str:
    return "onnxruntime-gpu" if provider.startswith(("CUDA", "Tensorrt")) else "an onnxruntime package built with it"


def choose_runtime(settings: RuntimeSettings, precision: str = "fp32") -> str:
    """The runtime that will run a graph at `precision` under `settings`, and why, logged.

    OpenVINO requested but not installed: an fp32/fp16/int8 graph falls back to onnxruntime
    with a warning (the same graph, the same results); a bf16 model is refused, naming the fix,
    unless `runtime` was set to onnxruntime explicitly (its graph then runs in fp32)."""
    if settings.runtime == AUTO:
        return OPENVINO if precision in OPENVINO_PRECISIONS and openvino_available() else _auto_fallback(precision)
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


def _auto_fallback(precision: str) -> str:
    if precision in OPENVINO_PRECISIONS:
        raise RuntimeUnavailableError(
            f"This model's precision is {precision}, which needs OpenVINO, not installed here: {OPENVINO_INSTALL_HINT}."
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
        options.enable_cpu_mem_arena = settings.enable_cpu_mem_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
        providers = select_providers(settings.providers)
        with_options = [
            (p, dict(settings.provider_options[p])) if p in settings.provider_options else p for p in providers
        ]
        self._session = ort.InferenceSession(str(model_path), options, providers=with_options)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.input_name: str = self._session.get_inputs()[0].name
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        self.description = f"onnxruntime {ort.__version__} (execution providers {', '.join(self.providers)})"
        log_providers(Path(model_path).name, tuple(settings.providers), self.providers)

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph once on `batch` (callers split their rows: `chunk_size`)."""
        return self._session.run(outputs or self.output_names, {self.input_name: batch})
