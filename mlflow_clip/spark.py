"""Batch scoring on Spark: a folder of images in, one row of predictions per file out.

    >>> from mlflow_clip.spark import score_image_files
    >>> scores = score_image_files(spark, "models:/clip-zero-shot/1", "s3://bucket/images/")  # doctest: +SKIP
    >>> scores.select("path", "label", "score", "error").show()  # doctest: +SKIP

Wraps `mlflow.pyfunc.spark_udf` (env_manager="local") over Spark's binaryFile source with
`on_error="null"`, so an unreadable file gets a null label and an error text instead of failing
the job. It also restores real nulls: spark_udf converts string fields of a struct result with
`astype(str)`, which turns a bad row's missing label (and a good row's missing error) into the
text "None"; `score` stays a true null, so it says which rows failed.

A Spark batch (10,000 rows by default) is one call to the model, so the per-request pixel budget
meant for untrusted HTTP requests (`max_request_pixels`) is lifted here; every per-image limit
still holds, and decoding still runs within the process's decode budget.
"""

from __future__ import annotations

from typing import Any

BATCH_MODEL_CONFIG = {"max_request_pixels": 10**15}


def classify_column(
    spark: Any,
    model_uri: str,
    content: Any,
    params: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
) -> Any:
    """A struct column (label, score, probabilities, error) for a column of image bytes."""
    import mlflow
    from pyspark.sql import functions as F

    options = {"on_error": "null", **(params or {})}
    config = {**BATCH_MODEL_CONFIG, **(model_config or {})}
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local", params=options, model_config=config)
    result = udf(content)
    failed = result["score"].isNull()
    return F.struct(
        F.when(failed, F.lit(None).cast("string")).otherwise(result["label"]).alias("label"),
        result["score"].alias("score"),
        result["probabilities"].alias("probabilities"),
        F.when(failed, result["error"]).otherwise(F.lit(None).cast("string")).alias("error"),
    )


def score_image_files(
    spark: Any,
    model_uri: str,
    path: str,
    params: dict[str, Any] | None = None,
    recursive: bool = True,
    model_config: dict[str, Any] | None = None,
) -> Any:
    """Score every file under `path`: columns path, label, score, probabilities, error."""
    files = spark.read.format("binaryFile").option("recursiveFileLookup", str(recursive).lower()).load(path)
    scored = classify_column(spark, model_uri, files["content"], params, model_config)
    return files.select("path", scored.alias("prediction")).select("path", "prediction.*")
