"""Parity of the ONNX export against PyTorch for every CLIP architecture, with random weights.

Builds each architecture at its published dimensions (logit scale 100), saves it as a state
dict, exports it through the same `model=<path>` code path as a real checkpoint, and prints a
Markdown table: max image-embedding error, max probability error, export seconds, ONNX MB.

    python scripts/parity_table.py                      # all 9 architectures
    python scripts/parity_table.py --arch RN50 ViT-B/32 --out docs/parity_table.md
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mlflow_clip.export.checkpoints import ARCHITECTURES, save_random_checkpoint
from mlflow_clip.export.graph import export_onnx
from mlflow_clip.export.job import build_classifier, check_parity
from mlflow_clip.export.parity import ParityThresholds

CLASSES = ["a person", "a car", "a dog", "a cat"]


class _Embedding(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, image):
        return self.visual(image)


@torch.no_grad()
def embedding_error(built, tmp: Path, seed: int = 0) -> float:
    """Max |ONNX - PyTorch| of the raw image embedding, on random normalized images."""
    path = tmp / "embedding.onnx"
    resolution = built.config.input_resolution
    export_onnx(_Embedding(built.loaded.model.visual), path, resolution, built.config.opset)
    x = np.random.default_rng(seed).standard_normal((3, 3, resolution, resolution), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x})
    torch_out = built.loaded.model.visual(torch.from_numpy(x)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def measure(architecture: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = save_random_checkpoint(architecture, tmp / "weights.pt")
        built = build_classifier(CLASSES, model=str(checkpoint), templates="photo", out_dir=tmp / "out")
        report, _ = check_parity(built, None, ParityThresholds())
        row = {
            "architecture": architecture,
            "embedding_err": embedding_error(built, tmp),
            "prob_err": report.max_abs_prob_diff,
            "top1": report.top1_agreement,
            "export_s": built.export_seconds,
            "onnx_mb": built.onnx_path.stat().st_size / 1e6,
        }
        del built
        gc.collect()
        return row


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| architecture | max image-embedding error | max probability error | top-1 agreement | export s | ONNX MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['embedding_err']:.1e} | {r['prob_err']:.1e} | {r['top1']:.2f} "
            f"| {r['export_s']:.0f} | {r['onnx_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for architecture in args.arch:
        started = time.perf_counter()
        rows.append(measure(architecture))
        print(f"{architecture}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    table = to_markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
