"""Models and tokenizers for the SigLIP and multilingual source tests, made here, offline.

A plain module (`from source_models import ...`). Tokenizers are trained on the multilingual
corpus's words (`multilingual.training_lines`) with SentencePiece, then loaded and saved by
transformers the way their published folders are (T5's for SigLIP, Gemma's for SigLIP 2,
XLM-RoBERTa's, NLLB's, and Hugging Face's own SiglipTokenizer). Models have random weights and
are built by each source's own constructors: open_clip's `create_model` from a config (the
published one, or a small one in a `local-dir:` folder), transformers' `SiglipModel` from a
`SiglipConfig`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from multilingual import training_lines

# SentencePiece settings of each published tokenizer's layout (special ids first).
SPM_LAYOUTS = {
    # T5's c4 vocabulary (SigLIP): <pad> 0, </s> 1, <unk> 2, unigram
    "t5": dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
    # Gemma's (SigLIP 2): <pad> 0, <eos> 1, <bos> 2, <unk> 3, byte-level BPE without a dummy prefix
    "gemma": dict(
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        split_by_whitespace=False,
        remove_extra_whitespaces=False,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
    ),  # fmt: skip
    # fairseq's layout (XLM-RoBERTa, NLLB): <s> 0, <pad> 1, </s> 2, <unk> 3
    "xlmr": dict(model_type="unigram", bos_id=0, pad_id=1, eos_id=2, unk_id=3),
    "nllb": dict(model_type="bpe", bos_id=0, pad_id=1, eos_id=2, unk_id=3),
}
# tokenizer_config.json of each folder, as the published ones say.
TOKENIZER_CONFIGS = {
    "t5": (
        "spiece.model",
        {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": 0,
            "pad_token": "</s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "legacy": False,
        },
    ),  # fmt: skip
    "gemma": (
        "tokenizer.model",
        {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": False,
            "add_eos_token": True,
            "padding_side": "right",
            "pad_token": "<pad>",
            "eos_token": "<eos>",
            "bos_token": "<bos>",
            "unk_token": "<unk>",
        },
    ),  # fmt: skip
    "xlmr": ("sentencepiece.bpe.model", {"tokenizer_class": "XLMRobertaTokenizer"}),
    "nllb": ("sentencepiece.bpe.model", {"tokenizer_class": "NllbTokenizer"}),
}
VOCAB_SIZE = 1200


def train_sentencepiece(path: Path, layout: str) -> Path:
    """A SentencePiece model in `layout`'s special-token layout, trained on a few hundred lines."""
    import sentencepiece

    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(training_lines()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=VOCAB_SIZE, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, **SPM_LAYOUTS[layout],
    )  # fmt: skip
    return path.with_suffix(".model")


def tokenizer_folder(folder: Path, layout: str):
    """A tokenizer folder as transformers 5 saves it (tokenizer.json and tokenizer_config.json),
    made from a trained SentencePiece model through the published folder's tokenizer_config;
    returns the loaded tokenizer."""
    from transformers import AutoTokenizer

    file_name, config = TOKENIZER_CONFIGS[layout]
    source = folder.parent / f"{folder.name}-sentencepiece"
    source.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(train_sentencepiece(folder.parent / f"{folder.name}-spm" / "spm.model", layout), source / file_name)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(folder)
    return tokenizer


def hf_text_config(folder: Path, kind: str, vocab_size: int, seed_width: int = 64) -> Path:
    """A small Hugging Face text tower's config.json (XLM-RoBERTa or NLLB's M2M100 encoder)."""
    import transformers

    if kind == "xlmr":
        config = transformers.XLMRobertaConfig(
            vocab_size=vocab_size, hidden_size=seed_width, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * seed_width, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
            eos_token_id=2,
        )  # fmt: skip
    else:
        config = transformers.M2M100Config(
            vocab_size=vocab_size, d_model=seed_width, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=2 * seed_width, decoder_ffn_dim=2 * seed_width,
            max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2, scale_embedding=True,
        )  # fmt: skip
    config.save_pretrained(folder)
    return folder / "config.json"


SMALL_VISION = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
SQUASH_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}  # fmt: skip


def small_siglip_config(vocab_size: int) -> dict:
    """SigLIP's layout at a small size: a timm ViT with its attention-pooling (MAP) head, and
    open_clip's text transformer read at its last position, without a causal mask."""
    return {
        "embed_dim": 192,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },  # fmt: skip
        "text_cfg": {
            "context_length": 16,
            "vocab_size": vocab_size,
            "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 64,
            "heads": 2,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },  # fmt: skip
    }


def small_hf_text_config(kind: str) -> dict:
    """open_clip's multilingual layout (xlm-roberta-base-ViT-B-32, nllb-clip-base) at a small size."""
    name = {"xlmr": "xlm-roberta-base", "nllb": "facebook/nllb-200-distilled-600M"}[kind]
    pooler = {"xlmr": "mean_pooler", "nllb": "cls_pooler"}[kind]
    return {
        "embed_dim": 32,
        "vision_cfg": SMALL_VISION,
        "text_cfg": {
            "hf_model_name": name,
            "hf_tokenizer_name": name,
            "hf_pooler_type": pooler,
            "hf_proj_type": "linear",
        },  # fmt: skip
    }


def local_dir(folder: Path, model_cfg: dict, preprocess_cfg: dict | None = None, seed: int = 0) -> Path:
    """An open_clip `local-dir:` folder (open_clip_config.json and random weights) for
    `model_cfg`, built by open_clip; a Hugging Face text tower's config comes from the folder."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    document = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(document))
    text_cfg = dict(model_cfg["text_cfg"])
    if "hf_model_name" in text_cfg:
        text_cfg.update(hf_model_name=str(folder), hf_model_pretrained=False)
    torch.manual_seed(seed)
    model = open_clip.create_model(
        f"local-dir:{folder}", load_weights=False, pretrained_text=False, device="cpu", text_cfg=text_cfg
    )
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0 if model_cfg.get("init_logit_bias") is not None else 100.0))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def save_open_clip_checkpoint(architecture: str, path: Path, text_cfg: dict | None = None, seed: int = 0) -> Path:
    """A published architecture with random weights, saved as open_clip saves a state dict (a
    Hugging Face text tower built from `text_cfg`'s local hf_model_name)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    kwargs = {"text_cfg": text_cfg} if text_cfg else {}
    model = open_clip.create_model(architecture, pretrained=None, pretrained_text=False, device="cpu", **kwargs)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0 if model.logit_bias is not None else 100.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def hf_siglip_folder(
    folder: Path, tokenizer: str = "siglip", seed: int = 0, vision: dict | None = None, text: dict | None = None
) -> Path:
    """A small SiglipModel with random weights, saved with its processor: Hugging Face's own
    SiglipTokenizer on a trained SentencePiece model (`tokenizer="siglip"`), or Gemma's
    (`"gemma"`, as SigLIP 2's fixed-resolution folders hold)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "siglip":
        spm = train_sentencepiece(folder.parent / f"{folder.name}-spm" / "spm.model", "t5")
        text_tokenizer = transformers.SiglipTokenizer(vocab_file=str(spm))
    else:
        text_tokenizer = tokenizer_folder(folder.parent / f"{folder.name}-gemma", "gemma")
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16, **(vision or {})}  # fmt: skip
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": len(text_tokenizer), "max_position_embeddings": 64, "projection_size": 64,
            **(text or {})}  # fmt: skip
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    model.save_pretrained(folder)
    size = {"height": vision["image_size"], "width": vision["image_size"]}
    processor = transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size=size), tokenizer=text_tokenizer
    )
    processor.save_pretrained(folder)
    return folder
