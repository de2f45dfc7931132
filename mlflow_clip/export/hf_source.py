"""Hugging Face `CLIPModel` folders, converted to OpenAI's CLIP layout for the export.

Export world (torch, transformers). The folder's weights are copied into `clip.model.CLIP` (the
layout every export path already follows: the baked head, the text encoder, the precisions),
exactly: q/k/v projections concatenated, transposed projections, same activation. Parity then
compares the export with the folder's own model, not with the conversion: `CLIPModel`'s
`get_image_features` / `get_text_features`, fed by its `CLIPImageProcessorPil` (the processor
whose pixels the torch-free preprocessing reproduces bit for bit, with its floor-rounded crop) and
its `CLIPTokenizer`.

    >>> loaded = load_hf(parse_model_source("hf:/models/clip-vit-base-patch32"))  # doctest: +SKIP
    >>> loaded.details["tokenizer"], loaded.resize_mode  # doctest: +SKIP
    ('hf', 'shortest_side_then_floor_center_crop')
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_clip.export.checkpoints import TRAINED_LOGIT_SCALE, CheckpointError, LoadedClip
from mlflow_clip.export.compat import import_clip
from mlflow_clip.export.hf_folder import image_settings
from mlflow_clip.export.sources import ModelSource, SourceError, import_source_library
from mlflow_clip.serving.preprocess import FLOOR_CENTER_CROP
from mlflow_clip.serving.tokenizer import HF_TOKENIZER, ClipTokenizer

_logger = logging.getLogger(__name__)


def import_transformers():
    return import_source_library("transformers", "Hugging Face folders")


def load_hf_folder(folder: Path, family: str, tokenizer_class: str) -> tuple[Any, Any, Any]:
    """The folder's `<family>Model` in float32 (eval mode), its Pillow image processor and its
    tokenizer (`tokenizer_class` from transformers), from local files only; a folder that does
    not load is a `CheckpointError` naming the files `save_pretrained` writes."""
    transformers = import_transformers()
    _logger.info("Loading Hugging Face %sModel from %s", family, folder)
    try:
        hf_model = getattr(transformers, f"{family}Model").from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
        processor = getattr(transformers, f"{family}ImageProcessorPil").from_pretrained(folder, local_files_only=True)
        tokenizer = getattr(transformers, tokenizer_class).from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Could not load the Hugging Face {family}Model in {folder}: {type(e).__name__}: {e}. Expected the files "
            f"{family}Model.save_pretrained and {family}Processor.save_pretrained write."
        ) from e
    return hf_model.float().eval(), processor, tokenizer


class HfReference(nn.Module):
    """A Hugging Face `CLIPModel` seen through what parity reads: `visual(pixels)` and
    `encode_text(ids)` are its own `get_image_features` / `get_text_features`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf_model = model
        self.visual = _HfVisual(model)
        self.logit_scale = model.logit_scale
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return _features(self.hf_model.get_text_features(input_ids=tokens))


class _HfVisual(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf_model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.hf_model.get_image_features(pixel_values=pixels))


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_hf(source: ModelSource) -> LoadedClip:
    """The folder's CLIPModel in float32, its OpenAI-layout conversion, processor and tokenizer."""
    folder = Path(source.folder)
    hf_model, processor, tokenizer = load_hf_folder(folder, "CLIP", "CLIPTokenizer")
    settings = image_settings(folder, source.model)
    activation = _activation(hf_model.config)
    if activation != source.activation:
        raise CheckpointError(f"transformers built {activation} where config.json names {source.activation}.")

    def preprocess(image):
        return torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])

    def tokenize(texts, context_length):
        ids = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True)
        return torch.tensor(ids["input_ids"], dtype=torch.long)

    return LoadedClip(
        model=convert_to_openai_layout(hf_model).eval(),
        preprocess=preprocess,
        name=source.name,
        input_resolution=settings.input_resolution,
        mean=settings.mean,
        std=settings.std,
        interpolation=settings.interpolation,
        resize_mode=FLOOR_CENTER_CROP,
        tokenize=tokenize,
        reference=HfReference(hf_model).eval(),
        details={
            **source.run_params(),
            "activation": activation,
            "tokenizer": HF_TOKENIZER,
            "parity_reference": (
                f"transformers {import_transformers().__version__} CLIPModel from {folder.name} ({activation}), "
                "CLIPImageProcessorPil and CLIPTokenizer"
            ),
        },
    )


def _activation(config) -> str:
    acts = {config.vision_config.hidden_act, config.text_config.hidden_act}
    if len(acts) != 1:
        raise SourceError(f"The towers use different activations ({sorted(acts)}); one activation is supported.")
    return "QuickGELU" if acts == {"quick_gelu"} else "GELU"


@torch.no_grad()
def convert_to_openai_layout(hf_model: nn.Module) -> nn.Module:
    """`clip.model.CLIP` with the Hugging Face model's weights, value for value (float32)."""
    clip = import_clip()
    config = hf_model.config
    vision, text = config.vision_config, config.text_config
    model = clip.model.CLIP(
        embed_dim=int(config.projection_dim),
        image_resolution=int(vision.image_size),
        vision_layers=int(vision.num_hidden_layers),
        vision_width=int(vision.hidden_size),
        vision_patch_size=int(vision.patch_size),
        context_length=int(text.max_position_embeddings),
        vocab_size=int(text.vocab_size),
        transformer_width=int(text.hidden_size),
        transformer_heads=int(text.num_attention_heads),
        transformer_layers=int(text.num_hidden_layers),
    ).float()
    if _activation(config) == "GELU":  # OpenAI's blocks hard-code QuickGELU
        for block in model.modules():
            if isinstance(block, clip.model.ResidualAttentionBlock):
                block.mlp.gelu = nn.GELU()
    state = _openai_state_dict(hf_model.state_dict(), vision.num_hidden_layers, text.num_hidden_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"visual.attnpool"}:
        raise CheckpointError(f"The conversion left weights out: missing {missing}, unexpected {unexpected}.")
    return model


def _name_table(vision_layers: int, text_layers: int) -> dict[str, tuple[tuple[str, ...], str]]:
    """OpenAI's name -> (Hugging Face's names, how): "" copied, "t" transposed, "qkv" the
    concatenation of the q, k and v projections."""
    table: dict[str, tuple[tuple[str, ...], str]] = {
        "logit_scale": (("logit_scale",), ""),
        "token_embedding.weight": (("text_model.embeddings.token_embedding.weight",), ""),
        "positional_embedding": (("text_model.embeddings.position_embedding.weight",), ""),
        "ln_final.weight": (("text_model.final_layer_norm.weight",), ""),
        "ln_final.bias": (("text_model.final_layer_norm.bias",), ""),
        "text_projection": (("text_projection.weight",), "t"),
        "visual.class_embedding": (("vision_model.embeddings.class_embedding",), ""),
        "visual.conv1.weight": (("vision_model.embeddings.patch_embedding.weight",), ""),
        "visual.positional_embedding": (("vision_model.embeddings.position_embedding.weight",), ""),
        "visual.ln_pre.weight": (("vision_model.pre_layrnorm.weight",), ""),
        "visual.ln_pre.bias": (("vision_model.pre_layrnorm.bias",), ""),
        "visual.ln_post.weight": (("vision_model.post_layernorm.weight",), ""),
        "visual.ln_post.bias": (("vision_model.post_layernorm.bias",), ""),
        "visual.proj": (("visual_projection.weight",), "t"),
    }
    for hf_prefix, prefix, layers in (
        ("text_model.encoder.layers", "transformer.resblocks", text_layers),
        ("vision_model.encoder.layers", "visual.transformer.resblocks", vision_layers),
    ):
        for i in range(int(layers)):
            src, dst = f"{hf_prefix}.{i}", f"{prefix}.{i}"
            for kind in ("weight", "bias"):
                qkv = tuple(f"{src}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v"))
                table[f"{dst}.attn.in_proj_{kind}"] = (qkv, "qkv")
                table[f"{dst}.attn.out_proj.{kind}"] = ((f"{src}.self_attn.out_proj.{kind}",), "")
                table[f"{dst}.ln_1.{kind}"] = ((f"{src}.layer_norm1.{kind}",), "")
                table[f"{dst}.ln_2.{kind}"] = ((f"{src}.layer_norm2.{kind}",), "")
                table[f"{dst}.mlp.c_fc.{kind}"] = ((f"{src}.mlp.fc1.{kind}",), "")
                table[f"{dst}.mlp.c_proj.{kind}"] = ((f"{src}.mlp.fc2.{kind}",), "")
    return table


def _openai_state_dict(hf: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, (names, how) in _name_table(vision_layers, text_layers).items():
        values = [hf[name] for name in names]
        out[key] = torch.cat(values) if how == "qkv" else values[0].t() if how == "t" else values[0]
    return {key: value.detach().float().contiguous() for key, value in out.items()}


def _hf_state_dict(ours: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """`_openai_state_dict` inverted: OpenAI's names and layout to Hugging Face's."""
    out: dict[str, torch.Tensor] = {}
    for key, (names, how) in _name_table(vision_layers, text_layers).items():
        value = ours[key]
        parts = value.chunk(3) if how == "qkv" else [value.t() if how == "t" else value]
        out.update({name: part.contiguous() for name, part in zip(names, parts)})
    return out


@torch.no_grad()
def save_openai_as_hf(model: nn.Module, folder: str | os.PathLike, vocab_path: str | os.PathLike) -> Path:
    """OpenAI's `clip.model.CLIP` (a ViT) as a Hugging Face folder with the same weights, value
    for value, and a CLIPProcessor with transformers' default image processor and a tokenizer
    built from CLIP's vocabulary: what a Hugging Face user of the same checkpoint loads."""
    transformers = import_transformers()
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        raise SourceError("Hugging Face's CLIPModel has a ViT image tower only; this model's is not a ViT.")
    vision_width, text_width = int(visual.conv1.out_channels), int(model.transformer.width)
    vision = {"hidden_size": vision_width, "intermediate_size": 4 * vision_width,
              "num_attention_heads": int(visual.transformer.resblocks[0].attn.num_heads),
              "num_hidden_layers": len(visual.transformer.resblocks), "image_size": int(visual.input_resolution),
              "patch_size": int(visual.conv1.kernel_size[0])}  # fmt: skip
    text = {"hidden_size": text_width, "intermediate_size": 4 * text_width,
            "num_attention_heads": int(model.transformer.resblocks[0].attn.num_heads),
            "num_hidden_layers": len(model.transformer.resblocks), "vocab_size": int(model.vocab_size),
            "max_position_embeddings": int(model.context_length)}  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=int(model.text_projection.shape[1])
    )
    hf_model = transformers.CLIPModel(config).eval()
    ours = {key: value.detach().float() for key, value in model.state_dict().items()}
    state = _hf_state_dict(ours, vision["num_hidden_layers"], text["num_hidden_layers"])
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith("position_ids") for key in missing):
        raise CheckpointError(f"The conversion left weights out: missing {missing}, unexpected {unexpected}.")
    folder = Path(folder)
    hf_model.save_pretrained(folder)
    _save_processor(folder, Path(vocab_path), vision["image_size"], transformers.CLIPImageProcessor)
    return folder


def save_random_hf_clip(
    folder: str | os.PathLike,
    vocab_path: str | os.PathLike,
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    projection_dim: int = 512,
) -> Path:
    """A `CLIPModel` with random weights (ViT-B/32 dimensions unless `vision` / `text` say
    otherwise) and CLIP's trained logit scale (100), saved with `save_pretrained`, with a
    CLIPProcessor whose tokenizer is built from CLIP's vocabulary file `vocab_path`: what a
    `hf:<folder>` export reads."""
    transformers = import_transformers()
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
              "image_size": 224, "patch_size": 32, **(vision or {})}  # fmt: skip
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
            **(text or {})}  # fmt: skip
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TRAINED_LOGIT_SCALE))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _save_processor(folder, Path(vocab_path), int(vision["image_size"]), transformers.CLIPImageProcessorPil)
    return folder


def _save_processor(folder: Path, vocab_path: Path, size: int, image_processor: type) -> None:
    """A CLIPProcessor into `folder`: `image_processor` for a `size` px square, and a
    CLIPTokenizer built from CLIP's vocabulary (Hugging Face's vocab.json and merges.txt, the same
    ids and merges)."""
    transformers = import_transformers()

    tokenizer = ClipTokenizer.from_file(vocab_path)
    with tempfile.TemporaryDirectory(prefix="mlflow-clip-vocab-") as tmp:
        vocab_json, merges_txt = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        ids = {token: i for i, token in enumerate(tokenizer.vocabulary())}
        vocab_json.write_text(json.dumps(ids, ensure_ascii=False))
        merges_txt.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tokenizer.merges()) + "\n")
        processor = transformers.CLIPProcessor(
            image_processor=image_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=transformers.CLIPTokenizer(str(vocab_json), str(merges_txt)),
        )
        processor.save_pretrained(folder)
