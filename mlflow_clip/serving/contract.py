"""The model directory's contract: file names, MLmodel keys, graph names and the classifier config.

Everything here is written by the exporter and `save_model`, and read back by serving, never
recomputed. One name per thing: the file names, the flavor's MLmodel keys (`FlavorKey`), the
graphs' input and output names, and the hash every check uses (`sha256_file`).

    >>> config = ClassifierConfig.from_onnx("model.onnx")  # doctest: +SKIP
    >>> config.classes  # doctest: +SKIP
    ['a red circle', 'a blue square']
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelConfigError

FLAVOR_NAME = "mlflow_clip"

# Files of the model directory.
ONNX_FILE_NAME = "model.onnx"
TEXT_ENCODER_FILE_NAME = "text_encoder.onnx"
CONFIG_FILE_NAME = "clip_classifier.json"
VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_LICENSE_FILE_NAME = "CLIP_LICENSE"
REFERENCE_FILE_NAME = "reference_predictions.json"
CODE_DIR_NAME = "code"
MLMODEL_FILE_NAME = "MLmodel"

# The zero-shot heads: softmax over the classes (CLIP's, one label per image), or a sigmoid per
# class (SigLIP's, each class judged on its own), both over logit_scale * cosine + logit_bias.
SOFTMAX_HEAD = "softmax"
SIGMOID_HEAD = "sigmoid"
HEADS = (SOFTMAX_HEAD, SIGMOID_HEAD)

# Names inside the graphs.
EDGE_INPUT_NAME = "image-"
EMBEDDING_OUTPUT = "embedding"
TEXT_INPUT = "tokens"
TEXT_OUTPUT = "text_embedding"

# Tags of a registered model version, written at export.
ONNX_SHA256_TAG = "onnx_sha256"
MANIFEST_SHA256_TAG = "manifest_sha256"


class FlavorKey:
    """The keys of the `mlflow_clip` flavor configuration in MLmodel."""

    ONNX_MODEL = "onnx_model"
    ONNX_SHA256 = "onnx_sha256"
    CONFIG = "config"
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_SHA256 = "text_encoder_sha256"
    TOKENIZER_VOCAB = "tokenizer_vocab"
    TOKENIZER_VOCAB_SHA256 = "tokenizer_vocab_sha256"
    REFERENCE = "reference_predictions"
    RUNTIME = "runtime"
    LIMITS = "limits"
    PROVIDERS = "providers"
    CODE = "code"
    SERVING_PACKAGE = "serving_package"
    MANIFEST = "manifest"
    VERSION = "mlflow_clip_version"
    CLASSES = "classes"
    PRECISION = "precision"
    # A model gated at several precisions: each one's graph, runtimes and parity (`variants.py`).
    PRECISIONS = "precisions"
    CLIP_MODEL = "clip_model"
    HEAD = "head"
    TOKENIZER = "tokenizer"


# Keys of ONNX metadata_props whose values are JSON.
_JSON_KEYS = (
    "classes",
    "template_texts",
    "mean",
    "std",
    "input_resolution",
    "logit_scale",
    "logit_bias",
    "opset",
    "embedding_dim",
    "context_length",
)


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything serving needs to turn images into class probabilities."""

    classes: list[str]
    clip_model: str
    input_resolution: int
    mean: list[float]
    std: list[float]
    logit_scale: float
    templates: str = "none"
    template_texts: list[str] = field(default_factory=lambda: ["{}"])
    input_name: str = EDGE_INPUT_NAME
    output_name: str = ""
    opset: int = 17
    precision: str = "fp32"
    # How the graph got its precision: "" (fp32 as exported), "float16", "int8-static-qdq"
    # (ResNet towers) or "int8-dynamic" (ViT towers); docs/decisions/int8-method.md.
    precision_method: str = ""
    # An int8 graph: the family of int8 kernels of the CPU its parity gate ran on (vnni, avx512bw,
    # avx2 or sse, `serving.variants.int8_kernels`); "" for other precisions and older models.
    int8_kernels: str = ""
    # Image embeddings: the served graph's second output (the edge file has only the scores).
    embedding_output: str = ""
    embedding_dim: int = 0
    # Per-request labels: CLIP's text encoder and tokenizer, shipped in the model directory.
    context_length: int = 77
    # Whose tokenizer the ids follow (mlflow_clip.serving.tokenizer.SPECIAL_TOKEN_SPELLINGS): clip
    # (OpenAI's), open_clip (CLIP's, special tokens spelled <end_of_text>) or hf (Hugging Face's
    # CLIPTokenizer: its own cleaning, padded with the end token); or, for other tokenizers, the
    # library that serves the tokenizer file the model carries: tokenizers (tokenizer.json) or
    # sentencepiece (a SentencePiece model), mlflow_clip.serving.text_tokenizers.
    tokenizer: str = "clip"
    # The cleaning applied to a text before those tokenizers: "" (none), or open_clip's
    # whitespace, lower or canonicalize (text_tokenizers.CLEANERS).
    text_clean: str = ""
    # How the text tower reads its output, which decides how serving may shorten the ids: argmax
    # (CLIP's causal tower, read at the end token: trimmed after it), masked (padding masked out:
    # trimmed after the last token that is not padding) or full (every position counts: the whole
    # context is always run, as SigLIP's towers need).
    text_pooling: str = "argmax"
    # softmax or sigmoid (HEADS) over logit_scale * cosine + logit_bias; the bias is SigLIP's
    # (0 for CLIP, and a constant shift that softmax ignores).
    head: str = SOFTMAX_HEAD
    logit_bias: float = 0.0
    interpolation: str = "bicubic"
    # shortest_side_then_center_crop (torchvision's crop offset, rounded half to even) or
    # shortest_side_then_floor_center_crop (Hugging Face's, floored), or squash (SigLIP's: both
    # sides resized, nothing cropped): serving.preprocess.RESIZE_MODES.
    resize_mode: str = "shortest_side_then_center_crop"
    torch_version: str = ""
    clip_version: str = ""
    onnx_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_metadata_props(self) -> dict[str, str]:
        """String key/values for ONNX `metadata_props` (JSON where the value is not text)."""
        return {key: json.dumps(value) if key in _JSON_KEYS else str(value) for key, value in self.to_dict().items()}

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str]) -> ClassifierConfig:
        data: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in props:
                raw = props[f.name]
                data[f.name] = json.loads(raw) if f.name in _JSON_KEYS else raw
        missing = [k for k in ("classes", "clip_model", "input_resolution", "mean", "std") if k not in data]
        if missing:
            raise ModelConfigError(
                f"The ONNX file lacks the metadata {missing} that mlflow-clip's exporter writes; "
                "export it with `mlflow-clip export` (or `mlflow run .`)."
            )
        return cls.from_dict(data)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path) -> ClassifierConfig:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        return cls.from_metadata_props({p.key: p.value for p in model.metadata_props})

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> ClassifierConfig:
        path = Path(directory) / CONFIG_FILE_NAME
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def edge_output_name(classes: list[str]) -> str:
    """The edge platforms' output-name convention: `scores-0:classA;1:classB`."""
    return "scores-" + ";".join(f"{i}:{name}" for i, name in enumerate(classes))


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file (memory-mapped: hashlib then reads it without copies, and
    releases the GIL, so several files hash in parallel threads)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
