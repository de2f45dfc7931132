"""The peers' rows (`--rows peers`): the tools users compare us with, on the same JPEGs and the
same weights as row (a), each with its own preprocessing and tokenizer.

- `peer-open_clip`: open_clip's model built from its own config (`RN50-quickgelu`,
  `ViT-B-32-quickgelu`) with the same OpenAI-layout weights, its eval transform and tokenizer;
- `peer-hf-model`: Hugging Face's `CLIPModel` with the weights copied into its layout (ViTs:
  it has no ResNet tower), its default `CLIPProcessor` (transformers' torchvision backend) and a
  `CLIPTokenizer` built from CLIP's vocabulary;
- `peer-hf-pipeline`: `pipeline("zero-shot-image-classification")` on that folder.

The class text features are computed once at set-up where the tool allows it (open_clip,
CLIPModel), as a user who classifies many images would; the pipeline encodes its labels on
every call, which is how it works. Each row reports its time from process start to its first
prediction. Optional: a row whose library is not installed is "not runnable", with the fix.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.images import read_pool, request_images
from benchmarks.measure import InProcessRow
from benchmarks.rows import torch_engine, zero_shot_probabilities

PEER_ROWS = {
    "peer-open_clip": "peer: open_clip",
    "peer-hf-model": "peer: Hugging Face CLIPModel",
    "peer-hf-pipeline": "peer: Hugging Face pipeline",
}
# open_clip's config for each model the benchmark builds (QuickGELU: OpenAI-trained layout).
OPEN_CLIP_ARCHITECTURES = {"RN50": "RN50-quickgelu", "ViT-B/32": "ViT-B-32-quickgelu"}


class PeerUnavailable(RuntimeError):
    """A peer's library is not installed, or the peer has no such model: the row is not runnable."""


def _need(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"{module} is not installed: {install}") from e


def _template(spec: dict[str, Any]) -> str:
    from mlflow_clip.serving.prompts import resolve_templates

    (template,) = resolve_templates(spec["templates"])
    return template


def _prompts(spec: dict[str, Any]) -> list[str]:
    from mlflow_clip.serving.prompts import texts_for_class

    return [texts_for_class(name, [_template(spec)])[0] for name in spec["classes"]]


def task_peer_open_clip(spec: dict[str, Any]) -> InProcessRow:
    """open_clip's own pipeline on row (a)'s weights."""
    architecture = OPEN_CLIP_ARCHITECTURES.get(spec["model"])
    if architecture is None:
        raise PeerUnavailable(f"open_clip has no config for the {spec['model']} model")
    open_clip = _need("open_clip", "pip install open_clip_torch (or mlflow-clip[sources])")
    import torch
    from PIL import Image

    torch.set_num_threads(spec["threads"])
    model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=spec["clip_spec"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(architecture)
    with torch.inference_mode():
        text = model.encode_text(tokenizer(_prompts(spec)))
        text = text / text.norm(dim=-1, keepdim=True)
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [preprocess(Image.open(io.BytesIO(data))) for data in request_images(pool, spec["batch"], index)]
        with torch.inference_mode():
            return zero_shot_probabilities(model.encode_image(torch.stack(images)), text, model.logit_scale.exp())

    return InProcessRow(call, spec, {"engine": torch_engine()})


def _hf_folder(spec: dict[str, Any]) -> Path:
    folder = Path(spec["hf_folder"]) if spec.get("hf_folder") else None
    if folder is None or not folder.is_dir():
        raise PeerUnavailable(spec.get("hf_note") or "no Hugging Face folder for this model")
    return folder


def task_peer_hf_model(spec: dict[str, Any]) -> InProcessRow:
    """CLIPModel with its processor; the class text features computed once."""
    folder = _hf_folder(spec)
    transformers = _need("transformers", "pip install transformers (or mlflow-clip[sources])")
    import torch
    from PIL import Image

    torch.set_num_threads(spec["threads"])
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    with torch.inference_mode():
        tokens = processor(text=_prompts(spec), return_tensors="pt", padding=True)
        text = model.get_text_features(**tokens).pooler_output
        text = text / text.norm(dim=-1, keepdim=True)
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [Image.open(io.BytesIO(data)) for data in request_images(pool, spec["batch"], index)]
        with torch.inference_mode():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            features = model.get_image_features(pixel_values=pixels).pooler_output
            return zero_shot_probabilities(features, text, model.logit_scale.exp())

    return InProcessRow(call, spec, {"engine": torch_engine()})


def task_peer_hf_pipeline(spec: dict[str, Any]) -> InProcessRow:
    """`pipeline("zero-shot-image-classification")`, the labels given per call as it takes them."""
    folder = _hf_folder(spec)
    transformers = _need("transformers", "pip install transformers (or mlflow-clip[sources])")
    import torch
    from PIL import Image

    torch.set_num_threads(spec["threads"])
    classifier = transformers.pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    classes, template = list(spec["classes"]), _template(spec)
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [Image.open(io.BytesIO(data)) for data in request_images(pool, spec["batch"], index)]
        out = classifier(images, candidate_labels=classes, hypothesis_template=template)
        return np.array([[{r["label"]: r["score"] for r in rows}[name] for name in classes] for rows in out])

    return InProcessRow(call, spec, {"engine": torch_engine()})


def ensure_peers(options: Any, builds: dict, progress: Callable[[str], None]) -> dict:
    """{(model, "peers"): what `task_prepare_peers` wrote} for each model built in fp32."""
    from benchmarks.models import model_slug
    from benchmarks.worker import run_child

    peers = {}
    for model in options.models:
        fp32 = builds.get((model, "fp32"), {})
        if fp32.get("status") != "ok":
            continue
        folder = options.work_dir / "peers" / model_slug(model) / "hf"
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").is_file():
            progress(f"preparing the peers' rows for {model} (its weights in Hugging Face's layout, for a ViT)")
        spec = {"model": model, "clip_spec": fp32["clip_spec"], "folder": str(folder)}
        result = run_child("prepare_peers", spec, options.work_dir, f"peers-{model_slug(model)}", options.child_timeout)
        if result.get("status") != "ok":
            result = {
                "hf_folder": "",
                "hf_note": f"preparing the Hugging Face folder failed: {result.get('error', '')}",
            }
        peers[(model, "peers")] = result
    return peers


def task_prepare_peers(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the Hugging Face folder of a ViT model (row (a)'s weights in CLIPModel's layout),
    written once in the work dir; a note instead where there is none."""
    folder = Path(spec["folder"])
    try:
        _need("transformers", "pip install transformers (or mlflow-clip[sources])")
    except PeerUnavailable as e:
        return {"hf_folder": "", "hf_note": str(e)}
    if (folder / "config.json").is_file():
        return {"hf_folder": str(folder)}
    from mlflow_clip.export.checkpoints import load_clip
    from mlflow_clip.export.hf_source import save_openai_as_hf
    from mlflow_clip.export.sources import SourceError
    from mlflow_clip.package_data import default_vocab_path

    part = folder.with_suffix(".part")
    shutil.rmtree(part, ignore_errors=True)  # what a run killed while writing it left
    try:
        save_openai_as_hf(load_clip(spec["clip_spec"]).model, part, default_vocab_path())
    except SourceError as e:  # a ResNet tower
        return {"hf_folder": "", "hf_note": str(e)}
    part.rename(folder)
    return {"hf_folder": str(folder)}
