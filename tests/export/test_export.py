"""The export job: graph conventions, parity gates, what the run records, full-size models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import requires_export

pytestmark = requires_export

FOUR = ["a red circle", "a green square", "a blue triangle", "a red square"]
MEANS_255 = [122.77, 116.75, 104.09]
STDS_255 = [68.5, 66.63, 70.32]


def test_edge_conventions_and_metadata(demo_built):
    import onnx

    model = onnx.load(str(demo_built.edge_path))
    graph = model.graph
    assert [i.name for i in graph.input] == ["image-"]
    classes = demo_built.config.classes
    assert [o.name for o in graph.output] == ["scores-" + ";".join(f"{i}:{c}" for i, c in enumerate(classes))]
    assert json.loads(graph.doc_string) == {"means": MEANS_255, "vars": STDS_255}
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == classes
    assert props["clip_model"] == "demo" and props["templates"] == "ensemble"
    assert json.loads(props["input_resolution"]) == 64
    assert json.loads(props["logit_scale"]) == pytest.approx(demo_built.config.logit_scale)
    assert {"mean", "std", "torch_version", "clip_version", "onnx_version"} <= set(props)
    assert props["clip_version"] and props["torch_version"] and props["onnx_version"] == onnx.__version__
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    # one self-contained file: no tensor points at external data, no side file
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    files = [demo_built.onnx_path, demo_built.edge_path, demo_built.text_encoder_path]
    assert sorted(os.listdir(demo_built.onnx_path.parent)) == sorted(p.name for p in files)


def test_served_graph_is_the_edge_graph_plus_the_embedding(demo_built):
    """One visual graph per file: the served graph adds the normalized embedding as a second
    output; the weights are the edge file's, byte for byte."""
    import onnx

    served, edge = onnx.load(str(demo_built.onnx_path)), onnx.load(str(demo_built.edge_path))
    assert [o.name for o in served.graph.output] == [edge.graph.output[0].name, "embedding"]
    assert [i.name for i in served.graph.input] == ["image-"]
    assert sorted(t.SerializeToString() for t in served.graph.initializer) == sorted(
        t.SerializeToString() for t in edge.graph.initializer
    )
    assert served.metadata_props == edge.metadata_props
    assert demo_built.config.embedding_output == "embedding" and demo_built.config.embedding_dim == 64


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(demo_built, batch):
    import onnxruntime as ort

    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64), dtype=np.float32)
    edge = ort.InferenceSession(str(demo_built.edge_path), providers=["CPUExecutionProvider"])
    (probs,) = edge.run(None, {"image-": x})
    assert probs.shape == (batch, 9)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    served = ort.InferenceSession(str(demo_built.onnx_path), providers=["CPUExecutionProvider"])
    served_probs, embedding = served.run(None, {"image-": x})
    np.testing.assert_allclose(served_probs, probs, atol=1e-6)
    assert embedding.shape == (batch, 64)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_export_run_records_everything_and_registers(tracking_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.job import export_and_register

    result = export_and_register(
        FOUR, model="demo", templates="photo", registered_model_name="clip-demo", alias="challenger"
    )
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-4
    assert metrics["parity_top1_agreement"] == 1.0
    assert metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_max_abs_logit_diff"] < 1e-2
    assert metrics["export_seconds"] > 0 and metrics["onnx_size_mb"] > 0
    params = run.data.params
    assert params["model"] == "demo" and params["templates"] == "photo" and json.loads(params["class_names"]) == FOUR
    assert params["max_prob_diff"] == "0.0001" and params["alias"] == "challenger"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"classes.json", "parity_report.json", "parity.png", "onnx"} <= artifacts
    version = client.get_model_version("clip-demo", result.model_version)
    assert version.tags["clip_model"] == "demo" and version.tags["templates"] == "photo"
    assert version.tags["num_classes"] == "4" and version.tags["parity_status"] == "passed"
    assert version.tags["onnx_sha256"] == result.onnx_sha256
    assert str(client.get_model_version_by_alias("clip-demo", "challenger").version) == result.model_version
    classifier = mlflow.pyfunc.load_model("models:/clip-demo@challenger").get_raw_model()
    assert classifier.classes == FOUR


def test_a_broken_export_is_refused_and_nothing_is_registered(tracking_uri, monkeypatch):
    import onnx
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export import job
    from mlflow_clip.export.graph import save_single_file, simplify_onnx
    from mlflow_clip.export.parity import ParityError

    def simplify_then_break(path):
        """A faulty export step: it perturbs one weight tensor of the graph."""
        result = simplify_onnx(path)
        model = onnx.load(str(path))
        biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(biggest).copy()
        values *= 1.5
        biggest.CopyFrom(onnx.numpy_helper.from_array(values, biggest.name))
        save_single_file(model, path)
        return result

    monkeypatch.setattr(job, "simplify_onnx", simplify_then_break)
    with pytest.raises(ParityError, match="parity_max_abs_prob_diff = .* exceeds max_prob_diff = 0.0001"):
        job.export_and_register(FOUR, model="demo", templates="none", registered_model_name="clip-demo")
    client = MlflowClient()
    assert client.search_model_versions("name='clip-demo'") == []
    run = client.search_runs(["0"])[0]
    assert run.info.status == "FAILED" and run.data.tags["parity_status"] == "failed"
    assert run.data.metrics["parity_max_abs_prob_diff"] > 1e-4


def test_opset_12_of_the_original_guide_still_exports(tmp_path):
    from mlflow_clip.export.job import build_classifier, check_parity
    from mlflow_clip.export.parity import ParityThresholds

    built = build_classifier(FOUR, model="demo", templates="none", opset=12, out_dir=tmp_path)
    import onnx

    assert onnx.load(str(built.onnx_path)).opset_import[0].version == 12
    report, failures = check_parity(built, None, ParityThresholds())
    assert failures == [] and report.max_abs_prob_diff <= 1e-5


def test_named_model_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    from mlflow_clip.export.checkpoints import CheckpointError, load_clip

    monkeypatch.setenv("MLFLOW_CLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("urllib.request.urlopen", _offline)
    with pytest.raises(CheckpointError, match=r"-P model=/path/to/RN50.pt"):
        load_clip("RN50")


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("network is unreachable")


def test_unknown_model_lists_the_choices(tmp_path):
    from mlflow_clip.export.checkpoints import CheckpointError, load_clip

    with pytest.raises(CheckpointError, match="RN50.*demo"):
        load_clip(str(tmp_path / "missing.pt"))


def test_demo_onnx_classifier_is_accurate_on_fresh_images_of_any_size(demo_model_dir):
    """>= 95% top-1 through the served path (encoded bytes -> torch-free preprocessing -> ONNX)."""
    from helpers import encode

    import mlflow_clip
    from mlflow_clip.demo_data import DEMO_CLASSES, draw_image

    rng = np.random.default_rng(2024)
    images, truth = [], []
    for i in range(270):
        name = DEMO_CLASSES[i % 9]
        _, colour, shape = name.split()
        size = (int(rng.integers(40, 700)), int(rng.integers(40, 700)))
        images.append(encode(draw_image(colour, shape, size=size, rng=rng), "PNG" if i % 2 else "JPEG"))
        truth.append(name)
    predicted = mlflow_clip.load_model(str(demo_model_dir)).predict(images)["label"]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    assert accuracy >= 0.95, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["RN50", "ViT-B/32"])
def test_full_size_random_weights_reach_parity(architecture, tracking_uri, tmp_path):
    """Published dimensions, random weights, logit scale 100, through the checkpoint-path code."""
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.checkpoints import save_random_checkpoint
    from mlflow_clip.export.job import export_and_register

    checkpoint = save_random_checkpoint(architecture, tmp_path / f"{architecture.replace('/', '-')}.pt")
    result = export_and_register(
        ["a person", "a car", "a dog", "a cat"],
        model=str(checkpoint),
        templates="photo",
        registered_model_name="random-clip",
    )
    assert result.parity.max_abs_prob_diff <= 1e-5
    assert result.parity.max_abs_pixel_diff == 0.0
    assert result.parity.top1_agreement == 1.0
    assert result.metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    assert result.metrics["parity_max_abs_embedding_diff"] <= 1e-5
    assert result.metrics["parity_token_mismatches"] == 0
    tags = MlflowClient().get_model_version("random-clip", result.model_version).tags
    assert tags["parity_status"] == "passed" and tags["text_encoder"] == "true"
    _per_request_labels_match_the_baked_ones(result.model_uri, ["a person", "a car", "a dog", "a cat"], "photo")


def _per_request_labels_match_the_baked_ones(model_uri, classes, templates):
    import mlflow
    import pandas as pd

    from mlflow_clip.package_data import sample_image_paths

    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in sample_image_paths()]})
    baked = np.array(model.predict(frame)["probabilities"].tolist())
    per_request = np.array(
        model.predict(frame, params={"classes": classes, "templates": templates})["probabilities"].tolist()
    )
    assert np.abs(per_request - baked).max() <= 1e-5
    embeddings = np.array(model.predict(frame, params={"output": "embedding"})["embedding"].tolist())
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_onnxsim_failure_keeps_the_unsimplified_graph_and_says_why(tmp_path, monkeypatch):
    import onnxsim

    from mlflow_clip.export.job import build_classifier, check_parity
    from mlflow_clip.export.parity import ParityThresholds

    def broken_simplify(model, *args, **kwargs):
        raise RuntimeError("shape inference exploded")

    monkeypatch.setattr(onnxsim, "simplify", broken_simplify)
    built = build_classifier(FOUR, model="demo", templates="none", out_dir=tmp_path)
    assert not built.simplified and "shape inference exploded" in built.simplify_note
    report, failures = check_parity(built, None, ParityThresholds())
    assert failures == [] and report.max_abs_prob_diff <= 1e-5


def test_a_graph_protobuf_cannot_hold_is_refused_in_words_and_nothing_is_written(tmp_path, monkeypatch):
    import onnx

    from mlflow_clip.export import graph
    from mlflow_clip.export.spec import SpecError

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    graph.save_single_file(model, tmp_path / "small.onnx")
    assert onnx.load(str(tmp_path / "small.onnx")) == model
    monkeypatch.setattr(graph, "_TWO_GIB", len(model.SerializeToString()))  # the limit, scaled down to this graph
    with pytest.raises(SpecError, match="2 GB or larger"):
        graph.save_single_file(model, tmp_path / "large.onnx")
    assert not (tmp_path / "large.onnx").exists()
