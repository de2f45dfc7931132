"""Parity of SigLIP, SigLIP 2, multilingual and Hugging Face SiglipModel exports, full size.

Each architecture is built at its published dimensions with random weights by its source's own
constructor (open_clip's `create_model`, transformers' `SiglipModel`), with a tokenizer trained on
the tests' multilingual corpus (tests/source_models.py; the text towers keep their published
vocabulary sizes), exported through the same path as `mlflow run .` at each precision, and
measured against the source's own PyTorch model. Prints one Markdown row per architecture and
precision; run each architecture in its own process (they are large).

    python scripts/source_parity_table.py --arch ViT-B-16-SigLIP --precisions fp32 int8 bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CLASSES = ["a person", "a car", "a dog", "a cat", "кошка", "猫"]
# architecture -> (tokenizer layout, the text tower's Hugging Face config for hf_text towers)
ARCHITECTURES = {
    "ViT-B-16-SigLIP": ("t5", None),
    "ViT-B-16-SigLIP2": ("gemma", None),
    "ViT-B-16-SigLIP-384": ("t5", None),
    "xlm-roberta-base-ViT-B-32": (
        "xlmr",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 514,
            "vocab_size": 250002,
        },
    ),  # fmt: skip
    "nllb-clip-base": (
        "nllb",
        {
            "d_model": 1024,
            "encoder_layers": 12,
            "encoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "max_position_embeddings": 1024,
            "vocab_size": 256206,
        },
    ),  # fmt: skip
    # google/siglip-base-patch16-224's dimensions
    "hf:siglip-base-patch16-224": ("hf-siglip", None),
}


def prepare(architecture: str, tmp: Path) -> dict:
    """The export's arguments (model, checkpoint, tokenizer) for `architecture`, built in `tmp`."""
    import source_models as models

    layout, text_config = ARCHITECTURES[architecture]
    if layout == "hf-siglip":
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 224, "patch_size": 16}  # fmt: skip
        text = {**vision, "vocab_size": 32000, "max_position_embeddings": 64, "projection_size": 768}
        del text["image_size"], text["patch_size"]
        folder = models.hf_siglip_folder(tmp / "siglip-base-patch16-224", "siglip", vision=vision, text=text)
        return {"model": f"hf:{folder}"}
    folder = tmp / "tokenizer"
    tokenizer = models.tokenizer_folder(folder, layout)
    text_cfg = None
    if text_config:
        models.hf_text_config(folder, layout, len(tokenizer))
        config = json.loads((folder / "config.json").read_text())
        config.update(text_config)
        (folder / "config.json").write_text(json.dumps(config))
        text_cfg = _hf_text_cfg(architecture, folder)
    checkpoint = models.save_open_clip_checkpoint(architecture, tmp / "weights.bin", text_cfg)
    return {"model": f"open_clip:{architecture}", "checkpoint": str(checkpoint), "tokenizer": str(folder)}


def _hf_text_cfg(architecture: str, folder: Path) -> dict:
    from mlflow_clip.export.open_clip_configs import open_clip_config_dir

    text_cfg = json.loads((open_clip_config_dir() / f"{architecture}.json").read_text())["text_cfg"]
    return {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}


def measure(architecture: str, precision: str, arguments: dict, tmp: Path) -> dict:
    from mlflow_clip.export.job import build_classifier, check_parity
    from mlflow_clip.export.spec import ParityThresholds

    started = time.perf_counter()
    built = build_classifier(
        CLASSES, templates="photo", out_dir=tmp / f"out-{precision}", precision=precision, **arguments
    )
    thresholds = ParityThresholds.for_precision(precision)
    report, failures = check_parity(built, None, thresholds)
    metrics = report.metrics()
    return {
        "architecture": architecture,
        "precision": precision,
        "head": built.config.head,
        "tokenizer": built.config.tokenizer,
        "prob": metrics["parity_max_abs_prob_diff"],
        "logit": metrics["parity_max_abs_logit_diff"],
        "pixel": metrics["parity_max_abs_pixel_diff"],
        "top1": metrics["parity_top1_agreement"],
        "tokens": int(metrics.get("parity_token_mismatches", -1)),
        "text": metrics.get("parity_max_abs_text_embedding_diff", float("nan")),
        "onnx_mb": built.onnx_path.stat().st_size / 1e6,
        "text_mb": built.text_encoder_path.stat().st_size / 1e6,
        "seconds": time.perf_counter() - started,
        "gates": "pass" if not failures else "; ".join(failures),
    }


def row(m: dict) -> str:
    return (
        f"| `{m['architecture']}` | {m['precision']} | {m['head']} | {m['tokenizer']} | {m['prob']:.1e} | "
        f"{m['logit']:.1e} | {m['pixel']:.1f} | {m['top1']:.2f} | {m['tokens']} | {m['text']:.1e} | "
        f"{m['onnx_mb']:.0f} MB | {m['text_mb']:.0f} MB | {m['seconds']:.0f} s | {m['gates']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "bf16"])
    parser.add_argument("--json", help="append each measurement to this JSON-lines file")
    args = parser.parse_args()
    for architecture in args.arch:
        with tempfile.TemporaryDirectory(prefix="mlflow-clip-parity-") as name:
            tmp = Path(name)
            arguments = prepare(architecture, tmp)
            for precision in args.precisions:
                measured = measure(architecture, precision, arguments, tmp)
                print(row(measured), flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(measured) + "\n")


if __name__ == "__main__":
    main()
