"""OpenVINO ownership: the optional runtime, imported only when a model is served with it.

`pip install "mlflow-clip[openvino]"` (or `pip install openvino`) adds it; the default serving
install never needs it. OpenVINO reads the exported ONNX graphs directly (no conversion step, no
second file), and is the runtime that runs a `bf16` model at bf16: the fp32 graph compiled with
`INFERENCE_PRECISION_HINT=bf16` (docs/decisions/openvino.md has the figures and why this package
rather than onnxruntime's OpenVINO execution provider).

    >>> session = OpenVinoSession("model.onnx", settings, precision="bf16")  # doctest: +SKIP
    >>> probabilities, embeddings = session.run(batch)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import queue
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger("mlflow_clip.serving.runtime")

OPENVINO_INSTALL_HINT = 'pip install "mlflow-clip[openvino]" (or pip install openvino)'
# The OpenVINO inference precision of each model precision: an fp16 or int8 graph carries its
# own types, which OpenVINO keeps; only bf16 asks the CPU plugin to compute in bfloat16.
_INFERENCE_PRECISION = {"bf16": "bf16"}
_DEFAULT_INFERENCE_PRECISION = "f32"


def openvino_available() -> bool:
    """Whether `import openvino` would succeed (checked without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def openvino_runs_bf16(device: str = "CPU") -> bool:
    """Whether OpenVINO computes in bf16 on `device` when a model asks it to: natively with
    AVX512_BF16 or AMX, emulated (slowly) with AVX-512. A CPU without AVX-512 has no bf16 in
    OpenVINO, which then runs the graph in f32 without a word: what a bf16 export gated there
    would measure is fp32. Known by compiling a one-matmul graph at the bf16 hint and reading
    back the precision it compiled at (about 1 s with OpenVINO's import, once a process); False
    without OpenVINO."""
    if not openvino_available():
        return False
    import openvino as ov
    from openvino import opset13

    features = opset13.parameter([1, 16], np.float32)
    graph = ov.Model(
        [opset13.matmul(features, opset13.constant(np.eye(16, dtype=np.float32)), False, False)], [features]
    )
    compiled = ov.Core().compile_model(graph, device, {"INFERENCE_PRECISION_HINT": "bf16"})
    return _type_name(str(compiled.get_property("INFERENCE_PRECISION_HINT"))) == "bf16"


def inference_precision(precision: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a model at `precision` (bf16, else f32)."""
    return _INFERENCE_PRECISION.get(precision, _DEFAULT_INFERENCE_PRECISION)


def compile_config(settings: Any, precision: str) -> dict[str, Any]:
    """The properties the graph is compiled with: precision hint, latency hint, threads.

    The precision hint is always explicit: OpenVINO's own default is bf16 on CPUs with AMX and
    f16 on GPUs, which would silently change an fp32 model's probabilities."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision(precision)}
    if settings.intra_op_num_threads and settings.openvino_device == "CPU":
        config["INFERENCE_NUM_THREADS"] = settings.intra_op_num_threads
    return config


class OpenVinoSession:
    """One compiled OpenVINO model; `run` is safe to call from concurrent threads.

    The session owns as many infer requests as OpenVINO says the compiled model runs at once
    (`OPTIMAL_NUMBER_OF_INFER_REQUESTS`: its stream count, 1 under the LATENCY hint), in a pool.
    A call takes an idle request (waiting, without the GIL, while all are busy), runs it on the
    caller's thread and puts it back: never more requests in flight than streams. Threads of
    ours never get requests of their own: two requests of one stream specialising a dynamic
    input shape at once, inside the CPU plugin's TBB arenas, is how concurrent `infer` calls
    hung on 2 cores (docs/decisions/openvino.md). The input is shared with the request (no copy
    under the GIL); the outputs are copied out before the request is handed back.
    """

    runtime = "openvino"

    def __init__(self, model_path: str | Path, settings: Any, precision: str = "fp32"):
        import openvino as ov

        self.settings = settings
        core = ov.Core()
        config = compile_config(settings, precision)
        self._compiled = core.compile_model(str(model_path), settings.openvino_device, config)
        self.input_name: str = self._compiled.inputs[0].any_name
        self.output_names: list[str] = [o.any_name for o in self._compiled.outputs]
        self._outputs = {name: self._compiled.output(name) for name in self.output_names}
        self.streams = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.streams):
            self._idle.put(self._compiled.create_infer_request())
        self.inference_precision: str = _type_name(str(self._compiled.get_property("INFERENCE_PRECISION_HINT")))
        self.providers: tuple[str, ...] = (f"OpenVINO {settings.openvino_device}",)
        self.description = (
            f"OpenVINO {ov.get_version().split('-')[0]} on {settings.openvino_device} "
            f"(inference precision {self.inference_precision})"
        )
        if precision in _INFERENCE_PRECISION:
            self._warn_where_not_native(precision, core, settings.openvino_device)
        _logger.info("Loaded %s with %s", Path(model_path).name, self.description)

    def _warn_where_not_native(self, precision: str, core: Any, device: str) -> None:
        """A bf16 model on a CPU that computes it in f32 (no AVX-512), or emulates it."""
        if self.inference_precision != inference_precision(precision):
            _logger.warning(
                "mlflow-clip: this %s model runs in %s here: OpenVINO has no %s on this CPU (it needs AVX-512), "
                "so it computes as the fp32 graph does, at fp32's speed.",
                precision,
                self.inference_precision,
                precision,
            )
        elif "BF16" not in _capabilities(core, device):
            _logger.warning(
                "mlflow-clip: this %s model runs on a CPU without native bf16 instructions: OpenVINO emulates "
                'them, several times slower than fp32; model_config={"runtime": "onnxruntime"} runs it in fp32.',
                precision,
            )

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph once on `batch` (callers split their rows: `chunk_size`)."""
        inputs = np.ascontiguousarray(batch, dtype=np.float32)
        request = self._idle.get()
        try:
            result = request.infer({0: inputs}, share_inputs=True, share_outputs=False)
            return [np.array(result[self._outputs[name]]) for name in (outputs or self.output_names)]
        finally:
            self._idle.put(request)


def _type_name(value: str) -> str:
    """`<Type: 'bfloat16'>` or `bf16` -> `bf16`; `float32` -> `f32`."""
    names = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
    text = value.split("'")[1] if "'" in value else value
    return names.get(text, text)


def _capabilities(core: Any, device: str) -> list[str]:
    try:
        return list(core.get_property(device.split(":")[0], "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # a device without the property: nothing to warn about
        return ["BF16"]
