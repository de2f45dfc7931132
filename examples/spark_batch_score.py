"""Batch-score a folder of images on Spark with a registered mlflow-clip model.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db \
        python examples/spark_batch_score.py models:/clip-zero-shot/1 demo-images scores.parquet

Reads every file under the folder (recursively) with Spark's binaryFile source and scores it
with mlflow_clip.spark.score_image_files (mlflow.pyfunc.spark_udf with env_manager="local":
the Python workers use this interpreter's packages, and on_error=null), so an unreadable file
gets a null label and an error text instead of failing the job. Writes path, label, score, error
to a Parquet directory, or CSV with a header when the output path ends in .csv.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri", help="e.g. models:/clip-zero-shot/1")
    parser.add_argument("images", help="a folder of image files (searched recursively)")
    parser.add_argument("output", help="output directory: Parquet, or CSV if it ends in .csv")
    parser.add_argument("--master", default="local[*]", help="Spark master (default: local[*])")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.images):
        raise SystemExit(f"error: no folder of images at {args.images}")

    # Spark starts its Python workers with `python3` from PATH unless told otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from mlflow.exceptions import MlflowException
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from mlflow_clip.spark import score_image_files

    spark = (
        SparkSession.builder.master(args.master)
        .appName("mlflow-clip-batch-score")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    try:
        # on_error=null: an unreadable file gets a null label and an error text
        scores = score_image_files(spark, args.model_uri, args.images).select("path", "label", "score", "error")
        writer = scores.write.mode("overwrite")  # one part file per partition
        if args.output.endswith(".csv"):
            writer.option("header", True).csv(args.output)
            written = spark.read.option("header", True).csv(args.output)
        else:
            writer.parquet(args.output)
            written = spark.read.parquet(args.output)
        failures = written.filter(F.col("label").isNull()).count()
        print(f"Scored {written.count()} files ({failures} unreadable) into {args.output}")
    except MlflowException as e:  # no such model, or one that fails its checks: one line, not a trace
        raise SystemExit(f"error: {e.message}") from None
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
