"""The classifier's contract: what export writes and serving reads back, never recomputes.

The exporter writes these fields as `metadata_props` of the ONNX file; `save_model` copies
them into the MLmodel flavor configuration and a JSON sidecar next to the graph.

    >>> config = ClassifierConfig.from_onnx("model.onnx")  # doctest: +SKIP
    >>> config.classes  # doctest: +SKIP
    ['a red circle', 'a blue square']
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE_NAME = "clip_classifier.json"
EDGE_INPUT_NAME = "image-"
# Keys of ONNX metadata_props whose values are JSON.
_JSON_KEYS = (
    "classes", "template_texts", "mean", "std", "input_resolution", "logit_scale", "opset",
    "embedding_dim", "context_length",
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
    # (ResNet towers) or "int8-dynamic" (ViT towers); see mlflow_clip/export/precision.py.
    precision_method: str = ""
    # Image embeddings: the served graph's second output (the edge file has only the scores).
    embedding_output: str = ""
    embedding_dim: int = 0
    # Per-request labels: CLIP's text encoder and tokenizer, shipped in the model directory.
    context_length: int = 77
    interpolation: str = "bicubic"
    resize_mode: str = "shortest_side_then_center_crop"
    torch_version: str = ""
    clip_version: str = ""
    onnx_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassifierConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_metadata_props(self) -> dict[str, str]:
        """String key/values for ONNX `metadata_props` (JSON where the value is not text)."""
        props = {}
        for key, value in self.to_dict().items():
            props[key] = json.dumps(value) if key in _JSON_KEYS else str(value)
        return props

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str]) -> "ClassifierConfig":
        data: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in props:
                continue
            raw = props[f.name]
            data[f.name] = json.loads(raw) if f.name in _JSON_KEYS else raw
        missing = [k for k in ("classes", "clip_model", "input_resolution", "mean", "std") if k not in data]
        if missing:
            raise ValueError(
                f"The ONNX file lacks the metadata {missing} that mlflow-clip's exporter writes; "
                "export it with `mlflow-clip export` (or `mlflow run .`)."
            )
        return cls.from_dict(data)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path) -> "ClassifierConfig":
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        return cls.from_metadata_props({p.key: p.value for p in model.metadata_props})

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> "ClassifierConfig":
        path = Path(directory) / CONFIG_FILE_NAME
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def edge_output_name(classes: list[str]) -> str:
    """The edge platforms' output-name convention: `scores-0:classA;1:classB`."""
    return "scores-" + ";".join(f"{i}:{name}" for i, name in enumerate(classes))


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
