"""Rows/s of `mlflow_clip.spark.score_image_files` per env manager, and where the time goes.

    python scripts/spark_env_speed.py MODEL_DIR --small 180 --large 1800 --env-managers local,uv,virtualenv

For each env manager, scores a folder of `small` and then `large` drawn demo images (a local
Spark, 2 cores) after one warm-up job (which builds the model's environment for uv and
virtualenv, once); the job's time is fixed + rows / marginal rate, so the two sizes give the
fixed cost per job (Python workers, the scoring server in the model's environment, the model's
load) and the marginal rows/s. The in-process pyfunc on the same bytes is the floor of the
model's own work. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _folder(root: Path, count: int) -> Path:
    from mlflow_clip.demo_data import DEMO_CLASSES, write_image_folder

    return write_image_folder(root / str(count), max(1, count // len(DEMO_CLASSES)), seed=count, size=None)


def _job_seconds(spark, model_dir: str, folder: Path, env_manager: str) -> tuple[float, int]:
    from mlflow_clip.spark import score_image_files

    started = time.perf_counter()
    scored = score_image_files(spark, model_dir, str(folder), {"output": "embedding"}, env_manager=env_manager)
    rows = scored.filter("error is null").count()
    return time.perf_counter() - started, rows


def _in_process_rate(model_dir: str, folder: Path) -> float:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_dir)
    images = [p.read_bytes() for p in sorted(folder.rglob("*.png"))]
    model.predict(pd.DataFrame({"image": images[:32]}), params={"output": "embedding"})
    started = time.perf_counter()
    for start in range(0, len(images), 256):
        model.predict(pd.DataFrame({"image": images[start : start + 256]}), params={"output": "embedding"})
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--small", type=int, default=180)
    parser.add_argument("--large", type=int, default=1800)
    parser.add_argument("--env-managers", default="local,uv,virtualenv")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    rows = []
    with tempfile.TemporaryDirectory(prefix="spark-env-speed-") as tmp:
        small, large = _folder(Path(tmp), args.small), _folder(Path(tmp), args.large)
        floor = _in_process_rate(args.model_dir, large)
        for env_manager in args.env_managers.split(","):
            _job_seconds(spark, args.model_dir, small, env_manager)  # warm-up: builds the environment once
            t_small, n_small = _job_seconds(spark, args.model_dir, small, env_manager)
            t_large, n_large = _job_seconds(spark, args.model_dir, large, env_manager)
            marginal = (n_large - n_small) / (t_large - t_small)
            fixed = t_small - n_small / marginal
            rows.append((env_manager, n_large / t_large, n_small / t_small, marginal, fixed))
    spark.stop()
    print(f"demo drawings, output=embedding, local[2]; in-process pyfunc on the same bytes: {floor:.0f} rows/s")
    print(
        f"| env manager | rows/s, {args.large} rows | rows/s, {args.small} rows | marginal rows/s "
        "| fixed cost per job (s) |"
    )
    print("|---|---:|---:|---:|---:|")
    for env_manager, big, little, marginal, fixed in rows:
        print(f"| {env_manager} | {big:.0f} | {little:.0f} | {marginal:.0f} | {fixed:.1f} |")


if __name__ == "__main__":
    main()
