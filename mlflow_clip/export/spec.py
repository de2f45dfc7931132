"""What an export is asked to do, checked before anything is loaded: `ExportSpec`.

Torch-free, so a bad argument (an unknown precision, an opset below 12, a missing @file of
classes) is one line at once, not a traceback after the CLIP weights have loaded.

    >>> spec = ExportSpec.create("a red circle,a blue square", model="demo", precision="int8")
    >>> spec.thresholds.max_prob_diff, spec.run_params()["num_classes"]
    (0.1, 2)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.export.open_clip_configs import CLIP_TEXT
from mlflow_clip.export.options import (
    DEFAULT_OPSET,
    DEFAULT_REGISTERED_MODEL_NAME,
    EXPORT_OPTIONS,
    PRECISIONS,
    SpecError,
    check_option_names,
    option,
    with_export_options,
)
from mlflow_clip.export.preflight import check_openai_weights, check_runtime
from mlflow_clip.export.sources import OPENAI_SOURCE, ModelSource, check_source_opset, parse_model_source
from mlflow_clip.prompt_files import parse_classes, resolve_templates
from mlflow_clip.serving.contract import HEADS, SIGMOID_HEAD

MIN_OPSET = 12
# precision=auto, or a comma-separated list of these: one export gated at each, served at the
# fastest native where it lands (mlflow_clip.export.variants; fp16 is for GPUs and exports alone).
AUTO_PRECISION = "auto"
MULTI_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
# Execution providers written into the model for each precision; onnxruntime builds without
# CUDA fall back to the CPU provider with one warning (mlflow_clip.serving.runtime.log_providers); their
# requirements name onnxruntime-gpu (mlflow_clip.flavor.uses_gpu).
PRECISION_PROVIDERS: dict[str, tuple[str, ...]] = {
    "fp32": ("CPUExecutionProvider",),
    "fp16": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "int8": ("CPUExecutionProvider",),
    "bf16": ("CPUExecutionProvider",),
}
# The runtime written into the model for each precision: bf16 is the fp32 graph run by OpenVINO
# with INFERENCE_PRECISION_HINT=bf16 (mlflow_clip.serving.openvino_runtime).
PRECISION_RUNTIMES: dict[str, str] = {
    "fp32": "onnxruntime",
    "fp16": "onnxruntime",
    "int8": "onnxruntime",
    "bf16": "openvino",
}
# The decode each precision's model uses by default (`jpeg_draft` in its runtime settings). Rule:
# on where the draft's measured change is well inside the precision's own gate and the CPU runs
# it (int8, bf16, whose export also gates the draft path, `parity_draft_*`), for inputs of at
# least DRAFT_MIN_RESOLUTION, below which the draft is coarse; fp32 stays bit-exact with CLIP's
# preprocessing, and fp16 is for GPUs. The figures: docs/decisions/jpeg-draft-off.md.
PRECISION_JPEG_DRAFT: dict[str, bool] = {"fp32": False, "fp16": False, "int8": True, "bf16": True}
DRAFT_MIN_RESOLUTION = 224


def default_jpeg_draft(precision: str, input_resolution: int) -> bool:
    """Whether a model at `precision` and `input_resolution` decodes JPEGs in draft mode by default.

    >>> default_jpeg_draft("int8", 224), default_jpeg_draft("int8", 64), default_jpeg_draft("fp32", 336)
    (True, False, False)
    """
    return PRECISION_JPEG_DRAFT[precision] and input_resolution >= DRAFT_MIN_RESOLUTION


# Per-precision parity gates, against fp32 PyTorch. Rule: about 3x headroom over the worst
# figures measured on the sample images with each precision's chosen method, and a logit gate
# that refuses the method not chosen (docs/decisions/parity-thresholds.md has the figures).
# bf16's figures (the demo model, RN50 and ViT-B/32) are in docs/decisions/openvino.md.
BF16_MAX_PROB_DIFF = 1e-2
BF16_MAX_LOGIT_DIFF = 0.3
PRECISION_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {},
    "fp16": {"max_prob_diff": 1e-2, "max_logit_diff": 0.1, "min_top1_agreement": 0.9},
    "int8": {"max_prob_diff": 0.1, "max_logit_diff": 1.5, "min_top1_agreement": 0.9},
    "bf16": {"max_prob_diff": BF16_MAX_PROB_DIFF, "max_logit_diff": BF16_MAX_LOGIT_DIFF, "min_top1_agreement": 0.9},
}


@dataclass(frozen=True)
class ParityThresholds:
    max_prob_diff: float = 1e-4
    max_logit_diff: float = 1e-2
    min_top1_agreement: float = 1.0
    max_pixel_diff: float = 0.0
    # The text encoder always ships in fp32: per-request labels must match the baked ones.
    max_text_embedding_diff: float = 1e-5

    @classmethod
    def for_precision(cls, precision: str, **overrides: float | None) -> ParityThresholds:
        """The gates suited to a graph at `precision` (fp32, fp16, int8); any field passed in
        `overrides` (not None) replaces its default.

            >>> ParityThresholds.for_precision("int8", max_prob_diff=0.05).max_logit_diff
            1.5
        """
        check_precision(precision)
        values = {**PRECISION_THRESHOLDS[precision], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)


def parse_precisions(precision: str) -> tuple[str, ...]:
    """The precisions an export gates, the one its `model.onnx` is saved at first: one name,
    `auto` (fp32, int8, and bf16 where OpenVINO is installed and runs bf16 on this CPU, so that
    its gates measure bf16), or a list.

    >>> parse_precisions("int8"), parse_precisions("bf16, fp32")
    (('int8',), ('fp32', 'bf16'))
    """
    if precision.strip() == AUTO_PRECISION:
        from mlflow_clip.serving.openvino_runtime import openvino_runs_bf16

        return tuple(p for p in MULTI_PRECISIONS if p != "bf16" or openvino_runs_bf16())
    names = [name.strip() for name in precision.split(",") if name.strip()]
    if len(names) == 1:
        return (check_precision(names[0]),)
    bad = [name for name in names if name not in MULTI_PRECISIONS]
    if bad or not names or len(set(names)) != len(names):
        raise SpecError(
            f"Received precision={precision!r}; expected one of {', '.join(PRECISIONS)}, {AUTO_PRECISION}, or a list "
            f"of distinct {', '.join(MULTI_PRECISIONS)} such as fp32,bf16 (fp16 is for GPUs: export it on its own)."
        )
    return tuple(p for p in MULTI_PRECISIONS if p in names)


def check_precision(precision: str, error: type[MlflowClipError] = SpecError) -> str:
    if precision not in PRECISIONS:
        raise error(f"Received precision={precision!r}; expected one of {', '.join(PRECISIONS)}.")
    return precision


def check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise SpecError(
            f"Received opset={opset!r}; expected a whole number, {MIN_OPSET} or newer (default {DEFAULT_OPSET})."
        )
    return opset


def check_prompt_lengths(classes, templates, context_length: int = 77, truncate: bool = False, tokenizer=None) -> None:
    """Refuse a class whose prompts exceed CLIP's context (CLIP would cut them, changing what they
    mean) unless `truncate`; checked with the torch-free tokenizer (CLIP's, or the source's served
    `tokenizer`), before anything loads."""
    if truncate:
        return
    from mlflow_clip.package_data import default_vocab_path
    from mlflow_clip.serving.prompts import texts_for_class
    from mlflow_clip.serving.tokenizer import ClipTokenizer

    tokenizer = tokenizer or ClipTokenizer.from_file(default_vocab_path())
    for index, name in enumerate(classes):
        _, lengths = tokenizer.tokenize(texts_for_class(name, templates), context_length)
        too_long = [t for t, n in enumerate(lengths) if n > context_length]
        if too_long:
            raise SpecError(
                f"Class {index} gives a prompt longer than CLIP's context of {context_length} tokens with template "
                f"{too_long[0]} ({len(too_long)} of {len(templates)} templates); CLIP would cut it. Shorten the class "
                "name or the template, or pass truncate=true to keep CLIP's cut."
            )


def check_head(head: str | None, source: ModelSource) -> None:
    """softmax or sigmoid ("" or None: the source's own); sigmoid only where the source has a
    logit bias to go with it (checked again on the loaded model)."""
    if head and head not in HEADS:
        raise SpecError(f"Received head={head!r}; expected one of {', '.join(HEADS)} (default: the source's own).")
    if head == SIGMOID_HEAD and source.family == CLIP_TEXT:
        raise SpecError(
            f"Received head=sigmoid with model={source.model!r}, a CLIP model trained with a softmax over its "
            "classes (no logit bias): its sigmoid scores would mean nothing. Leave head out (softmax)."
        )


@dataclass(frozen=True)
class ExportSpec:
    """The export's choices, checked: classes parsed, templates resolved, gates chosen. Build it
    with `create`; the defaults are the options' own (`mlflow_clip.export.options`)."""

    classes: tuple[str, ...]
    model: str = option("model").default
    templates: str | tuple[str, ...] = option("templates").default
    template_texts: tuple[str, ...] = field(default=(), compare=False)
    registered_model_name: str | None = DEFAULT_REGISTERED_MODEL_NAME
    opset: int = DEFAULT_OPSET
    images: str | None = None
    thresholds: ParityThresholds = ParityThresholds()
    alias: str | None = None
    text_encoder: bool = option("text_encoder").default
    precision: str = option("precision").default
    truncate: bool = option("truncate").default
    # open_clip:<architecture> only: the local weights file (mlflow_clip.export.sources).
    checkpoint: str = ""
    # open_clip models with a Hugging Face tokenizer: the local tokenizer folder.
    tokenizer: str = ""
    # softmax or sigmoid; "" the source's own (sigmoid for SigLIP).
    head: str = ""

    @classmethod
    @with_export_options("cls", "classes", after=("thresholds",))
    def create(
        cls, classes: str | Sequence[str], *, thresholds: ParityThresholds | None = None, **options: Any
    ) -> ExportSpec:
        """Check every argument (`mlflow_clip.export.options` lists them; typed, or as the command
        line's text) before anything loads; raises an `MlflowClipError` naming the first bad one."""
        check_option_names(options)
        given = {o.name: o.parse(options.get(o.name, o.default)) for o in EXPORT_OPTIONS if not o.required}
        precisions = parse_precisions(given["precision"])
        precision = ",".join(precisions) if len(precisions) > 1 else precisions[0]
        source = parse_model_source(given["model"], given["checkpoint"], given["tokenizer"])
        opset = check_opset(given["opset"])
        check_source_opset(source, opset)
        check_head(given["head"], source)
        names = tuple(parse_classes(classes))
        templates = given["templates"]
        texts = tuple(resolve_templates(templates))
        if source.family == CLIP_TEXT:  # CLIP's tokenizer, known before loading; others once loaded
            check_prompt_lengths(names, texts, truncate=given["truncate"])
        images = given["images"]
        if images and not Path(images).is_dir():
            raise SpecError(
                f"Received images={str(images)!r}; expected a folder of images (looked in {Path(images).resolve()})."
            )
        model = check_openai_weights(given["model"]) if source.kind == OPENAI_SOURCE else given["model"]
        for name in precisions:
            check_runtime(name)
        return cls(
            classes=names,
            model=model,
            templates=templates if isinstance(templates, str) else tuple(templates),
            template_texts=texts,
            registered_model_name=given["registered_model_name"] or None,
            opset=opset,
            images=str(images) if images else None,
            thresholds=thresholds
            or ParityThresholds.for_precision(precisions[0], max_prob_diff=given["max_prob_diff"]),
            alias=given["alias"] or None,
            text_encoder=given["text_encoder"],
            precision=precision,
            truncate=given["truncate"],
            checkpoint=source.checkpoint,
            tokenizer=source.tokenizer_folder,
            head=given["head"] or "",
        )

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision this export gates; the first is its `model.onnx`'s (`parse_precisions`)."""
        return parse_precisions(self.precision)

    def run_params(self) -> dict[str, Any]:
        """The MLflow run parameters that record this export."""
        t = self.thresholds
        return {
            "classes": ",".join(self.classes),
            "class_names": json.dumps(list(self.classes), ensure_ascii=False),
            "num_classes": len(self.classes),
            "model": self.model,
            "templates": self.templates if isinstance(self.templates, str) else "custom",
            "registered_model_name": self.registered_model_name or "",
            "opset": self.opset,
            "images": self.images or "",
            "max_prob_diff": t.max_prob_diff,
            "max_logit_diff": t.max_logit_diff,
            "min_top1_agreement": t.min_top1_agreement,
            "max_pixel_diff": t.max_pixel_diff,
            "alias": self.alias or "",
            "text_encoder": self.text_encoder,
            "max_text_embedding_diff": t.max_text_embedding_diff,
            "precision": self.precision,
            "truncate": self.truncate,
            "source": parse_model_source(self.model, self.checkpoint, self.tokenizer).kind,
            "checkpoint": self.checkpoint,
            "tokenizer_folder": self.tokenizer,
            "head": self.head or "source's own",
        }
