"""`mlflow-clip predict` against the in-process pyfunc on the same images, side by side.

    python scripts/predict_speed.py MODEL_DIR --images 512 --size 640x480 --rounds 3

Writes N photo-like JPEGs into a temporary folder, then, in alternating rounds:
(a) the in-process pyfunc: read each batch's files, `mlflow.pyfunc.load_model(...).predict` on a
DataFrame of their bytes (loaded once, before the rounds);
(b) `mlflow-clip predict MODEL_DIR FOLDER -o out.parquet`, a process of its own: its own figure
(images/s while scoring, files read and Parquet written included, the model's load excluded)
and the wall clock of the whole command (start-up and load included).
Both use the same batch size and onnxruntime's default threads. Prints a table and the ratio.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    from mlflow_clip.demo_data import make_photo_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(make_photo_jpeg(size[0], size[1], seed=i))
        paths.append(path)
    return paths


def pyfunc_round(model, paths: list[Path], batch: int) -> float:
    import pandas as pd

    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        images = [p.read_bytes() for p in paths[start : start + batch]]
        model.predict(pd.DataFrame({"image": images}), params={"on_error": "null"})
    return len(paths) / (time.perf_counter() - started)


def predict_round(model_dir: str, folder: Path, out: Path, batch: int) -> tuple[float, float]:
    command = [sys.executable, "-m", "mlflow_clip.cli", "predict", "-m", model_dir, str(folder), "-o", str(out)]
    started = time.perf_counter()
    done = subprocess.run([*command, "--overwrite", "--batch-size", str(batch)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    rate = float(re.search(r"at ([0-9.]+) images/s", done.stdout).group(1))
    count = int(re.search(r"([0-9,]+) images into", done.stdout).group(1).replace(",", ""))
    return rate, count / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import mlflow

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
        paths = make_images(Path(tmp) / "images", args.images, (width, height))
        model = mlflow.pyfunc.load_model(args.model_dir)
        pyfunc_round(model, paths[: args.batch], args.batch)  # warm-up
        rows = []
        for round_ in range(1, args.rounds + 1):
            ours = predict_round(args.model_dir, Path(tmp) / "images", Path(tmp) / "out.parquet", args.batch)
            theirs = pyfunc_round(model, paths, args.batch)
            rows.append((round_, theirs, *ours))
    print(f"{args.images} JPEGs {args.size}, batch {args.batch}, model {args.model_dir}")
    print("| round | in-process pyfunc img/s | `mlflow-clip predict` img/s (scoring) | ratio | whole command img/s |")
    print("|---|---:|---:|---:|---:|")
    for round_, theirs, ours, wall in rows:
        print(f"| {round_} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f} | {wall:.1f} |")
    total = sum(r[2] for r in rows) / sum(r[1] for r in rows)
    print(f"mean ratio (predict / pyfunc): {total:.3f}")


if __name__ == "__main__":
    main()
