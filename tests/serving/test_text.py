"""Labels chosen per request and embeddings: CLIP's text encoder served without torch."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
from helpers import (
    BLOCK_TORCH,
    demo_image_bytes,
    free_port,
    requires_export,
    start_server,
    stop_process,
    subprocess_env,
    wait_for_http,
)

pytestmark = requires_export

# The demo model's 9 classes are colour x shape; these images are 2 of each of 6 of them.
IMAGES = [
    (name, fmt)
    for name in (
        "a red circle",
        "a green square",
        "a blue triangle",
        "a red triangle",
        "a green circle",
        "a blue square",
    )
    for fmt in ("PNG", "JPEG")
]
TOLERANCE = 1e-5  # per-request probabilities against the baked graph's, same classes and templates


@pytest.fixture(scope="module")
def model(demo_model_dir):
    import mlflow

    return mlflow.pyfunc.load_model(str(demo_model_dir))


@pytest.fixture(scope="module")
def frame():
    return pd.DataFrame({"image": [data for data, _ in demo_image_bytes(IMAGES)]})


def _probabilities(out: pd.DataFrame) -> np.ndarray:
    return np.array(out["probabilities"].tolist())


def test_per_request_labels_match_the_baked_classes(model, frame, demo_built):
    """Same classes, same templates: the text encoder + numpy head give the baked probabilities."""
    baked = model.predict(frame)
    per_request = model.predict(frame, params={"classes": list(demo_built.config.classes)})
    assert list(per_request.columns) == list(baked.columns)
    assert list(per_request["label"]) == list(baked["label"]) == [name for name, _ in IMAGES]
    assert np.abs(_probabilities(per_request) - _probabilities(baked)).max() <= TOLERANCE


def test_labels_the_model_was_not_exported_with(model, frame):
    """Colour-only labels (never baked) still classify the demo images by colour, with top_k."""
    out = model.predict(frame, params={"classes": ["red", "green", "blue"], "templates": "a {} shape.", "top_k": 2})
    assert list(out["label"]) == [name.split()[1] for name, _ in IMAGES]
    assert all(len(labels) == 2 and labels[0] == label for labels, label in zip(out["top_labels"], out["label"]))
    np.testing.assert_allclose(_probabilities(out).sum(axis=1), 1.0, atol=1e-5)


def test_a_repeated_label_set_costs_no_text_encoder_run(demo_model_dir, frame):
    import mlflow_clip

    classifier = mlflow_clip.load_model(str(demo_model_dir))
    encoder = classifier.text_encoder
    assert encoder.runs == 0  # loading a model never runs (or even loads) the text encoder
    first = classifier.predict(frame, classes=["a circle", "a square", "a triangle"], templates="photo")
    runs = encoder.runs
    assert runs >= 1
    again = classifier.predict(frame, classes=["a circle", "a square", "a triangle"], templates="photo")
    assert encoder.runs == runs
    pd.testing.assert_frame_equal(first, again)
    classifier.predict(frame, classes=["a circle", "a square", "a triangle"], templates="none")
    assert encoder.runs > runs  # other templates are another label set


def test_image_embeddings_are_normalized_and_match_the_graph(model, frame, demo_built):
    import onnxruntime as ort

    from mlflow_clip.serving.images import decode_image
    from mlflow_clip.serving.preprocess import Preprocessor

    out = model.predict(frame, params={"output": "embedding"})
    assert list(out.columns) == ["embedding", "error"]
    embeddings = np.array(out["embedding"].tolist())
    assert embeddings.shape == (len(IMAGES), demo_built.config.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    pixels = Preprocessor(64).batch([decode_image(data) for data in frame["image"]])
    session = ort.InferenceSession(str(demo_built.onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(["embedding"], {"image-": pixels})[0]
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)


def test_text_embeddings_back_image_search(model, frame):
    """A `text` column gives text embeddings in the image embeddings' space: each image's
    nearest class prompt is its own class."""
    names = [
        f"a photo of {name}."
        for name in (
            "a red circle",
            "a green square",
            "a blue triangle",
            "a red triangle",
            "a green circle",
            "a blue square",
        )
    ]
    texts = model.predict(pd.DataFrame({"text": names}))
    assert list(texts.columns) == ["embedding", "error"]
    text_embeddings = np.array(texts["embedding"].tolist())
    np.testing.assert_allclose(np.linalg.norm(text_embeddings, axis=1), 1.0, atol=1e-5)
    images = np.array(model.predict(frame, params={"output": "embedding"})["embedding"].tolist())
    nearest = (images @ text_embeddings.T).argmax(axis=1)
    assert [names[i] for i in nearest] == [f"a photo of {name}." for name, _ in IMAGES]


def test_text_encoder_matches_pytorch_through_the_served_path(model, demo_built):
    """The served text embeddings (torch-free tokenizer + ONNX) against clip.tokenize + PyTorch."""
    import clip
    import torch

    texts = ["a photo of a forklift.", "Is this a PALLET?", "caf\u00e9 \U0001f415 &amp; more", "long " * 90, ""]
    served = np.array(model.predict(pd.DataFrame({"text": texts}), params={"truncate": True})["embedding"].tolist())
    clip_model = demo_built.loaded.model
    with torch.no_grad():
        reference = clip_model.encode_text(clip.tokenize(texts, truncate=True)).float()
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(served - reference).max() <= 1e-5


@pytest.mark.parametrize(
    "params, message",
    [
        ({"classes": ["a cat", ""]}, "Class 1 .* is empty"),
        ({"classes": ["a cat", "A CAT"]}, "duplicates class 0"),
        ({"classes": ["a cat"], "templates": "@/etc/hosts"}, "placeholder"),  # a template, not a file
        ({"classes": ["a cat"], "templates": "a photo without a placeholder"}, "placeholder"),
        ({"classes": [f"class {i}" for i in range(1001)]}, "at most 1000"),
    ],
)
def test_bad_labels_are_refused_with_the_fix(model, frame, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as raised:
        model.predict(frame.head(1), params=params)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_labels_never_name_files(demo_model_dir, frame):
    import mlflow_clip

    classifier = mlflow_clip.load_model(str(demo_model_dir))
    out = classifier.predict(frame.head(1), classes="@/etc/passwd,red")  # served code reads no files
    assert set(out["label"]) <= {"@/etc/passwd", "red"}
    out = classifier.predict(frame.head(1), classes="red,green,blue", templates="a {} shape.")
    assert out["label"][0] == "red"


def test_text_and_images_in_one_request_are_refused(model, frame):
    from mlflow.exceptions import MlflowException

    mixed = frame.head(2).assign(text=["a cat", "a dog"])
    with pytest.raises(MlflowException, match="one kind per request"):
        model.predict(mixed)


def test_a_model_exported_without_the_text_encoder_says_how_to_get_it(tmp_path, demo_built, frame):
    import mlflow
    from mlflow.exceptions import MlflowException

    import mlflow_clip

    mlflow_clip.save_model(demo_built.onnx_path, tmp_path / "model")
    assert not (tmp_path / "model" / "text_encoder.onnx").exists()
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert list(model.predict(frame.head(2))["label"]) == [name for name, _ in IMAGES[:2]]
    assert len(model.predict(frame.head(2), params={"output": "embedding"})["embedding"][0]) == 64
    with pytest.raises(MlflowException, match="no text encoder.*text_encoder=true"):
        model.predict(frame.head(1), params={"classes": ["a cat", "a dog"]})


def test_export_without_the_text_encoder(tracking_uri):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.job import export_and_register

    result = export_and_register(
        ["a red circle", "a blue square"],
        model="demo",
        templates="photo",
        registered_model_name="no-text",
        text_encoder=False,
    )
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert "parity_max_abs_text_embedding_diff" not in run.data.metrics
    assert run.data.params["text_encoder"] == "False"
    assert client.get_model_version("no-text", result.model_version).tags["text_encoder"] == "false"
    files = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/model.onnx" in files and "model/text_encoder.onnx" not in files


def test_per_request_labels_and_text_without_torch(demo_model_dir, tmp_path):
    """The tokenizer and text encoder load from the model directory on a machine without torch."""
    data, _ = demo_image_bytes([("a blue square", "PNG")])[0]
    (tmp_path / "image.png").write_bytes(data)
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(demo_model_dir)!r})
        frame = pd.DataFrame({{"image": [open({str(tmp_path / "image.png")!r}, "rb").read()]}})
        out = model.predict(frame, params={{"classes": ["a square", "a circle"], "templates": "photo"}})
        texts = model.predict(pd.DataFrame({{"text": ["a blue square"]}}))
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("LABEL", out["label"][0], len(texts["embedding"][0]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LABEL a square 64" in result.stdout


@pytest.mark.slow
def test_mlflow_models_serve_takes_labels_and_text_in_params(demo_registry, tmp_path, model, frame):
    requests = pytest.importorskip("requests")
    tracking_uri, model_uri = demo_registry
    port = free_port()
    process = start_server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        tmp_path / "server.log",
        subprocess_env(MLFLOW_TRACKING_URI=tracking_uri),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", process)
        rows = [base64.b64encode(data).decode("ascii") for data in frame["image"]]
        labels = {"classes": ["red", "green", "blue"], "templates": "a {} shape."}
        response = requests.post(url + "/invocations", json={"inputs": {"image": rows}, "params": labels}, timeout=120)
        assert response.status_code == 200, response.text
        served = pd.DataFrame(response.json()["predictions"])
        local = model.predict(frame, params=labels)
        assert list(served["label"]) == list(local["label"]) == [name.split()[1] for name, _ in IMAGES]
        assert np.abs(np.array(served["probabilities"].tolist()) - _probabilities(local)).max() <= 1e-6

        body = {
            "dataframe_split": {"columns": ["image"], "data": [[r] for r in rows[:3]]},
            "params": {"output": "embedding"},
        }
        response = requests.post(url + "/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"][0]["embedding"]) == 64

        response = requests.post(url + "/invocations", json={"inputs": {"text": ["a red circle", "a dog"]}}, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 2

        bad = {"inputs": {"image": rows[:1]}, "params": {"classes": ["a cat", "a Cat"]}}
        response = requests.post(
            url + "/invocations", data=json.dumps(bad), headers={"Content-Type": "application/json"}, timeout=60
        )
        assert response.status_code == 400
        error = response.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "duplicates class 0" in error["message"]
        assert "stack_trace" not in error
        assert requests.get(url + "/ping", timeout=10).status_code == 200  # still serving
    finally:
        stop_process(process)


def test_tokenizing_many_prompts_stops_at_the_deadline(demo_model_dir):
    """20,000 prompts take about a second to tokenize: a deadline already past stops the work
    before the first slice, names what was being done and how to send less, and runs no encoder."""
    from mlflow_clip.serving.deadline import Deadline, DeadlineExceeded
    from mlflow_clip.serving.limits import InputLimits
    from mlflow_clip.serving.text import TOKENIZE_SLICE, TextEncoder

    encoder = TextEncoder(demo_model_dir / "text_encoder.onnx", demo_model_dir / "bpe_simple_vocab_16e6.txt.gz")
    texts = [f"prompt number {i}" for i in range(20_000)]
    limits = InputLimits(max_prompts=10**6, max_prompt_tokens=10**8, max_request_text_chars=10**8)
    with pytest.raises(DeadlineExceeded, match="while tokenizing prompts 0 to 19999.*fewer labels, templates or texts"):
        encoder.embed(texts, limits, deadline=Deadline(at=0.0, seconds=2.0))
    assert encoder.runs == 0
    with pytest.raises(DeadlineExceeded, match=f"while tokenizing prompts {2 * TOKENIZE_SLICE} to 19999"):
        # a deadline that passes during the third slice: slices before it were tokenized, nothing was encoded
        encoder.embed(texts, limits, deadline=_DeadlineAfterChecks(2))
    assert encoder.runs == 0


class _DeadlineAfterChecks:
    """A deadline that passes after `n` checks, so the test does not depend on the machine's speed."""

    def __init__(self, n: int):
        from mlflow_clip.serving.deadline import Deadline

        self.n, self.past = n, Deadline(at=0.0, seconds=2.0)

    def check(self, what: str, fix: str = "") -> None:
        self.n -= 1
        if self.n < 0:
            self.past.check(what, fix or "Send less")


def test_a_bad_text_in_a_later_slice_is_named_by_its_own_index(demo_model_dir):
    from mlflow_clip.serving.text import TOKENIZE_SLICE, TextEncoder
    from mlflow_clip.serving.tokenizer import TextInputError

    encoder = TextEncoder(demo_model_dir / "text_encoder.onnx", demo_model_dir / "bpe_simple_vocab_16e6.txt.gz")
    texts = ["a red circle"] * (TOKENIZE_SLICE + 5)
    texts[TOKENIZE_SLICE + 3] = 5
    with pytest.raises(TextInputError, match=f"Text {TOKENIZE_SLICE + 3} is a int"):
        encoder.embed(texts)


def test_every_copy_of_a_text_counts_toward_the_request_budget(demo_model_dir):
    """2,000 copies of one 988-letter word were counted as 988 characters, then all tokenized
    (about 190 CPU s before the tokenizer merged in O(n log n)): every copy counts now."""
    from mlflow_clip.serving.rows import InvalidInputError
    from mlflow_clip.serving.text import TextEncoder

    encoder = TextEncoder(demo_model_dir / "text_encoder.onnx", demo_model_dir / "bpe_simple_vocab_16e6.txt.gz")
    word = ("abcdefghijklmnopqrstuvwxyz" * 38)[:988]
    started = time.process_time()
    with pytest.raises(InvalidInputError, match=r"Received 1976000 characters .* \(max_request_text_chars\)"):
        encoder.embed([word] * 2000)
    assert time.process_time() - started < 0.5 and encoder.runs == 0


def test_9_labels_with_the_80_ensemble_templates_fit_the_default_budgets(demo_model_dir):
    """720 prompts of about 35 characters and 11 tokens: within `max_prompts`,
    `max_request_text_chars` and `max_prompt_tokens` (which 10 labels pass)."""
    from mlflow_clip.serving.prompts import TEMPLATE_PRESETS
    from mlflow_clip.serving.text import TextEncoder

    encoder = TextEncoder(demo_model_dir / "text_encoder.onnx", demo_model_dir / "bpe_simple_vocab_16e6.txt.gz")
    classes = [f"class number {i}" for i in range(9)]
    assert len(TEMPLATE_PRESETS["ensemble"]) == 80
    assert encoder.class_features(classes, TEMPLATE_PRESETS["ensemble"]).shape[0] == 9
