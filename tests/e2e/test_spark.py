"""Batch scoring on Spark: `mlflow.pyfunc.spark_udf` over `binaryFile`, in a real local PySpark.

The registered demo CLIP scores a folder of drawn shapes through Spark's Python workers; the
labels must match in-process `predict` on the same bytes and the true classes of the drawings,
and `params={"on_error": "null"}` must turn corrupt files into null labels with an error text
while the job completes.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("pyspark")

import mlflow  # noqa: E402

N_PER_CLASS = 3
MIN_ACCURACY = 0.9
SCORE_TOL = 1e-6
TRUNCATED = "truncated.jpg"
TEXT_AS_JPEG = "notes.jpg"


@pytest.fixture(scope="module")
def image_folder(module_tmp) -> Path:
    """9 classes x N_PER_CLASS drawings of varied sizes, one subfolder per class."""
    from mlflow_clip.demo_data import write_image_folder

    return write_image_folder(module_tmp("images") / "clean", N_PER_CLASS, seed=11, size=None)


@pytest.fixture(scope="module")
def mixed_folder(module_tmp, image_folder) -> Path:
    """The clean drawings plus a truncated JPEG and a text file named .jpg."""
    from mlflow_clip.demo_data import draw_image

    root = module_tmp("images") / "mixed"
    for path in image_folder.rglob("*.png"):
        target = root / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    buffer = io.BytesIO()
    draw_image("red", "circle", size=(160, 120), rng=3).save(buffer, "JPEG", quality=90)
    (root / TRUNCATED).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / TEXT_AS_JPEG).write_bytes(b"shopping list: milk, eggs, a red circle\n")
    return root


@pytest.fixture(scope="module")
def spark(module_store):
    """A small local Spark whose Python workers run this interpreter and see the store."""
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        # Without this, workers start `python3` from PATH, which may lack pandas/mlflow.
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        session = (
            SparkSession.builder.master("local[2]")
            .appName("mlflow-clip-tests")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", "1g")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        try:
            yield session
        finally:
            session.stop()


def local_path(spark_path: str) -> Path:
    """binaryFile's `path` is `file:` + the raw local path (Spark 4 does not percent-encode it)."""
    return Path(spark_path.removeprefix("file:"))


def read_files(spark, folder: Path, partitions: int | None = None):
    files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder))
    return files.coalesce(partitions) if partitions else files


def to_frame(scored) -> pd.DataFrame:
    return scored.toPandas().assign(path=lambda df: df["path"].map(local_path)).set_index("path")


def score_folder(
    spark, module_demo_model_uri: str, folder: Path, params: dict | None = None, partitions: int | None = None
):
    """The UDF's struct as it comes: path, label, score, probabilities, error; one row per file."""
    from mlflow_clip.spark import udf_result_type

    result_type = udf_result_type(module_demo_model_uri, params)
    udf = mlflow.pyfunc.spark_udf(
        spark, module_demo_model_uri, env_manager="local", params=params, result_type=result_type
    )
    return to_frame(
        read_files(spark, folder, partitions).select("path", udf("content").alias("p")).select("path", "p.*")
    )


def score_folder_null_on_error(spark, module_demo_model_uri: str, folder: Path) -> pd.DataFrame:
    """on_error=null through mlflow_clip.spark, which restores the real nulls that MLflow 3.17's
    spark_udf turns into the text "None" (it casts string struct fields with astype(np.str_))."""
    from mlflow_clip.spark import score_image_files

    return to_frame(score_image_files(spark, module_demo_model_uri, str(folder)))


def predict_in_process(module_demo_model_uri: str, paths: list[Path]) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(module_demo_model_uri)
    frame = pd.DataFrame({"image": [path.read_bytes() for path in paths]})
    return model.predict(frame, params={"on_error": "null"}).set_index(pd.Index(paths, name="path"))


def test_the_result_type_follows_the_output_mode(spark, module_demo_model_uri, image_folder):
    """spark_udf's own default is a struct of every output the signature declares, which no one
    request returns; `udf_result_type` gives the columns of the request's mode, typed as declared."""
    from mlflow_clip.spark import udf_result_type

    files = read_files(spark, image_folder)
    plain = mlflow.pyfunc.spark_udf(spark, module_demo_model_uri, env_manager="local")
    assert files.select(plain("content").alias("p")).schema["p"].dataType.fieldNames() == [
        "label",
        "score",
        "probabilities",
        "top_labels",
        "top_scores",
        "embedding",
        "error",
    ]
    params = {"top_k": 2}
    result_type = udf_result_type(module_demo_model_uri, params)
    udf = mlflow.pyfunc.spark_udf(
        spark, module_demo_model_uri, env_manager="local", params=params, result_type=result_type
    )
    scored = files.limit(3).select(udf("content").alias("p")).select("p.*")
    assert scored.schema.simpleString() == (
        "struct<label:string,score:float,probabilities:array<float>,top_labels:array<string>,"
        "top_scores:array<float>,error:string>"
    )
    assert [len(row["top_labels"]) for row in scored.collect()] == [2, 2, 2]


def test_spark_udf_matches_in_process_predict_and_truth(spark, module_demo_model_uri, image_folder):
    from mlflow_clip.demo_data import DEMO_CLASSES

    scored = score_folder(spark, module_demo_model_uri, image_folder)

    files = sorted(image_folder.rglob("*.png"))
    assert sorted(scored.index) == files  # one row per file, nothing dropped or duplicated
    expected = predict_in_process(module_demo_model_uri, files)
    assert list(scored.loc[files, "label"]) == list(expected["label"])
    np.testing.assert_allclose(
        scored.loc[files, "score"].astype(float), expected["score"].astype(float), atol=SCORE_TOL
    )
    np.testing.assert_allclose(
        np.stack(scored.loc[files, "probabilities"]), np.stack(expected["probabilities"]), atol=SCORE_TOL
    )
    assert scored["error"].isna().all()
    assert set(scored["label"]) <= set(DEMO_CLASSES)
    truth = [path.parent.name for path in files]
    accuracy = np.mean([label == true for label, true in zip(scored.loc[files, "label"], truth)])
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.0%} right on {len(files)} drawings"


def test_on_error_null_gives_null_labels_and_the_job_completes(spark, module_demo_model_uri, mixed_folder):
    scored = score_folder_null_on_error(spark, module_demo_model_uri, mixed_folder)

    bad = [mixed_folder / TRUNCATED, mixed_folder / TEXT_AS_JPEG]
    good = sorted(mixed_folder.rglob("*.png"))
    assert sorted(scored.index) == sorted(good + bad)
    assert scored.loc[bad, "label"].isna().all()
    assert scored.loc[bad, "score"].isna().all()
    assert "truncated or corrupt image" in scored.loc[bad[0], "error"]
    assert "not an image" in scored.loc[bad[1], "error"]
    assert scored.loc[good, "error"].isna().all()
    expected = predict_in_process(module_demo_model_uri, good)
    assert list(scored.loc[good, "label"]) == list(expected["label"])


def test_default_on_error_fails_the_job_with_the_row_reason(spark, module_demo_model_uri, mixed_folder):
    from pyspark.errors import PythonException

    with pytest.raises(PythonException, match="could not be read as images") as raised:
        score_folder(spark, module_demo_model_uri, mixed_folder)
    assert 'on_error": "null"' in str(raised.value)  # the message tells the fix


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="MLflow 3.17 spark_udf (_convert_struct_values) casts struct string fields with "
    "astype(np.str_): None becomes 'None' when a batch mixes good and bad rows",
)
def test_raw_udf_keeps_none_as_null_in_a_mixed_batch(spark, module_demo_model_uri, mixed_folder):
    scored = score_folder(spark, module_demo_model_uri, mixed_folder, params={"on_error": "null"}, partitions=1)
    assert scored.loc[mixed_folder / TRUNCATED, "label"] is None
    assert scored.loc[sorted(mixed_folder.rglob("*.png")), "error"].isna().all()


def test_a_batch_over_the_request_pixel_budget_still_scores(spark, module_demo_model_uri, tmp_path):
    """Ten flat 26 MP images in one Arrow batch (260 MP) are over the per-request pixel budget
    meant for HTTP requests; batch scoring lifts it, and still reads each image within its limits."""
    from PIL import Image

    from mlflow_clip.serving.limits import DEFAULT_LIMITS

    for i in range(10):
        Image.new("RGB", (5100, 5100), (220, 30, 30)).save(tmp_path / f"flat-{i}.png", optimize=True)
    assert 10 * 5100 * 5100 > DEFAULT_LIMITS.max_request_pixels
    scored = score_folder_null_on_error(spark, module_demo_model_uri, tmp_path)
    assert len(scored) == 10 and scored["error"].isna().all() and scored["score"].notna().all()


@pytest.mark.parametrize("env_manager", ["local", "uv", "virtualenv"])
def test_a_folder_is_embedded_in_every_env_manager(spark, module_demo_model_uri, mixed_folder, env_manager):
    """The helper sends base64 text where spark_udf talks JSON to a scoring server in the model's
    own environment (uv, virtualenv): the same embeddings as in process, and bad files still get
    a null embedding and their error."""
    from helpers import require_env_manager

    from mlflow_clip.spark import score_image_files

    local = mlflow.artifacts.download_artifacts(module_demo_model_uri)
    if env_manager != "local":
        require_env_manager(env_manager, Path(local))
    params = {"output": "embedding"}
    embedded = score_image_files(spark, module_demo_model_uri, str(mixed_folder), params, env_manager=env_manager)
    scored = to_frame(embedded)
    assert list(scored.columns) == ["embedding", "error"]
    good = sorted(mixed_folder.rglob("*.png"))
    bad = [mixed_folder / TRUNCATED, mixed_folder / TEXT_AS_JPEG]
    assert sorted(scored.index) == sorted(good + bad)
    model = mlflow.pyfunc.load_model(module_demo_model_uri)
    expected = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in good]}), params={"output": "embedding"})
    np.testing.assert_allclose(np.stack(scored.loc[good, "embedding"]), np.stack(expected["embedding"]), atol=1e-6)
    assert scored.loc[good, "error"].isna().all()
    assert scored.loc[bad, "embedding"].isna().all() and "not an image" in scored.loc[bad[1], "error"]


@pytest.mark.parametrize("env_manager", ["local", "uv"])
def test_the_model_runs_once_per_row_whatever_the_query_does_with_its_result(
    spark, module_demo_model_uri, image_folder, env_manager
):
    """A filter on the result (`error is null`) must not be pushed below the helper's repartition
    and run the model a second time (spark_udf's UDF is marked nondeterministic through
    mlflow_internals.evaluated_once), in one task per core."""
    from helpers import require_env_manager

    from mlflow_clip.spark import score_image_files

    if env_manager != "local":
        require_env_manager(env_manager, Path(mlflow.artifacts.download_artifacts(module_demo_model_uri)))
    scored = score_image_files(
        spark, module_demo_model_uri, str(image_folder), {"output": "embedding"}, env_manager=env_manager
    )
    plan = scored.filter("error is null")._jdf.queryExecution().executedPlan().toString()
    assert plan.count("ArrowEvalPython") == 1, plan
    assert f"RoundRobinPartitioning({spark.sparkContext.defaultParallelism})" in plan, plan
