"""`mlflow-clip predict`: a folder, a CSV of paths or a Parquet table of images in; a table of
labels, probabilities or embeddings out, one row per image in input order, bad files reported per
row; a stopped run resumes, and a re-run with --overwrite writes the same rows."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import COLOUR_CLASSES, demo_image_bytes, encode, requires_export, solid

from mlflow_clip.predict import PredictError, PredictOptions, predict_images

TOL = 1e-6


@pytest.fixture()
def folder(tmp_path):
    """Two images per colour in subfolders, a text file named .png, an empty file."""
    root = tmp_path / "images"
    for colour in COLOUR_CLASSES:
        (root / colour).mkdir(parents=True)
        for i in range(2):
            (root / colour / f"{i}.png").write_bytes(encode(solid(colour, (30 + i, 20))))
    (root / "notes.png").write_text("shopping list")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _in_process(model_dir, images: list[bytes], **params) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(str(model_dir))
    return model.predict(pd.DataFrame({"image": images}), params={"on_error": "null", **params})


def test_a_folder_becomes_a_table_in_name_order_with_bad_files_reported(colour_model_dir, folder, tmp_path):
    seen = []
    options = PredictOptions(top_k=2, batch_size=3)
    result = predict_images(
        str(colour_model_dir), folder, tmp_path / "out.parquet", options, progress=lambda *a: seen.append(a)
    )
    table = pd.read_parquet(tmp_path / "out.parquet")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert list(table["path"]) == [str(p.relative_to(folder)) for p in files]
    assert list(table.columns) == ["path", "label", "score", "probabilities", "top_labels", "top_scores", "error"]
    good = table["error"].isna()
    assert (result.rows, result.failed, result.scored_now) == (8, 2, 8) and good.sum() == 6
    assert list(table.loc[good, "label"]) == [p.split("/")[0] for p in table.loc[good, "path"]]
    expected = _in_process(colour_model_dir, [p.read_bytes() for p in files], top_k=2)
    np.testing.assert_allclose(
        np.stack(table.loc[good, "probabilities"]), np.stack(expected.loc[good, "probabilities"]), atol=TOL
    )
    assert (
        table.loc[~good, "label"].isna().all() and "not an image" in table.set_index("path").loc["notes.png", "error"]
    )
    assert [done for done, *_ in seen] == [3, 6, 8] and seen[-1][1:3] == (8, 2)  # progress: done, total, failed
    assert not (tmp_path / "out.parquet.parts").exists()


def test_a_csv_of_paths_into_csv_and_a_parquet_of_bytes_into_json_lines(colour_model_dir, folder, tmp_path):
    paths = ["red/0.png", "blue/1.png", "missing.png"]
    pd.DataFrame({"file": paths}).to_csv(folder / "list.csv", index=False)
    predict_images(str(colour_model_dir), folder / "list.csv", tmp_path / "out.csv", PredictOptions(column="file"))
    written = pd.read_csv(tmp_path / "out.csv")
    assert list(written["path"]) == paths and list(written["label"][:2]) == ["red", "blue"]
    assert len(json.loads(written["probabilities"][0])) == 3 and "cannot read the file" in written["error"][2]
    images = [encode(solid("green")), b"junk", encode(solid("red"))]
    pd.DataFrame({"image": images, "id": [7, 8, 9]}).to_parquet(tmp_path / "in.parquet")
    predict_images(str(colour_model_dir), tmp_path / "in.parquet", tmp_path / "out.jsonl", PredictOptions(mode="label"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["row"], r["label"]) for r in rows] == [(0, "green"), (1, None), (2, "red")]
    assert set(rows[0]) == {"row", "label", "score", "error"} and "not an image" in rows[1]["error"]


def test_a_stopped_run_resumes_and_a_rerun_writes_the_same_rows(colour_model_dir, folder, tmp_path):
    output = tmp_path / "out.parquet"
    options = PredictOptions(batch_size=3)

    def stop_after_the_first_batch(done, *_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_images(str(colour_model_dir), folder, output, options, progress=stop_after_the_first_batch)
    assert not output.exists() and [p.name for p in (tmp_path / "out.parquet.parts").glob("part-*")] == [
        "part-000000.parquet"
    ]
    with pytest.raises(PredictError, match="another options"):
        predict_images(str(colour_model_dir), folder, output, PredictOptions(batch_size=4))
    resumed = predict_images(str(colour_model_dir), folder, output, options)
    assert resumed.scored_now == 5 and resumed.rows == 8  # the first batch was not scored again
    first = pd.read_parquet(output)
    with pytest.raises(PredictError, match="--overwrite"):
        predict_images(str(colour_model_dir), folder, output, options)
    again = predict_images(str(colour_model_dir), folder, output, options, overwrite=True)
    assert again.scored_now == 8
    pd.testing.assert_frame_equal(pd.read_parquet(output), first)


@requires_export
def test_a_folder_of_embeddings_equals_the_in_process_pyfunc(demo_model_dir, tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    pairs = demo_image_bytes([("a red circle", "PNG"), ("a blue square", "JPEG"), ("a green triangle", "WEBP")])
    for i, (data, _) in enumerate(pairs):
        (root / f"{i}.img").write_bytes(data)
    predict_images(str(demo_model_dir), root, tmp_path / "vectors.parquet", PredictOptions(mode="embedding"))
    table = pd.read_parquet(tmp_path / "vectors.parquet")
    assert list(table.columns) == ["path", "embedding", "error"]
    expected = _in_process(demo_model_dir, [data for data, _ in pairs], output="embedding")
    np.testing.assert_allclose(np.stack(table["embedding"]), np.stack(expected["embedding"]), atol=TOL)


def test_the_command_line(colour_model_dir, folder, tmp_path):
    from mlflow_clip.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["predict", "-m", str(colour_model_dir), str(folder), "-o", str(tmp_path / "o.parquet")])
    assert ok.exit_code == 0, ok.output
    assert "8 images into" in ok.output and "6 scored, 2 failed" in ok.output and "images/s" in ok.output
    bad = runner.invoke(cli, ["predict", "-m", str(colour_model_dir), str(folder), "-o", str(tmp_path / "o.txt")])
    assert bad.exit_code == 2 and "expected a file ending in one of" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(cli, ["predict", "-m", str(colour_model_dir), str(tmp_path / "nope"), "-o", "x.parquet"])
    assert missing.exit_code == 2 and "No folder or file at" in missing.output
