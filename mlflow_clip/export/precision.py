"""Precision variants of the exported classifier: fp32 as exported, fp16 for GPUs, int8 for CPUs.

    >>> info = apply_precision("classifier.onnx", "int8", calibration=pixels)  # doctest: +SKIP
    >>> info.method, info.params()["int8_per_channel"]  # doctest: +SKIP
    ('int8-static-qdq', 'True')

Every variant keeps the graph's input and all of its outputs with their names, in float32, so
serving and the edge conventions see the same interface. The zero-shot head (from the L2
normalization of the image embedding on: logit scale, product with the baked text features,
softmax) always stays float32: it is tiny, and it is where rounding would move probabilities most.

- **int8** (`onnxruntime.quantization`, `int8_method="auto"`): ResNet towers (many Conv nodes)
  get static QDQ (uint8 activations calibrated with MinMax on the parity images, int8
  per-channel weights, every op but the head); transformer (ViT) towers get dynamic
  quantization of their MatMul/Gemm weights. The choice and the alternatives measured are in
  docs/decisions/int8-method.md. The runtime is chosen per tower too: a static QDQ graph is
  served by OpenVINO when it is installed at export (parity is then gated on both runtimes,
  onnxruntime being the fallback), a dynamic one by onnxruntime, each where it ran faster
  (docs/decisions/openvino.md has the figures).
- **fp16** (`onnxconverter_common.float16`, inputs and outputs kept float32) is for GPU
  execution providers. onnxruntime's CPU provider computes most fp16 ops in float32, which
  understates a GPU's rounding, so `fp16_emulation` builds an fp32 graph that rounds every
  tensor the fp16 graph stores in fp16, and its parity is gated too
  (docs/decisions/fp16-emulation.md).
- **bf16** leaves the fp32 graph as it is: OpenVINO compiles it with
  `INFERENCE_PRECISION_HINT=bf16` at load time (the model's runtime is `openvino`), so the file
  is the fp32 one and the rounding happens in the runtime (docs/decisions/openvino.md).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mlflow_clip.errors import PrecisionError
from mlflow_clip.export.graph import save_single_file
from mlflow_clip.export.spec import PRECISION_PROVIDERS, PRECISION_RUNTIMES, check_precision
from mlflow_clip.serving.openvino_runtime import openvino_available
from mlflow_clip.serving.variants import cpu_flags, int8_kernels

_logger = logging.getLogger(__name__)

INT8_METHODS: tuple[str, ...] = ("auto", "static", "dynamic")
# A ResNet tower has dozens of convolutions; a ViT has one (the patch embedding).
_RESNET_MIN_CONVS = 2
_DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
_CALIBRATION_BATCH = 4
# onnxruntime aggregates calibration ranges after this many batches, bounding memory.
_CALIBRATION_FLUSH_BATCHES = 8
# Ops whose outputs are not data: never rounded by the fp16 emulation.
_SHAPE_OPS = ("Shape", "Size", "Constant", "ConstantOfShape", "Range")


BF16_METHOD = "openvino-bf16-hint"


@dataclass(frozen=True)
class PrecisionInfo:
    """What `apply_precision` did: the precision, the method, and each choice it made."""

    precision: str
    method: str  # "", "float16", "int8-static-qdq", "int8-dynamic" or "openvino-bf16-hint"
    choices: dict[str, Any] = field(default_factory=dict)
    fp32_nodes: tuple[str, ...] = ()  # nodes kept in float32 (the head)
    chosen_runtime: str = ""  # the runtime chosen for this graph; "" the precision's default

    @property
    def providers(self) -> tuple[str, ...]:
        return PRECISION_PROVIDERS[self.precision]

    @property
    def runtime(self) -> str:
        """The runtime that serves this graph: onnxruntime; openvino for bf16, and for a static
        int8 graph when OpenVINO was installed at export."""
        return self.chosen_runtime or PRECISION_RUNTIMES[self.precision]

    def params(self) -> dict[str, str]:
        """MLflow params: `precision_method` and the method's choices, prefixed by precision."""
        params = {"precision_method": self.method or "none"}
        for key, value in self.choices.items():
            params[f"{self.precision}_{key}"] = str(value)
        if self.fp32_nodes:
            params[f"{self.precision}_fp32_nodes"] = ",".join(self.fp32_nodes)
        return params


# bf16: the fp32 graph, compiled by OpenVINO with a bf16 inference precision hint at load.
BF16_INFO = PrecisionInfo(
    "bf16", BF16_METHOD, {"runtime": "openvino", "inference_precision_hint": "bf16", "graph": "fp32"}
)


def apply_precision(
    onnx_path: str | Path,
    precision: str,
    calibration: np.ndarray | None = None,
    out_path: str | Path | None = None,
    int8_method: str = "auto",
) -> PrecisionInfo:
    """Write `onnx_path` at `precision` to `out_path` (default: in place).

    `calibration` is a float32 batch of preprocessed images `[N, 3, R, R]`, needed by static
    int8 quantization. `int8_method`: `auto` (static for ResNet towers, dynamic for ViTs),
    `static` or `dynamic`.
    """
    check_precision(precision, PrecisionError)
    if int8_method not in INT8_METHODS:
        raise PrecisionError(f"Received int8_method={int8_method!r}; expected one of {', '.join(INT8_METHODS)}.")
    onnx_path = Path(onnx_path)
    out_path = Path(out_path or onnx_path)
    if precision in ("fp32", "bf16"):
        if out_path != onnx_path:
            shutil.copyfile(onnx_path, out_path)
        return PrecisionInfo("fp32", "") if precision == "fp32" else BF16_INFO
    model = onnx.load(str(onnx_path))
    interface = _interface(model)
    _name_nodes(model)
    head = head_nodes(model)
    _isolate_outputs(model, keep=set(head))
    if precision == "fp16":
        info = _to_fp16(model, out_path, head)
    else:
        method = int8_method if int8_method != "auto" else _int8_method_for(model)
        info = _to_int8(model, out_path, head, method, calibration)
    _check_interface(onnx.load(str(out_path), load_external_data=False), interface, precision)
    return info


def _int8_method_for(model: onnx.ModelProto) -> str:
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    return "static" if convs >= _RESNET_MIN_CONVS else "dynamic"


def _to_fp16(model: onnx.ModelProto, out_path: Path, head: Sequence[str]) -> PrecisionInfo:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # Weights below fp16's smallest normal become its nearest value: fp16's rounding, gated
        # by parity (and by the GPU-like emulation), not a user's concern.
        warnings.filterwarnings("ignore", message=".*will be truncated to.*", category=UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=list(head))
    _float32_outputs(converted, set(head))
    save_single_file(converted, out_path)
    return PrecisionInfo(
        "fp16", "float16", {"keep_io_types": True, "converter": "onnxconverter_common.float16"}, tuple(head)
    )


def _float32_outputs(model: onnx.ModelProto, kept: set[str]) -> None:
    """The converter casts the float32 result of a kept-float32 node that produces a graph
    output back to float16 (and declares the output float16), despite keep_io_types: drop those
    casts, so the kept node writes the output itself, as in the fp32 graph."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        node = producers[output.name]
        source = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if source is not None and source.name in kept:
            internal = node.input[0]
            graph.node.remove(node)
            for other in graph.node:
                other.output[:] = [output.name if o == internal else o for o in other.output]
                other.input[:] = [output.name if i == internal else i for i in other.input]
        elif output.type.tensor_type.elem_type == TensorProto.FLOAT16:
            half = output.name + "/fp16"
            node.output[:] = [half if o == output.name else o for o in node.output]
            graph.node.append(helper.make_node("Cast", [half], [output.name], to=TensorProto.FLOAT, name=half))
        output.type.tensor_type.elem_type = TensorProto.FLOAT


def _to_int8(model, out_path: Path, head, method: str, calibration: np.ndarray | None) -> PrecisionInfo:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with _quiet_quantizer():
        if method == "dynamic":
            reduce_range = dynamic_reduce_range()
            quantize_dynamic(
                model,
                str(out_path),
                op_types_to_quantize=list(_DYNAMIC_OP_TYPES),
                per_channel=False,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(head),
            )
            choices = {
                "method": "dynamic",
                "op_types": ",".join(_DYNAMIC_OP_TYPES),
                "weight_type": "int8",
                "per_channel": False,
                "reduce_range": reduce_range,
                "activations": "uint8, quantized at run time",
            }
            return PrecisionInfo("int8", "int8-dynamic", choices, tuple(head))
        if calibration is None or len(calibration) == 0:
            raise PrecisionError(
                "Static int8 quantization needs calibration images; pass a folder of images (-P images=...)."
            )
        reader = _CalibrationReader(model.graph.input[0].name, np.ascontiguousarray(calibration, dtype=np.float32))
        quantize_static(
            model,
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(head),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibMaxIntermediateOutputs": _CALIBRATION_FLUSH_BATCHES},
        )
    choices = {
        "method": "static-qdq",
        "op_types": "all quantizable",
        "weight_type": "int8",
        "per_channel": True,
        "reduce_range": False,
        "activation_type": "uint8",
        "calibration": "minmax",
        "calibration_images": len(calibration),
    }
    runtime, reason = static_int8_runtime()
    choices["runtime"] = f"{runtime} ({reason})"
    return PrecisionInfo("int8", "int8-static-qdq", choices, tuple(head), chosen_runtime=runtime)


def dynamic_reduce_range() -> bool:
    """Whether a dynamic int8 graph exported here keeps its weights in 7 bits (`reduce_range`):
    where this CPU's int8 kernels are not VNNI's or AMX's (`serving.variants.int8_kernels`).

    Those kernels add each pair of uint8 x int8 products into an int16, which saturates; with
    weights within [-64, 63] no pair can (2 x 255 x 64 < 32768). The parity gate runs on this
    CPU's kernels, and MLmodel records them. With VNNI or AMX the products are exact, and the full
    8 bits are the more accurate. Figures: docs/decisions/int8-method.md."""
    return int8_kernels(cpu_flags()) != "vnni"


def static_int8_runtime() -> tuple[str, str]:
    """(runtime, why) for a static QDQ int8 graph: OpenVINO's int8 kernels when installed."""
    if openvino_available():
        return "openvino", "its int8 kernels: 1.3x to 1.5x onnxruntime on ResNet towers; onnxruntime is the fallback"
    return "onnxruntime", "OpenVINO, 1.3x to 1.5x faster on this graph, is not installed here"


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over one array, in small batches."""

    def __init__(self, input_name: str, pixels: np.ndarray):
        self._batches = [pixels[i : i + _CALIBRATION_BATCH] for i in range(0, len(pixels), _CALIBRATION_BATCH)]
        self._name = input_name
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class _quiet_quantizer:
    """onnxruntime's quantizer warns through the root logger that the graph was not
    pre-processed (`quant_pre_process` measured no gain on the onnxsim-simplified graphs)."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    def __enter__(self):
        self._filter = self._Filter()
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the zero-shot head's nodes: the product with the baked text features (the
    MatMul behind the first output's Softmax or Sigmoid, and SigLIP's logit bias), what follows
    it, and the normalization chain of the image embedding that feeds it (walking back to the
    last MatMul/Gemm/Conv)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    node = producers.get(graph.output[0].name)
    while node is not None and (
        node.op_type in ("Identity", "Softmax", "Sigmoid") or _adds_a_constant(node, initializers)
    ):
        node = producers.get(next(i for i in node.input if i not in initializers))
    if node is None or node.op_type not in ("MatMul", "Gemm") or not any(i in initializers for i in node.input):
        _logger.warning("No zero-shot head found behind the first output; quantizing the whole graph.")
        return []
    head = {node.name}
    stack = [i for i in node.input if i in producers]
    while stack:
        upstream = producers[stack.pop()]
        if upstream.name in head or upstream.op_type in ("MatMul", "Gemm", "Conv"):
            continue
        head.add(upstream.name)
        stack.extend(i for i in upstream.input if i in producers)
    head |= _downstream(graph, node)
    return [n.name for n in graph.node if n.name in head]


def _adds_a_constant(node: onnx.NodeProto, initializers: set[str]) -> bool:
    return node.op_type == "Add" and len(node.input) == 2 and sum(i in initializers for i in node.input) == 1


def _downstream(graph: onnx.GraphProto, start: onnx.NodeProto) -> set[str]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, stack = set(), list(start.output)
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(node.output)
    return seen


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: the quantizer and the fp16 converter address nodes by name."""
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _isolate_outputs(model: onnx.ModelProto, keep: set[str] = frozenset()) -> None:
    """A graph output that other nodes also read, written by a node that gets converted (not in
    `keep`), becomes an Identity of an internal tensor: the fp16 converter otherwise keeps the
    output float32 but lets its readers assume float16."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        if output.name not in read or producers[output.name].name in keep:
            continue
        internal = output.name + "/internal"
        for node in graph.node:
            node.output[:] = [internal if o == output.name else o for o in node.output]
            node.input[:] = [internal if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [internal], [output.name], name=output.name + "/output"))


def _interface(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    return [("input", v.name, v.type.tensor_type.elem_type) for v in model.graph.input] + [
        ("output", v.name, v.type.tensor_type.elem_type) for v in model.graph.output
    ]


def _check_interface(model: onnx.ModelProto, expected, precision: str) -> None:
    initializers = {init.name for init in model.graph.initializer}
    actual = [entry for entry in _interface(model) if entry[1] not in initializers]
    expected = [entry for entry in expected if entry[1] not in initializers]
    if actual != expected or any(elem != TensorProto.FLOAT for _, _, elem in actual):
        raise PrecisionError(
            f"The {precision} graph changed the classifier's inputs/outputs: received {actual}; expected {expected}, "
            "all float32."
        )


def fp16_emulation(fp32_path: str | Path, fp16_path: str | Path, out_path: str | Path) -> Path:
    """An fp32 graph that rounds to fp16 precision every tensor the fp16 graph stores in fp16:
    its float16 weights, and the output of each node it runs in float16 (ops themselves compute
    in float32, as GPU kernels accumulate). Run on the CPU provider, it shows what fp16 does to
    the probabilities on a GPU, including overflow (a tensor beyond fp16's range becomes inf)."""
    model = onnx.load(str(fp32_path))
    _name_nodes(model)  # the same names and isolated outputs as apply_precision gave the fp16 graph
    _isolate_outputs(model, keep=set(head_nodes(model)))
    half = _fp16_tensor_names(onnx.load(str(fp16_path)))
    for init in model.graph.initializer:
        if init.name in half and init.data_type == TensorProto.FLOAT:
            rounded = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    rounded_names: dict[str, str] = {}
    nodes = []
    for graph_input in model.graph.input:
        if graph_input.name in half:
            nodes.extend(_round_trip(graph_input.name, rounded_names))
    for node in model.graph.node:
        node.input[:] = [rounded_names.get(i, i) for i in node.input]
        nodes.append(node)
        if node.op_type in _SHAPE_OPS:
            continue
        for out in node.output:
            if out in half:
                nodes.extend(_round_trip(out, rounded_names))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_single_file(model, out_path)
    return Path(out_path)


def _round_trip(name: str, renames: dict[str, str]) -> list[onnx.NodeProto]:
    half, rounded = name + "/fp16", name + "/fp16_rounded"
    renames[name] = rounded
    return [
        helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16, name=half),
        helper.make_node("Cast", [half], [rounded], to=TensorProto.FLOAT, name=rounded),
    ]


def _fp16_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Tensors the converted graph holds in float16, by name (the converter keeps the names of
    the fp32 graph; the graph input enters through a Cast to float16)."""
    half = {init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT16}
    half |= {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute):
            half.add(node.input[0])
    return half
