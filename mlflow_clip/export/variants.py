"""One export gated at several precisions, for serving at the fastest one native where it lands.

``-P precision=auto`` (fp32, int8, and bf16 where OpenVINO is installed and has bf16 on the
CPU) or a list such as ``fp32,bf16`` exports the graph once, then gates each precision of it
against fp32 PyTorch with that precision's own thresholds (`spec.PRECISION_THRESHOLDS`), on
every runtime that may serve it, and on the JPEG draft decode where that precision's model uses
it:

- fp32: the graph (``model.onnx``) on onnxruntime, and on OpenVINO at an f32 hint when installed;
- bf16: the same file, on OpenVINO at a bf16 hint (its only runtime);
- int8: its own graph (``model-int8.onnx``, the method `precision.py` picks for the tower) on
  OpenVINO and on onnxruntime, listed in the order measured fastest for that method
  (docs/decisions/precision-choice.md).

A runtime whose gate fails does not serve that precision: it leaves the precision's
``runtimes`` and is listed under ``refused`` with the gate it failed, its figures kept (int8
kernels differ by CPU: a dynamic int8 graph that passes on onnxruntime may be off on OpenVINO on
the export's CPU). A precision that no runtime passes fails the export, as a single precision's
gate does: nothing is registered; so does a failed draft gate. The result is MLmodel's
``precisions`` table (each one's graph, runtimes, decode, parity and refusals, and for int8 the
family of int8 kernels the gate ran on, which serving may choose it on), run metrics
``parity_<precision>_<runtime>_*``, and tags ``precisions`` and ``parity_<precision>``. Serving
picks among them at load (`mlflow_clip.serving.variants`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from mlflow_clip.export.graph import check_dynamic_batch, edge_doc_string, save_single_file
from mlflow_clip.export.parity import ParityReport, check_gates, load_sample_images, measure_parity
from mlflow_clip.export.precision import apply_precision
from mlflow_clip.export.spec import ParityThresholds, default_jpeg_draft
from mlflow_clip.serving.contract import ONNX_FILE_NAME, ClassifierConfig, sha256_file
from mlflow_clip.serving.openvino_runtime import openvino_available
from mlflow_clip.serving.preprocess import Preprocessor
from mlflow_clip.serving.runtime import AUTO, RuntimeSettings
from mlflow_clip.serving.variants import VariantKey, cpu_flags, int8_kernels

# `built` below is the export job's `BuiltClassifier` (not imported: the job imports this module).
BuiltClassifier = Any

INT8_FILE_NAME = "model-int8.onnx"
# The runtimes of each int8 method, fastest first on the CPUs measured (VNNI and AMX alike):
# OpenVINO compiles a static QDQ graph into its own int8 kernels; a dynamically quantized graph it
# runs op by op, where onnxruntime's MatMulInteger is faster.
INT8_RUNTIME_ORDER: dict[str, tuple[str, ...]] = {
    "int8-static-qdq": ("openvino", "onnxruntime"),
    "int8-dynamic": ("onnxruntime", "openvino"),
}
_SUMMARY = ("max_abs_prob_diff", "max_abs_logit_diff", "top1_agreement", "max_abs_embedding_diff")


@dataclass
class GatedVariants:
    """What gating several precisions produced, for the run, MLmodel and the registry."""

    table: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def runtime_settings(self, base: RuntimeSettings) -> RuntimeSettings:
        """The model's saved settings: the runtime chosen per precision at load (`auto`)."""
        return replace(base, runtime=AUTO)

    @property
    def needs_openvino(self) -> bool:
        return any("openvino" in entry[VariantKey.RUNTIMES] for entry in self.table.values())


def gate_variants(
    built: BuiltClassifier, precisions: Sequence[str], base: ParityReport, images: str | Path | None
) -> GatedVariants:
    """Gate each of `precisions` of `built` (whose own precision, gated as `base`, is one of them)."""
    gated = GatedVariants()
    samples = load_sample_images(images)
    drafts = load_sample_images(images, draft_size=built.config.input_resolution)
    for precision in precisions:
        graph, method, runtimes = _graph_for(built, precision, samples)
        entry: dict[str, Any] = {
            VariantKey.ONNX_MODEL: graph.name,
            VariantKey.METHOD: method,
            VariantKey.RUNTIMES: list(runtimes),
            VariantKey.JPEG_DRAFT: default_jpeg_draft(precision, built.config.input_resolution),
            VariantKey.PARITY: {},
        }
        if precision == "int8":  # what its gate vouches for (serving.variants.int8_kernels)
            entry[VariantKey.INT8_KERNELS] = int8_kernels(cpu_flags())
        if graph.name != ONNX_FILE_NAME:
            entry[VariantKey.ONNX_SHA256] = sha256_file(graph)
            gated.files[graph.name] = graph
        thresholds = ParityThresholds.for_precision(precision)
        refusals: dict[str, list[str]] = {}
        for runtime in runtimes:
            if precision == built.config.precision and runtime == built.precision.runtime:
                _record(gated, entry, precision, runtime, base, None)  # gated already, with the export's gates
            else:
                report = _measure(built, graph, samples, precision, runtime)
                refusals[runtime] = _record(gated, entry, precision, runtime, report, thresholds)
        gated.failures += admit_runtimes(entry, refusals)
        if entry[VariantKey.JPEG_DRAFT] and entry[VariantKey.RUNTIMES]:
            report = _measure(built, graph, samples, precision, entry[VariantKey.RUNTIMES][0], served=drafts)
            gated.failures += _record(
                gated, entry, precision, "draft", report, replace(thresholds, max_pixel_diff=math.inf)
            )
        gated.table[precision] = entry
        gated.tags[f"parity_{precision}"] = _tag(entry, thresholds)
    gated.tags["precisions"] = ",".join(precisions)
    return gated


def _graph_for(built: BuiltClassifier, precision: str, samples) -> tuple[Path, str, tuple[str, ...]]:
    """The graph file that serves `precision`, its method, and its runtimes, fastest first."""
    openvino = ("openvino",) if openvino_available() else ()
    if precision == "fp32":
        return built.onnx_path, "", ("onnxruntime", *openvino)
    if precision == "bf16":
        return built.onnx_path, "openvino-bf16-hint", ("openvino",)
    path = built.onnx_path.with_name(INT8_FILE_NAME)
    preprocessor = Preprocessor.from_config(built.config)
    calibration = preprocessor.batch([image for _, image in samples])
    info = apply_precision(built.onnx_path, "int8", calibration, out_path=path)
    kernels = int8_kernels(cpu_flags())
    _stamp(path, replace(built.config, precision="int8", precision_method=info.method, int8_kernels=kernels))
    check_dynamic_batch(path, built.config.input_resolution, head=built.config.head)
    order = INT8_RUNTIME_ORDER.get(info.method, ("onnxruntime", "openvino"))
    return path, info.method, tuple(r for r in order if r == "onnxruntime" or openvino)


def _stamp(path: Path, config: ClassifierConfig) -> None:
    """The edge conventions' doc_string and the config as metadata, on a converted graph."""
    import onnx

    model = onnx.load(str(path))
    model.graph.doc_string = edge_doc_string(config.mean, config.std)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, config.to_metadata_props())
    model.producer_name = "mlflow-clip"
    save_single_file(model, path)


def _measure(built: BuiltClassifier, graph: Path, samples, precision: str, runtime: str, served=None) -> ParityReport:
    reference = built.reference_head or built.head
    preprocessor = Preprocessor.from_config(built.config)
    return measure_parity(
        reference, graph, samples, built.loaded.preprocess, preprocessor, precision=precision, runtime=runtime,
        served=served,
    )  # fmt: skip


def admit_runtimes(entry: dict[str, Any], refusals: dict[str, list[str]]) -> list[str]:
    """Drop from `entry`'s runtimes each one whose gates failed (`refusals`: runtime -> failed gates),
    recording why under ``refused``; the export's failures: every gate, when no runtime is left.

    >>> entry = {"runtimes": ["onnxruntime", "openvino"]}
    >>> admit_runtimes(entry, {"onnxruntime": [], "openvino": ["max_abs_logit_diff = 1.66 exceeds 1.5"]})
    []
    >>> entry
    {'runtimes': ['onnxruntime'], 'refused': {'openvino': 'max_abs_logit_diff = 1.66 exceeds 1.5'}}
    """
    refused = {runtime: "; ".join(failed) for runtime, failed in refusals.items() if failed}
    if not refused:
        return []
    entry[VariantKey.RUNTIMES] = [runtime for runtime in entry[VariantKey.RUNTIMES] if runtime not in refused]
    entry[VariantKey.REFUSED] = refused
    if entry[VariantKey.RUNTIMES]:
        return []
    return [failure for runtime in refused for failure in refusals[runtime]]


def _record(gated: GatedVariants, entry, precision: str, where: str, report: ParityReport, thresholds) -> list[str]:
    """Log `report`'s figures for `precision` on `where` and keep its summary; its failed gates."""
    prefix = f"parity_{precision}_{where}_"
    metrics = report.metrics(prefix)
    gated.metrics.update({k: v for k, v in metrics.items() if "text" not in k and "token" not in k})
    summary = {key: metrics[prefix + key] for key in _SUMMARY if prefix + key in metrics}
    entry[VariantKey.PARITY][where] = summary
    return [] if thresholds is None else check_gates(replace(report, text=None), thresholds, prefix)


def _tag(entry: dict[str, Any], thresholds: ParityThresholds) -> str:
    """One line per precision for the registry, e.g. `openvino: max prob diff 1.8e-03, top-1 1.000
    (gates 1e-02, 0.9)`."""
    refused = entry.get(VariantKey.REFUSED, {})
    parts = [
        f"{where}: max prob diff {figures['max_abs_prob_diff']:.1e}, top-1 {figures['top1_agreement']:.3f}"
        + (" (refused)" if where in refused else "")
        for where, figures in entry[VariantKey.PARITY].items()
    ]
    return "; ".join(parts) + f" (gates {thresholds.max_prob_diff:.0e}, {thresholds.min_top1_agreement:g})"
