"""The export job behind `mlflow run .` and `mlflow-clip export`: build, check, log, register.

>>> result = export_and_register(classes="a red circle,a blue square", model="demo")  # doctest: +SKIP
>>> result.model_version  # doctest: +SKIP
'1'
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from mlflow_clip import flavor
from mlflow_clip.export.checkpoints import LoadedClip
from mlflow_clip.export.compat import import_clip
from mlflow_clip.export.graph import (
    ZeroShotHead,
    apply_conventions,
    check_dynamic_batch,
    encode_text_features,
    export_onnx,
    simplify_onnx,
    write_edge_file,
)
from mlflow_clip.export.loaders import load_source
from mlflow_clip.export.options import with_export_options
from mlflow_clip.export.parity import (
    ParityError,
    ParityReport,
    ParityThresholds,
    check_gates,
    load_sample_images,
    measure_parity,
    measure_text_parity,
    plot_parity,
)
from mlflow_clip.export.precision import PrecisionInfo, apply_precision, fp16_emulation
from mlflow_clip.export.spec import ExportSpec, default_jpeg_draft
from mlflow_clip.export.tags import version_tags, weights_source
from mlflow_clip.export.text_encoder import (
    check_source_prompt_lengths,
    choose_head,
    export_source_text_encoder,
    served_vocab_path,
)
from mlflow_clip.export.variants import GatedVariants, gate_variants
from mlflow_clip.registry import card
from mlflow_clip.serving.contract import (
    EMBEDDING_OUTPUT,
    ONNX_FILE_NAME,
    TEXT_ENCODER_FILE_NAME,
    ClassifierConfig,
    sha256_file,
)
from mlflow_clip.serving.preprocess import Preprocessor
from mlflow_clip.serving.prompts import describe_templates
from mlflow_clip.serving.runtime import RuntimeSettings
from mlflow_clip.serving.variants import cpu_flags, int8_kernels
from mlflow_clip.tracking import active_or_new_run, log_new_params

_logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"
EDGE_ARTIFACT_DIR = "onnx"
EDGE_FILE_NAME = "classifier.onnx"


@dataclass
class BuiltClassifier:
    """The export's files: `onnx_path` is the served graph (scores, then the image embedding),
    `edge_path` the same graph with the scores alone (the edge-platform file), and
    `text_encoder_path` CLIP's text encoder (None when left out)."""

    onnx_path: Path
    config: ClassifierConfig
    head: ZeroShotHead
    loaded: LoadedClip
    export_seconds: float
    simplified: bool
    simplify_note: str
    edge_path: Path | None = None
    text_encoder_path: Path | None = None
    precision: PrecisionInfo = field(default_factory=lambda: PrecisionInfo("fp32", ""))
    # What parity compares against: `head`, or the source's own model when `head` is built from a
    # conversion of it (Hugging Face folders).
    reference_head: ZeroShotHead | None = None
    # fp16 only: the GPU-like emulation whose parity is also gated (precision.fp16_emulation).
    fp16_emulation_path: Path | None = None

    def runtime_settings(self) -> RuntimeSettings:
        """The runtime settings the model is saved with: its precision's runtime and providers,
        and its default decode (`spec.default_jpeg_draft`)."""
        return RuntimeSettings(
            runtime=self.precision.runtime,
            providers=self.precision.providers,
            jpeg_draft=default_jpeg_draft(self.config.precision, self.config.input_resolution),
        )


@dataclass
class ExportResult:
    run_id: str
    model_uri: str
    registered_model_name: str | None
    model_version: str | None
    onnx_sha256: str
    parity: ParityReport
    metrics: dict[str, float] = field(default_factory=dict)


def _step(message: str) -> None:
    """One progress line, printed once (and logged at DEBUG, for `-v` and log files)."""
    print(f"[mlflow-clip] {message}", flush=True)
    _logger.debug(message)


@with_export_options("classes", after=("out_dir",))
def build_classifier(classes: str | Sequence[str], *, out_dir: str | Path | None = None, **options) -> BuiltClassifier:
    """Load CLIP, bake the class text features, export, simplify, convert to `precision`
    (fp32, fp16, int8 or bf16; int8 calibrates on `images`, default the package's samples) and apply
    the conventions; with `text_encoder`, also export CLIP's text encoder for per-request labels.
    Takes the export's options (`mlflow_clip.export.options`), checked as `ExportSpec.create`
    checks them; registering options are ignored here. Writes into `out_dir` (default: a new
    temporary folder)."""
    return build_from_spec(ExportSpec.create(classes, **options), out_dir)


def build_from_spec(spec: ExportSpec, out_dir: str | Path | None = None) -> BuiltClassifier:
    """`build_classifier` for a checked `ExportSpec`."""
    classes, model, templates, opset = list(spec.classes), spec.model, spec.templates, spec.opset
    template_texts, images, precision = list(spec.template_texts), spec.images, spec.precisions[0]
    started = time.perf_counter()
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="mlflow-clip-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    _step(f"loading CLIP {model}")
    loaded = load_source(model, spec.checkpoint or None, spec.tokenizer or None, work_dir=out_dir / "tokenizer")
    head = choose_head(spec.head or None, loaded)
    if not spec.truncate and loaded.tokenizer_files:
        check_source_prompt_lengths(loaded, classes, template_texts)
    _step(f"encoding {len(classes)} classes x {len(template_texts)} templates")
    text_features = encode_text_features(loaded.model, classes, template_texts, loaded.tokenize)
    logit_scale = float(loaded.model.logit_scale.detach().exp())
    zero_shot = ZeroShotHead(loaded.model.visual, text_features, logit_scale, loaded.logit_bias, head).eval()
    onnx_path = out_dir / ONNX_FILE_NAME
    _step(f"exporting to ONNX (opset {opset})")
    export_onnx(zero_shot, onnx_path, loaded.input_resolution, opset, embedding=True)
    _step("simplifying with onnxsim")
    simplified, note = simplify_onnx(onnx_path)
    if not simplified:
        _logger.warning("Keeping the unsimplified graph: %s", note)
    precision_info, emulation_path = _convert_precision(onnx_path, precision, loaded, images)
    config = _config_for(loaded, classes, templates, template_texts, zero_shot, opset)
    config = replace(config, precision=precision, precision_method=precision_info.method)
    if precision == "int8":  # the kernels its gate runs on, in this process (serving.variants)
        config = replace(config, int8_kernels=int8_kernels(cpu_flags()))
    config = apply_conventions(onnx_path, config)
    check_dynamic_batch(onnx_path, loaded.input_resolution, head=config.head)
    edge_path = write_edge_file(onnx_path, out_dir / EDGE_FILE_NAME)
    text_path = (
        export_source_text_encoder(loaded, out_dir / TEXT_ENCODER_FILE_NAME, opset) if spec.text_encoder else None
    )
    return BuiltClassifier(
        onnx_path=onnx_path,
        config=config,
        head=zero_shot,
        loaded=loaded,
        export_seconds=time.perf_counter() - started,
        simplified=simplified,
        simplify_note=note,
        edge_path=edge_path,
        text_encoder_path=text_path,
        precision=precision_info,
        reference_head=_reference_head(loaded, classes, template_texts, zero_shot),
        fp16_emulation_path=emulation_path,
    )


def _reference_head(loaded: LoadedClip, classes, template_texts, head: ZeroShotHead) -> ZeroShotHead | None:
    """The source's own model as a head (its own text features), when the export converted it."""
    if loaded.reference is None:
        return None
    reference = loaded.reference_model
    features = encode_text_features(reference, classes, template_texts, loaded.tokenize)
    bias = None if head.logit_bias is None else float(head.logit_bias)
    return ZeroShotHead(reference.visual, features, float(head.logit_scale), bias, head.head).eval()


def _convert_precision(
    onnx_path: Path, precision: str, loaded: LoadedClip, images
) -> tuple[PrecisionInfo, Path | None]:
    """Convert the simplified fp32 graph in place; for fp16 also write its GPU-like emulation."""
    if precision in ("fp32", "bf16"):  # bf16: the fp32 graph, run by OpenVINO at bf16
        return apply_precision(onnx_path, precision), None
    _step(f"converting the graph to {precision}")
    fp32_path = onnx_path.with_name("fp32-" + onnx_path.name)
    shutil.copyfile(onnx_path, fp32_path)
    calibration = None
    if precision == "int8":
        preprocessor = Preprocessor(
            loaded.input_resolution, loaded.mean, loaded.std, loaded.interpolation, loaded.resize_mode
        )
        calibration = preprocessor.batch([image for _, image in load_sample_images(images)])
    info = apply_precision(fp32_path, precision, calibration, out_path=onnx_path)
    emulation_path = None
    if precision == "fp16":
        emulation_path = fp16_emulation(fp32_path, onnx_path, onnx_path.with_name("fp16-emulated-" + onnx_path.name))
    fp32_path.unlink()
    _step(f"{precision}: {info.method}" + (f" ({info.choices})" if info.choices else ""))
    return info, emulation_path


def _config_for(loaded, classes, templates, template_texts, head: ZeroShotHead, opset) -> ClassifierConfig:
    clip = import_clip()
    import onnx

    return ClassifierConfig(
        classes=list(classes),
        clip_model=loaded.name,
        embedding_output=EMBEDDING_OUTPUT,
        embedding_dim=int(head.text_features.shape[0]),
        context_length=int(loaded.context_length or loaded.model.context_length),
        input_resolution=loaded.input_resolution,
        mean=list(loaded.mean),
        std=list(loaded.std),
        interpolation=loaded.interpolation,
        resize_mode=loaded.resize_mode,
        tokenizer=loaded.details.get("tokenizer", "clip"),
        text_clean=loaded.text_clean,
        text_pooling=loaded.text_pooling,
        head=head.head,
        logit_bias=0.0 if head.logit_bias is None else float(head.logit_bias),
        logit_scale=float(head.logit_scale),
        templates=describe_templates(templates),
        template_texts=list(template_texts),
        opset=opset,
        torch_version=torch.__version__,
        clip_version=_source_version(loaded.details.get("source"))
        or _package_version("openai-clip")
        or getattr(clip, "__version__", ""),
        onnx_version=onnx.__version__,
    )


def _source_version(source: str | None) -> str:
    """The package that built a non-OpenAI source's model, with its version."""
    package = {"open_clip": "open_clip_torch", "hf": "transformers"}.get(source or "")
    return f"{package} {_package_version(package)}" if package else ""


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def check_parity(
    built: BuiltClassifier, images: str | Path | None, thresholds: ParityThresholds
) -> tuple[ParityReport, list[str]]:
    _step("measuring parity against PyTorch")
    samples = load_sample_images(images)
    preprocessor = Preprocessor.from_config(built.config)
    reference = built.reference_head or built.head
    precision, runtime = built.config.precision, built.precision.runtime
    report = measure_parity(
        reference, built.onnx_path, samples, built.loaded.preprocess, preprocessor, precision=precision, runtime=runtime
    )
    if built.text_encoder_path is not None:
        from mlflow_clip.serving.prompts import texts_for_class

        texts = [text for name in built.config.classes for text in texts_for_class(name, built.config.template_texts)]
        report.text = measure_text_parity(
            built.loaded.reference_model,
            built.text_encoder_path,
            texts,
            served_vocab_path(built.loaded, built.config.tokenizer),
            built.loaded.tokenize,
            built.config.tokenizer,
            built.config,
        )
    failures = check_gates(report, thresholds)
    if runtime == "openvino" and precision != "bf16":  # onnxruntime serves it where OpenVINO is absent
        prefix = "parity_onnxruntime_"
        fallback = measure_parity(reference, built.onnx_path, samples, built.loaded.preprocess, preprocessor)
        report.extra_metrics.update(fallback.metrics(prefix))
        failures += check_gates(fallback, thresholds, prefix)
    if built.runtime_settings().jpeg_draft:  # the default decode of this precision's model
        prefix = "parity_draft_"
        draft = load_sample_images(images, draft_size=built.config.input_resolution)
        drafted = measure_parity(
            reference, built.onnx_path, samples, built.loaded.preprocess, preprocessor, precision=precision,
            runtime=runtime, served=draft,
        )  # fmt: skip
        report.extra_metrics.update(drafted.metrics(prefix))
        failures += check_gates(drafted, replace(thresholds, max_pixel_diff=math.inf), prefix)
    if built.fp16_emulation_path is not None:
        prefix = "parity_fp16_emulated_"
        emulated = measure_parity(reference, built.fp16_emulation_path, samples, built.loaded.preprocess, preprocessor)
        report.extra_metrics.update(emulated.metrics(prefix))
        failures += check_gates(emulated, thresholds, prefix)
    return report, failures


@with_export_options("classes", after=("thresholds",))
def export_and_register(
    classes: str | Sequence[str], *, thresholds: ParityThresholds | None = None, **options
) -> ExportResult:
    """The whole job in one MLflow run: export, parity gates, log, register, tag, alias.

    Takes the export's options (`mlflow_clip.export.options`, docs/export.md): `precision` is
    fp32, fp16 (for GPU providers), int8 (for CPUs) or bf16 (OpenVINO on CPUs with bf16
    instructions; needs `pip install "mlflow-clip[openvino]"`); the parity gates default to
    `ParityThresholds.for_precision(precision)`, `max_prob_diff` overriding its gate, `thresholds`
    replacing them all. If a parity gate fails the run fails with the gate's figures and nothing
    is registered. A class whose prompts exceed CLIP's context is refused unless `truncate`.
    Every argument is checked (`ExportSpec.create`) before anything is loaded; `model` may also be
    `open_clip:<architecture>` with `checkpoint` a local weights file (and, for SigLIP and the
    multilingual towers, `tokenizer` a local tokenizer folder), or `hf:<folder>` (docs/sources.md);
    `head` is softmax or sigmoid (default: the source's own).
    """
    return run_export(ExportSpec.create(classes, thresholds=thresholds, **options))


def run_export(spec: ExportSpec) -> ExportResult:
    """`export_and_register` for a checked `ExportSpec`, in the active MLflow run or a new one."""
    with active_or_new_run() as run:
        log_new_params(run.info.run_id, spec.run_params())
        with tempfile.TemporaryDirectory(prefix="mlflow-clip-") as tmp:
            built = build_from_spec(spec, tmp)
            log_new_params(run.info.run_id, {**built.precision.params(), **built.loaded.details})
            report, failures = check_parity(built, spec.images, spec.thresholds)
            metrics = _export_metrics(built, report)
            variants = gate_variants(built, spec.precisions, report, spec.images) if len(spec.precisions) > 1 else None
            if variants is not None:  # gated at several precisions, served at the fastest native one
                metrics.update(variants.metrics)
                failures += variants.failures
            mlflow.log_metrics(metrics)
            _log_reports(Path(tmp), built, report, failures)
            if failures:
                mlflow.set_tag("parity_status", "failed")
                raise ParityError("Parity gate failed, nothing was registered: " + "; ".join(failures) + ".")
            mlflow.set_tag("parity_status", "passed")
            mlflow.log_artifact(str(built.edge_path), EDGE_ARTIFACT_DIR)
            return _log_and_register(run.info.run_id, built, report, metrics, spec, variants)


def _export_metrics(built: BuiltClassifier, report: ParityReport) -> dict[str, float]:
    return {
        **report.metrics(),
        "export_seconds": built.export_seconds,
        "onnx_size_mb": built.onnx_path.stat().st_size / 1e6,
        **({"text_encoder_size_mb": built.text_encoder_path.stat().st_size / 1e6} if built.text_encoder_path else {}),
        "simplified": float(built.simplified),
    }


def _log_reports(tmp: Path, built: BuiltClassifier, report: ParityReport, failures: list[str]) -> None:
    (tmp / "classes.json").write_text(json.dumps(built.config.classes, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "parity_report.json").write_text(
        json.dumps(
            {
                "failures": failures,
                "simplify": built.simplify_note,
                "precision": built.precision.params(),
                **json.loads(report.to_json()),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    plot_parity(report, tmp / "parity.png", built.config.classes)
    for name in ("classes.json", "parity_report.json", "parity.png"):
        mlflow.log_artifact(str(tmp / name))


def _log_and_register(run_id, built, report, metrics, spec: ExportSpec, variants: GatedVariants | None) -> ExportResult:
    registered_model_name, alias = spec.registered_model_name, spec.alias
    _step("logging the model" + (f" and registering it as {registered_model_name!r}" if registered_model_name else ""))
    example = pd.DataFrame({"image": [_example_image_bytes()]})
    sha = sha256_file(built.onnx_path)
    info = flavor.log_model(
        built.onnx_path,
        name=MODEL_ARTIFACT_NAME,
        registered_model_name=registered_model_name or None,
        input_example=example,
        metadata={"parity": report.metrics(), "onnx_sha256": sha},
        text_encoder=built.text_encoder_path,
        tokenizer_files=list(built.loaded.tokenizer_files) or None,
        runtime=variants.runtime_settings(built.runtime_settings()) if variants else built.runtime_settings(),
        extra_files=variants.files if variants else None,
        precisions=variants.table if variants else None,
        # The tags travel with the registration itself, so no version exists without them.
        tags={
            **version_tags(built.config, built.text_encoder_path is not None, built.loaded.details),
            **(variants.tags if variants else {}),
        },
    )
    version = None
    line = card.summary(built.config.to_dict(), metrics, asdict(spec.thresholds))
    if not registered_model_name:
        _describe_run(run_id, f"{line}.\n\nLogged as `{info.model_uri}` (not registered).")
    else:
        version = str(info.registered_model_version)
        _write_card(registered_model_name, version, built, metrics, spec, run_id)
        _describe_run(run_id, card.run_description(registered_model_name, version, line))
        if alias:
            MlflowClient().set_registered_model_alias(registered_model_name, alias, version)
        _step(f"registered {registered_model_name} version {version}" + (f" with alias @{alias}" if alias else ""))
    return ExportResult(run_id, info.model_uri, registered_model_name, version, sha, report, metrics)


def _write_card(name: str, version: str, built: BuiltClassifier, metrics: dict, spec: ExportSpec, run_id: str) -> None:
    """The version's model card (and the registered model's, when it has none)."""
    sizes = {"model.onnx": metrics["onnx_size_mb"]}
    if "text_encoder_size_mb" in metrics:
        sizes["text_encoder.onnx"] = metrics["text_encoder_size_mb"]
    text = card.version_card(
        name,
        version,
        built.config.to_dict(),
        metrics,
        asdict(spec.thresholds),
        sizes,
        run_id,
        weights_source(spec.model, built.loaded.details),
    )
    card.describe_new_version(MlflowClient(), name, version, text)


def _describe_run(run_id: str, text: str) -> None:
    """The run's description in the MLflow UI, unless it has one already (a user's own)."""
    client = MlflowClient()
    if card.RUN_DESCRIPTION_TAG not in client.get_run(run_id).data.tags:
        client.set_tag(run_id, card.RUN_DESCRIPTION_TAG, text)


def _example_image_bytes() -> bytes:
    from mlflow_clip.package_data import sample_image_paths

    smallest = min(sample_image_paths(), key=lambda p: p.stat().st_size)
    return smallest.read_bytes()
