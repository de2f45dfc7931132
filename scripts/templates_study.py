"""Does the prompt template matter? The demo model exported with templates none / photo /
ensemble, each evaluated on the same freshly drawn image folder (varied sizes, fixed seed).

Prints a Markdown table: templates, top-1, top-5, macro F1.

    python scripts/templates_study.py                          # demo weights, 40 images per class
    python scripts/templates_study.py --model /path/to/clip.pt --per-class 100 --out templates.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mlflow_clip.demo_data import DEMO_CLASSES, write_image_folder
from mlflow_clip.evaluation import ZeroShotEvaluation, evaluate_classifier, load_labelled_images
from mlflow_clip.export.job import build_classifier
from mlflow_clip.serving.classifier import ZeroShotClassifier

TEMPLATES = ("none", "photo", "ensemble")


def evaluate_templates(model: str, folder: Path, tmp: Path, templates: str) -> ZeroShotEvaluation:
    built = build_classifier(DEMO_CLASSES, model=model, templates=templates, out_dir=tmp)
    classifier = ZeroShotClassifier(built.onnx_path, built.config)
    try:
        return evaluate_classifier(classifier, load_labelled_images(folder, classifier.classes), progress=False)
    finally:
        classifier.close()


def to_markdown(rows: list[tuple[str, ZeroShotEvaluation]]) -> str:
    lines = ["| templates | top-1 | top-5 | macro F1 |", "|---|---|---|---|"]
    for name, e in rows:
        lines.append(f"| {name} | {e.accuracy_top1:.2%} | {e.accuracy_top5:.2%} | {e.macro_f1:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', a CLIP model name, or a checkpoint path.")
    parser.add_argument("--per-class", type=int, default=40, help="Images per class (default 40).")
    parser.add_argument("--seed", type=int, default=4242, help="Seed of the drawn images (default 4242).")
    parser.add_argument("--out", default="", help="Also write the table to this file.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="templates-study-") as tmp_name:
        tmp = Path(tmp_name)
        folder = write_image_folder(tmp / "images", args.per_class, seed=args.seed, size=None)
        rows = []
        for templates in TEMPLATES:
            (tmp / templates).mkdir()
            rows.append((templates, evaluate_templates(args.model, folder, tmp / templates, templates)))
    n = args.per_class * len(DEMO_CLASSES)
    table = (
        f"Model `{args.model}`, {n} images ({args.per_class} per class, varied sizes, seed {args.seed}):\n\n"
        + to_markdown(rows)
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
