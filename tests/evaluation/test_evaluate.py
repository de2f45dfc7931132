"""Zero-shot evaluation: label mapping, inputs, metric math, reports, MLflow runs and evaluators."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import BLOCK_TORCH, COLOUR_CLASSES, requires_export, solid, subprocess_env, using_store
from PIL import Image

import mlflow_clip
from mlflow_clip.evaluation import (
    EvaluationError,
    LabelledImage,
    evaluate_classifier,
    load_labelled_images,
    map_labels,
    run_evaluation,
    write_reports,
)
from mlflow_clip.evaluation.metrics import metric_keys
from mlflow_clip.evaluation.reports import CONFIDENT_ERRORS_PNG, CONFUSION_MATRIX_PNG
from mlflow_clip.evaluation.run import parse_registered_uri
from mlflow_clip.registry import ACCURACY_TAG
from mlflow_clip.serving.rows import format_predictions

DEMO_MIN_ACCURACY = 0.95


class FakeClassifier:
    """Answers from a table (image value -> probabilities in class order); unknown values fail
    to decode. Its output goes through the real `format_predictions`."""

    def __init__(self, classes: list[str], answers: dict[bytes, list[float]]):
        self.classes = classes
        self.answers = answers

    def predict(self, images, top_k=0, on_error="raise"):
        probabilities = np.full((len(images), len(self.classes)), np.nan, dtype=np.float32)
        errors = [None] * len(images)
        for i, image in enumerate(images):
            if image in self.answers:
                probabilities[i] = self.answers[image]
            else:
                errors[i] = "not a supported image"
        return format_predictions(probabilities, errors, self.classes, top_k, on_error)


def items_of(pairs):
    return [LabelledImage(f"row {i}", label, image) for i, (image, label) in enumerate(pairs)]


def write_colour_folder(root: Path, names=("red", "green", "blue"), per_class: int = 2) -> Path:
    for folder, colour in zip(names, COLOUR_CLASSES):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            solid(colour, (30 + 7 * i, 20 + 5 * i)).save(root / folder / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Labels and inputs


def test_labels_map_exactly_then_ignoring_case_then_ignoring_a_leading_article():
    classes = ["a red circle", "A Blue Square", "the cat", "dog"]
    mapping = map_labels(["a red circle", "a BLUE square", "red circle", "Blue Square", "cat", "a dog", "Dog"], classes)
    assert mapping == {
        "a red circle": "a red circle",
        "a BLUE square": "A Blue Square",
        "red circle": "a red circle",
        "Blue Square": "A Blue Square",
        "cat": "the cat",
        "a dog": "dog",
        "Dog": "dog",
    }


def test_unmatched_labels_are_one_error_listing_them_and_the_classes():
    with pytest.raises(EvaluationError) as error:
        map_labels(["red circle", "purple hexagon", "cat"], ["a red circle", "a blue square"], source="/data/val")
    message = str(error.value)
    assert "2 label(s) in /data/val" in message
    assert "'purple hexagon', 'cat'" in message
    assert "'a red circle', 'a blue square'" in message


def test_a_label_matching_two_classes_is_not_guessed():
    assert map_labels(["a cat"], ["a cat", "the cat"]) == {"a cat": "a cat"}
    with pytest.raises(EvaluationError, match="'cat'"):
        map_labels(["cat"], ["a cat", "the cat"])


def test_folder_input_one_subfolder_per_class(tmp_path):
    root = write_colour_folder(tmp_path / "val", names=("Red", "the green", "BLUE"))
    (root / "Red" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    items = load_labelled_images(root, COLOUR_CLASSES)
    assert [(item.name, item.label) for item in items] == [
        ("BLUE/0.png", "blue"),
        ("BLUE/1.png", "blue"),
        ("Red/0.png", "red"),
        ("Red/1.png", "red"),
        ("the green/0.png", "green"),
        ("the green/1.png", "green"),
    ]
    assert items[0].read() == (root / "BLUE" / "0.png").read_bytes()


def test_folder_with_an_unknown_class_fails_before_scoring(tmp_path):
    root = write_colour_folder(tmp_path / "val", names=("red", "green", "purple"))
    with pytest.raises(EvaluationError, match=r"'purple'.*'red', 'green', 'blue'"):
        load_labelled_images(root, COLOUR_CLASSES)


def test_csv_input_resolves_relative_paths_against_the_csv_folder(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    solid("red").save(tmp_path / "data" / "images" / "r.png")
    solid("blue").save(tmp_path / "elsewhere.png")
    csv = tmp_path / "data" / "labels.csv"
    csv.write_text(f"path,label\nimages/r.png,Red\n{tmp_path / 'elsewhere.png'},the blue\n")
    items = load_labelled_images(csv, COLOUR_CLASSES)
    assert [(item.name, item.label) for item in items] == [
        ("images/r.png", "red"),
        (str(tmp_path / "elsewhere.png"), "blue"),
    ]
    assert items[0].source == (tmp_path / "data" / "images" / "r.png")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("file,class\na.png,red\n", "expected 'path' and 'label'"),
        ("path,label\na.png,\n", "empty path or label on line"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path, text, expected):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(EvaluationError, match=expected):
        load_labelled_images(csv, COLOUR_CLASSES)


def test_data_that_is_neither_folder_nor_csv(tmp_path):
    with pytest.raises(EvaluationError, match="expected a folder with one subfolder of images per class"):
        load_labelled_images(tmp_path / "missing", COLOUR_CLASSES)


def test_registered_uris_are_recognised():
    assert parse_registered_uri("models:/clip/3") == ("clip", "3", None)
    assert parse_registered_uri("models:/clip@production") == ("clip", None, "production")
    assert parse_registered_uri("runs:/abc/model") is None
    assert parse_registered_uri("models:/m-0123456789abcdef") is None


# ---------------------------------------------------------------------------------------------
# Metrics, by hand


def test_metrics_match_a_hand_computed_case():
    classes = ["cat", "dog", "bird", "fish"]  # "fish" never occurs and is never predicted
    p = {
        "cat": [0.7, 0.2, 0.1, 0.0],
        "dog": [0.3, 0.6, 0.1, 0.0],
        "bird": [0.1, 0.2, 0.7, 0.0],
        "cat+": [0.8, 0.1, 0.1, 0.0],
    }
    pairs = [(b"1", "cat"), (b"2", "cat"), (b"3", "dog"), (b"4", "dog"), (b"5", "bird"), (b"6", "bird")]
    answers = {b"1": p["cat"], b"2": p["dog"], b"3": p["dog"], b"4": p["dog"], b"5": p["cat+"], b"6": p["bird"]}
    evaluation = evaluate_classifier(FakeClassifier(classes, answers), items_of(pairs), batch_size=4, progress=False)

    # true cat -> cat, dog; true dog -> dog, dog; true bird -> cat, bird
    np.testing.assert_array_equal(evaluation.confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert evaluation.accuracy_top1 == pytest.approx(4 / 6)
    assert (evaluation.top_k, evaluation.accuracy_top5) == (4, 1.0)  # top-5 capped at 4 classes
    precision = {"cat": 1 / 2, "dog": 2 / 3, "bird": 1 / 1}
    recall = {"cat": 1 / 2, "dog": 2 / 2, "bird": 1 / 2}
    f1 = {name: 2 * precision[name] * recall[name] / (precision[name] + recall[name]) for name in precision}
    assert f1 == pytest.approx({"cat": 0.5, "dog": 0.8, "bird": 2 / 3})
    assert evaluation.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # fish is left out
    metrics = evaluation.metrics()
    for name in precision:
        assert metrics[f"precision_{name}"] == pytest.approx(precision[name])
        assert metrics[f"recall_{name}"] == pytest.approx(recall[name])
    assert "precision_fish" not in metrics and metrics["failed_images"] == 0.0
    table = evaluation.predictions
    assert list(table.columns) == ["path", "true_label", "predicted_label", "score", "correct", "in_top_k", "error"]
    assert list(table["correct"]) == [True, False, True, True, False, True]
    np.testing.assert_allclose(table["score"], [0.7, 0.6, 0.6, 0.6, 0.8, 0.7], atol=1e-6)


def test_metrics_agree_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    classes = [f"class {i}" for i in range(7)]
    truth = rng.integers(0, 6, 200)  # class 6 never occurs in the truth
    answers = {str(i).encode(): rng.dirichlet(np.ones(7)).tolist() for i in range(200)}
    items = items_of([(str(i).encode(), classes[t]) for i, t in enumerate(truth)])
    evaluation = evaluate_classifier(FakeClassifier(classes, answers), items, progress=False)
    predicted = [classes[int(np.argmax(answers[str(i).encode()]))] for i in range(200)]
    true = [classes[t] for t in truth]
    assert evaluation.accuracy_top1 == pytest.approx(sklearn_metrics.accuracy_score(true, predicted))
    assert evaluation.macro_f1 == pytest.approx(
        sklearn_metrics.f1_score(true, predicted, average="macro", zero_division=0)
    )
    precision, recall, _, _ = sklearn_metrics.precision_recall_fscore_support(
        true, predicted, labels=classes, zero_division=0
    )
    np.testing.assert_allclose(evaluation.per_class["precision"], precision, atol=1e-12)
    np.testing.assert_allclose(evaluation.per_class["recall"], recall, atol=1e-12)
    np.testing.assert_array_equal(
        evaluation.confusion, sklearn_metrics.confusion_matrix(true, predicted, labels=classes)
    )
    scores = np.array([answers[str(i).encode()] for i in range(200)])
    assert evaluation.accuracy_top5 == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(truth, scores, k=5, labels=list(range(7)))
    )


def test_top5_counts_the_true_class_among_the_five_best():
    classes = [f"c{i}" for i in range(6)]
    answers = {
        b"last": [0.01, 0.3, 0.25, 0.2, 0.14, 0.1],  # true c0 ranked 6th of 6
        b"second": [0.5, 0.3, 0.1, 0.05, 0.03, 0.02],  # true c1 ranked 2nd
    }
    evaluation = evaluate_classifier(
        FakeClassifier(classes, answers), items_of([(b"last", "c0"), (b"second", "c1")]), progress=False
    )
    assert (evaluation.top_k, evaluation.accuracy_top1, evaluation.accuracy_top5) == (5, 0.0, 0.5)
    assert list(evaluation.predictions["in_top_k"]) == [False, True]


def test_a_failed_image_is_counted_listed_and_not_fatal():
    classes = ["cat", "dog"]
    answers = {b"cat": [0.9, 0.1], b"dog": [0.2, 0.8]}
    pairs = [(b"cat", "cat"), (b"garbage", "cat"), (b"dog", "dog")]
    evaluation = evaluate_classifier(FakeClassifier(classes, answers), items_of(pairs), progress=False)
    assert evaluation.failed == [{"path": "row 1", "reason": "not a supported image"}]
    assert (evaluation.num_images, evaluation.num_scored, evaluation.accuracy_top1) == (3, 2, 1.0)
    assert evaluation.metrics()["failed_images"] == 1.0
    row = evaluation.predictions.iloc[1]
    assert row["predicted_label"] is None and not row["correct"] and row["error"] == "not a supported image"


def test_when_no_image_can_be_scored_the_error_says_why():
    with pytest.raises(EvaluationError, match="None of the 2 images could be scored.*row 0: not a supported image"):
        evaluate_classifier(FakeClassifier(["a", "b"], {}), items_of([(b"x", "a"), (b"y", "b")]), progress=False)


def test_metric_names_use_sanitized_class_names_or_indices():
    assert metric_keys(["a red circle", "A Blue-Square!"]) == ["a_red_circle", "a_blue_square"]
    assert metric_keys(["a cat", "a-cat"]) == ["0", "1"]  # would collide
    assert metric_keys(["猫", "dog"]) == ["0", "1"]  # would be empty


def test_progress_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: no tqdm
    evaluate_classifier(FakeClassifier(["a", "b"], {b"x": [1.0, 0.0]}), items_of([(b"x", "a")] * 3), batch_size=2)
    assert capsys.readouterr().err.endswith("\r[mlflow-clip] evaluated 3/3 images\n")


# ---------------------------------------------------------------------------------------------
# A real (torch-free) classifier: the hand-built colour model


def test_colour_model_with_a_broken_file_and_a_missing_file(colour_model_dir, tmp_path):
    root = write_colour_folder(tmp_path / "val")
    (root / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    classifier = mlflow_clip.load_model(str(colour_model_dir))
    items = load_labelled_images(root, classifier.classes)
    items.append(LabelledImage("gone.png", "red", tmp_path / "gone.png"))
    evaluation = evaluate_classifier(classifier, items, batch_size=3, progress=False)
    assert (evaluation.num_images, evaluation.num_scored, evaluation.accuracy_top1) == (8, 6, 1.0)
    failed = {f["path"]: f["reason"] for f in evaluation.failed}
    assert set(failed) == {"green/broken.png", "gone.png"}
    assert "could not read the file" in failed["gone.png"] and failed["green/broken.png"]


def test_reports_are_pngs_and_tables(colour_model_dir, tmp_path):
    classifier = mlflow_clip.load_model(str(colour_model_dir))
    items = load_labelled_images(write_colour_folder(tmp_path / "val"), classifier.classes)
    # label two red images as green, so there are confident errors to show
    items = [LabelledImage(i.name, "green", i.source) if i.label == "red" else i for i in items]
    evaluation = evaluate_classifier(classifier, items, progress=False)
    paths = write_reports(evaluation, tmp_path)
    for name in (CONFUSION_MATRIX_PNG, CONFIDENT_ERRORS_PNG):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    table = pd.read_csv(paths["predictions"])
    assert (~table["correct"]).sum() == 2
    assert json.loads(paths["failed_images"].read_text()) == []


def test_run_evaluation_logs_and_tags_the_registered_version(colour_onnx, tracking_uri, tmp_path):
    with mlflow.start_run():
        mlflow_clip.log_model(colour_onnx, name="model", registered_model_name="colours")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("colours", "candidate", "1")
    root = write_colour_folder(tmp_path / "val")
    result = run_evaluation("models:/colours@candidate", root, progress=False)

    run = client.get_run(result.run_id)
    assert run.data.params["model_uri"] == "models:/colours@candidate"
    assert run.data.params["model_version"] == "colours/1" and run.data.params["num_images"] == "6"
    assert run.data.metrics["accuracy_top1"] == 1.0 and run.data.metrics["accuracy_top5"] == 1.0
    assert run.data.metrics["precision_red"] == 1.0 and run.data.metrics["failed_images"] == 0.0
    artifacts = {f.path for f in client.list_artifacts(result.run_id)}
    assert {
        CONFUSION_MATRIX_PNG,
        CONFIDENT_ERRORS_PNG,
        "predictions.csv",
        "predictions.json",
        "failed_images.json",
    } <= artifacts
    tags = client.get_model_version("colours", "1").tags
    assert tags[ACCURACY_TAG] == "1.000000" and tags["eval_run_id"] == result.run_id
    assert tags["eval_images"] == "6" and tags["eval_data"] == str(root) and tags["eval_accuracy_top5"] == "1.000000"

    unregistered = run_evaluation("models:/colours/1", root, registered=False, progress=False)
    assert client.get_model_version("colours", "1").tags["eval_run_id"] == result.run_id
    assert unregistered.model_version is None


def test_inside_mlflow_run_the_entry_point_params_are_kept(colour_onnx, tracking_uri, tmp_path, capsys):
    """`mlflow run` logs the entry point's parameters first (shell-quoted); the job must not
    try to change them, and the command prints a summary."""
    from mlflow_clip.evaluation import evaluate_command_impl

    with mlflow.start_run():
        info = mlflow_clip.log_model(colour_onnx, name="model")
    root = write_colour_folder(tmp_path / "val")
    with mlflow.start_run() as run:
        mlflow.log_params({"model_uri": info.model_uri, "data": "val", "reference": "''"})
        evaluate_command_impl(info.model_uri, str(root), "")
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert (params["data"], params["reference"], params["num_images"]) == ("val", "''", "6")
    assert "top-1 100.00%, top-3 100.00%, macro F1 1.0000 on 6 images (0 failed)" in capsys.readouterr().out


def test_evaluation_never_imports_torch(colour_model_dir, tmp_path):
    root = write_colour_folder(tmp_path / "val")
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import mlflow_clip
        from mlflow_clip.evaluation import evaluate_classifier, load_labelled_images, write_reports
        import mlflow_clip.evaluation.plugin
        classifier = mlflow_clip.load_model({str(colour_model_dir)!r})
        items = load_labelled_images({str(root)!r}, classifier.classes)
        evaluation = evaluate_classifier(classifier, items, progress=False)
        write_reports(evaluation, {str(tmp_path)!r})
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ACCURACY", evaluation.accuracy_top1)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACCURACY 1.0" in result.stdout


def test_inference_params_is_only_for_endpoints_in_this_mlflow():
    """Why the default-evaluator test passes a callable: MLflow 3.x refuses inference_params for
    model URIs (it raises before loading anything). If this starts failing, MLflow now forwards
    inference_params to pyfunc models and the callable can go."""
    with pytest.raises(mlflow.exceptions.MlflowException, match="inference_params"):
        mlflow.models.evaluate(
            "models:/any/1",
            pd.DataFrame({"image": [b""], "label": ["x"]}),
            model_type="classifier",
            targets="label",
            inference_params={"output": "label"},
        )


# ---------------------------------------------------------------------------------------------
# The demo model, end to end


@contextmanager
def demo_store(demo_registry, tmp_path):
    """The session's demo registry as tracking store, with an experiment whose artifacts go
    under tmp_path; the previous tracking and registry URIs are restored afterwards."""
    uri, model_uri = demo_registry
    with using_store(uri):
        experiment = mlflow.create_experiment(
            f"evaluate-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        yield model_uri, experiment


def demo_frame(n_per_class: int, seed: int, tmp_path: Path) -> pd.DataFrame:
    """Image bytes and labels of freshly drawn demo images (varied sizes); labels without the
    article, in upper case, so the plugin's label mapping is exercised too."""
    from mlflow_clip.demo_data import write_image_folder

    root = write_image_folder(tmp_path / "frame", n_per_class, seed=seed, size=None)
    files = sorted(root.glob("*/*.png"))
    return pd.DataFrame({"image": [p.read_bytes() for p in files], "label": [p.parent.name[2:].upper() for p in files]})


@pytest.mark.slow
@requires_export
def test_demo_end_to_end_on_a_generated_folder(demo_registry, tmp_path, monkeypatch):
    from mlflow_clip.demo_data import write_image_folder

    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "val", 20, seed=20240, size=None)
    with demo_store(demo_registry, tmp_path) as (model_uri, experiment):
        with mlflow.start_run(experiment_id=experiment):
            result = run_evaluation(model_uri, root, progress=False)
        client = mlflow.MlflowClient()
        artifacts = {f.path for f in client.list_artifacts(result.run_id)}
        name, version = model_uri.split("/")[-2:]
        tags = client.get_model_version(name, version).tags
    evaluation = result.evaluation
    assert evaluation.num_images == 180 and evaluation.failed == []
    assert evaluation.accuracy_top1 >= DEMO_MIN_ACCURACY, (
        f"top-1 {evaluation.accuracy_top1:.4f}\n{evaluation.per_class}"
    )
    assert evaluation.accuracy_top5 >= evaluation.accuracy_top1
    assert {CONFUSION_MATRIX_PNG, CONFIDENT_ERRORS_PNG} <= artifacts
    assert float(tags[ACCURACY_TAG]) == pytest.approx(evaluation.accuracy_top1, abs=1e-6)
    assert tags["eval_run_id"] == result.run_id and tags["eval_images"] == "180"


@pytest.fixture()
def clip_evaluator_registered():
    """The plugin as the entry point registers it once the package is installed; registered
    in-process when this checkout's metadata predates the entry point."""
    from importlib.metadata import entry_points

    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    from mlflow_clip.evaluation.plugin import ClipZeroShotEvaluator, register_evaluator

    installed = [ep for ep in entry_points(group="mlflow.model_evaluator") if ep.name == "clip-zero-shot"]
    if installed:
        assert installed[0].load() is ClipZeroShotEvaluator
    register_evaluator()
    assert _model_evaluation_registry.is_registered("clip-zero-shot")


@pytest.mark.slow
@requires_export
def test_mlflow_evaluate_with_the_plugin_and_with_no_evaluator_named(
    demo_registry, tmp_path, monkeypatch, clip_evaluator_registered
):
    monkeypatch.chdir(tmp_path)
    data = demo_frame(6, seed=777, tmp_path=tmp_path)
    with demo_store(demo_registry, tmp_path) as (model_uri, experiment):
        with mlflow.start_run(experiment_id=experiment) as run:
            ours = mlflow.models.evaluate(
                model_uri,
                data,
                model_type="classifier",
                targets="label",
                evaluators=["clip-zero-shot"],
                evaluator_config={"clip-zero-shot": {"progress": False}},
            )
        artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}

        # The ordinary call, no evaluators named: MLflow's classifier metrics (its labels must be
        # the class names exactly) and the project's evaluator beside them.
        labels = data.assign(label=["a " + label.lower() for label in data["label"]])
        with mlflow.start_run(experiment_id=experiment):
            default = mlflow.models.evaluate(model_uri, labels, model_type="classifier", targets="label")
        with mlflow.start_run(experiment_id=experiment):
            by_label = mlflow.models.evaluate(
                model_uri, labels, model_type="classifier", targets="label", predictions="label"
            )
    assert ours.metrics["accuracy_top1"] >= DEMO_MIN_ACCURACY
    assert ours.metrics["failed_images"] == 0.0 and "precision_a_red_circle" in ours.metrics
    assert {"confusion_matrix", "most_confident_errors", "predictions"} <= set(ours.artifacts)
    assert {CONFUSION_MATRIX_PNG, CONFIDENT_ERRORS_PNG, "predictions.json"} <= artifacts
    assert default.metrics["accuracy_score"] == pytest.approx(ours.metrics["accuracy_top1"])
    assert default.metrics["accuracy_top1"] == pytest.approx(ours.metrics["accuracy_top1"])
    assert default.metrics["example_count"] == len(data) and "roc_auc" in default.metrics
    # predictions="label" names the output column MLflow reads: the same metrics
    assert by_label.metrics["accuracy_score"] == pytest.approx(default.metrics["accuracy_score"])
    assert by_label.metrics["f1_score"] == pytest.approx(default.metrics["f1_score"])
    assert by_label.metrics["accuracy_top1"] == pytest.approx(ours.metrics["accuracy_top1"])


@pytest.mark.slow
@requires_export
def test_reference_pytorch_pipeline_agrees_with_onnx(demo_registry, tmp_path, monkeypatch):
    from mlflow_clip.demo_data import write_image_folder

    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "val", 4, seed=99, size=None)
    with demo_store(demo_registry, tmp_path) as (model_uri, experiment):
        with mlflow.start_run(experiment_id=experiment):
            result = run_evaluation(model_uri, root, reference="demo", registered=False, progress=False)
        metrics = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert result.reference is not None and result.reference.num_scored == 36
    assert abs(metrics["accuracy_diff_vs_reference"]) <= 0.02
    assert metrics["reference_accuracy_top1"] == pytest.approx(result.reference.accuracy_top1)
    assert metrics["reference_top1_agreement"] >= 0.97


# ---------------------------------------------------------------------------------------------
# The ordinary `mlflow.models.evaluate` call: MLflow's own classifier metrics, and ours


def _colour_frame(classes: list[str], per_class: int = 3) -> pd.DataFrame:
    images, labels = [], []
    for name, colour in zip(classes, COLOUR_CLASSES):
        for i in range(per_class):
            buffer = io.BytesIO()
            solid(colour, (30 + 7 * i, 20 + 5 * i)).save(buffer, "PNG")
            images.append(buffer.getvalue())
            labels.append(name)
    return pd.DataFrame({"image": images, "label": labels})


@pytest.mark.parametrize("predictions", [None, "label"])
def test_the_ordinary_evaluate_call_gives_mlflows_classifier_metrics(colour_model_dir, tracking_uri, predictions):
    """No evaluators named: MLflow's classifier evaluator reads the label column and the
    probabilities, and the clip-zero-shot evaluator adds its own metrics beside them."""
    classes = mlflow_clip.load_model(str(colour_model_dir)).classes
    data = _colour_frame(classes)
    data.loc[0, "label"] = classes[1]  # one wrong answer, so the metrics are not all 1.0
    with mlflow.start_run():
        result = mlflow.models.evaluate(
            str(colour_model_dir), data, model_type="classifier", targets="label", predictions=predictions
        )
    metrics = result.metrics
    assert metrics["example_count"] == len(data)
    assert metrics["accuracy_score"] == pytest.approx((len(data) - 1) / len(data))
    assert metrics["accuracy_top1"] == pytest.approx(metrics["accuracy_score"])  # the project's evaluator ran too
    assert {"f1_score", "precision_score", "recall_score", "log_loss", "roc_auc"} <= set(metrics)
    assert np.isfinite(metrics["log_loss"])
