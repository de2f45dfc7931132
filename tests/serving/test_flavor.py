"""The mlflow_clip flavor: the model directory contract, inputs, outputs, errors, runtime."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import BLOCK_TORCH, COLOUR_CLASSES, encode, solid, subprocess_env
from mlflow.exceptions import MlflowException

import mlflow_clip

TOL = 1e-6


def test_mlmodel_carries_the_contract(colour_model_dir):
    mlmodel = yaml.safe_load((colour_model_dir / "MLmodel").read_text())
    conf = mlmodel["flavors"]["mlflow_clip"]
    assert conf["classes"] == COLOUR_CLASSES
    assert conf["input_resolution"] == 32
    assert conf["clip_model"] == "colour-test"
    assert conf["providers"] == ["CPUExecutionProvider"]
    assert len(conf["onnx_sha256"]) == 64
    assert set(conf) >= {"templates", "mean", "std", "opset", "logit_scale", "runtime", "limits"}
    pyfunc = mlmodel["flavors"]["python_function"]
    package = conf["serving_package"]
    assert package.startswith("mlflow_clip_serving_") and pyfunc["loader_module"] == f"{package}.loader"
    assert (colour_model_dir / pyfunc["code"] / package / "loader.py").exists()
    assert not (colour_model_dir / pyfunc["code"] / "mlflow_clip").exists()
    assert set(conf["manifest"]["files"]) >= {"model.onnx", "clip_classifier.json", f"code/{package}/classifier.py"}
    signature = mlmodel["signature"]
    assert json.loads(signature["inputs"]) == [
        {"type": "binary", "name": "image", "required": False},
        {"type": "string", "name": "text", "required": False},
    ]
    assert {p["name"] for p in json.loads(signature["params"])} >= {"top_k", "on_error"}


def test_requirements_are_serving_only(colour_model_dir):
    """mlflow-skinny, never full mlflow (whose pyarrow, scipy and scikit-learn serving never
    uses), and the serving libraries, each pinned to the version installed here; conda.yaml
    lists the same."""
    import importlib.metadata

    text = (colour_model_dir / "requirements.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert not any(line.startswith("-") for line in lines)  # plain requirements, as MLflow's tools expect
    pins = dict(line.lower().split("==") for line in lines)
    assert set(pins) == {"mlflow-skinny", "onnxruntime", "numpy", "pandas", "pillow", "simplejpeg", "ftfy", "regex"}
    assert pins == {name: importlib.metadata.version(name) for name in pins}
    assert pins["mlflow-skinny"] == mlflow.__version__
    conda = yaml.safe_load((colour_model_dir / "conda.yaml").read_text())
    assert next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)) == lines


def test_loading_here_warns_of_no_requirement_mismatch(colour_onnx, colour_model_dir, tmp_path, caplog):
    """This environment has full mlflow, which includes mlflow-skinny at its own version, so
    MLflow's requirement check at load has nothing to report; a model pinned to another
    mlflow-skinny gets the warning, so the check is live."""
    from mlflow_clip.flavor import get_default_pip_requirements

    elsewhere = [r for r in get_default_pip_requirements() if not r.startswith("mlflow-skinny")]
    mlflow_clip.save_model(colour_onnx, tmp_path / "elsewhere", pip_requirements=["mlflow-skinny==3.0.0", *elsewhere])
    with caplog.at_level(logging.WARNING, logger="mlflow"):
        caplog.clear()
        mlflow.pyfunc.load_model(str(colour_model_dir))
        assert "mismatches" not in caplog.text
        mlflow.pyfunc.load_model(str(tmp_path / "elsewhere"))
    assert f"mlflow-skinny (current: {mlflow.__version__}, required: mlflow-skinny==3.0.0)" in caplog.text


def test_save_model_checks_its_environment_arguments_first_and_records_its_size(
    colour_onnx, colour_model_dir, tmp_path
):
    """As MLflow's own flavors: `conda_env` with `pip_requirements` is refused before anything is
    written (MLflow would silently drop the requirements), and MLmodel records the model's size."""
    import yaml

    target = tmp_path / "both"
    with pytest.raises(ValueError, match="Only one of `conda_env`"):
        mlflow_clip.save_model(colour_onnx, target, conda_env={"dependencies": []}, pip_requirements=["numpy"])
    assert not target.exists()
    saved = tmp_path / "saved"
    mlflow_clip.save_model(colour_onnx, saved)
    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    files = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file() and f.name != "MLmodel")
    assert files <= mlmodel["model_size_bytes"] <= files + 200_000  # the directory, before MLmodel was written


def test_the_serving_install_covers_what_models_declare():
    """`pip install .` (setup.py's SERVING_REQUIRES) installs every package a model declares:
    full mlflow stands for mlflow-skinny, which it requires at its own version."""
    import ast
    import importlib.metadata

    from helpers import ROOT
    from packaging.requirements import Requirement

    from mlflow_clip.flavor import SERVING_REQUIREMENTS

    tree = ast.parse((ROOT / "setup.py").read_text())
    (serving,) = (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SERVING_REQUIRES"
    )
    installed = {Requirement(r).name.lower() for r in serving}
    assert set(SERVING_REQUIREMENTS) - {"mlflow-skinny"} <= installed and "mlflow" in installed
    assert f"mlflow-skinny=={mlflow.__version__}" in importlib.metadata.requires("mlflow")


def test_serving_code_in_model_is_complete(colour_model_dir):
    """The model carries the serving package whole, and that package imports only itself (relative
    imports), the standard library and the serving requirements: never mlflow_clip, never torch."""
    import ast
    from pathlib import Path

    from mlflow_clip.flavor import serving_package_dir, serving_package_files

    source = serving_package_dir()
    package = yaml.safe_load((colour_model_dir / "MLmodel").read_text())["flavors"]["mlflow_clip"]["serving_package"]
    copied = colour_model_dir / "code" / package
    carried = {p.name for p in serving_package_files()}
    assert {p.name for p in copied.iterdir()} == carried
    assert {p.name for p in source.glob("*.py")} | {"resample.c"} <= carried  # and the built binary, if any
    for name in carried:
        assert (copied / name).read_bytes() == (source / name).read_bytes()
    for path in source.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"mlflow_clip", "torch", "torchvision", "clip"}, f"{path.name} imports {name}"
    assert not Path(copied / "__pycache__").exists()


def test_native_classifier_predicts(colour_model_dir):
    classifier = mlflow_clip.load_model(str(colour_model_dir))
    assert classifier.classes == COLOUR_CLASSES
    out = classifier.predict([encode(solid("green")), encode(solid("red"), "JPEG")])
    assert list(out["label"]) == ["green", "red"]
    np.testing.assert_allclose([sum(p) for p in out["probabilities"]], 1.0, atol=1e-5)
    assert out["score"][0] == pytest.approx(max(out["probabilities"][0]), abs=TOL)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda imgs: pd.DataFrame({"image": imgs}),
        lambda imgs: {"image": imgs},
        lambda imgs: [{"image": i} for i in imgs],
        lambda imgs: pd.DataFrame({"image": [base64.b64encode(i).decode() for i in imgs]}),
        lambda imgs: pd.DataFrame({"image": [base64.b64encode(i) for i in imgs]}),
        lambda imgs: pd.DataFrame({"image": ["data:image/png;base64," + base64.b64encode(i).decode() for i in imgs]}),
    ],
    ids=["dataframe", "dict", "records", "b64-str", "b64-bytes", "data-uri"],
)
def test_pyfunc_accepts_every_input_form(colour_model_dir, make_input):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    images = [encode(solid(c)) for c in ("blue", "red", "green")]
    out = model.predict(make_input(images))
    assert list(out["label"]) == ["blue", "red", "green"]


def test_native_accepts_lists_and_decoded_arrays(colour_model_dir):
    classifier = mlflow_clip.load_model(str(colour_model_dir))
    images = [encode(solid("blue")), "data:image/png;base64," + base64.b64encode(encode(solid("red"))).decode()]
    assert list(classifier.predict(images)["label"]) == ["blue", "red"]
    arrays = [np.asarray(solid(c, (17, 23))) for c in ("red", "blue")]
    assert list(classifier.predict(arrays)["label"]) == ["red", "blue"]
    assert list(classifier.predict(np.stack([arrays[0], arrays[0]]))["label"]) == ["red", "red"]


def test_top_k_adds_ranked_columns(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    out = model.predict(pd.DataFrame({"image": [encode(solid("blue"))]}), params={"top_k": 2})
    assert out["top_labels"][0][0] == "blue" and len(out["top_labels"][0]) == 2
    probs = dict(zip(COLOUR_CLASSES, out["probabilities"][0]))
    np.testing.assert_allclose(out["top_scores"][0], [probs[c] for c in out["top_labels"][0]], atol=TOL)
    assert out["top_scores"][0][0] >= out["top_scores"][0][1]


def test_bad_row_raises_with_row_index_and_no_payload(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    payload = base64.b64encode(b"SECRET-PAYLOAD-" * 20).decode()
    frame = pd.DataFrame({"image": [encode(solid("red")), payload]})
    with pytest.raises(MlflowException) as info:
        model.predict(frame)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "row 1" in info.value.message
    assert "SECRET" not in info.value.message and payload[:20] not in info.value.message


def test_on_error_null_keeps_the_batch_going(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    frame = pd.DataFrame({"image": [encode(solid("red")), b"not an image", encode(solid("blue"))]})
    out = model.predict(frame, params={"on_error": "null"})
    assert list(out["label"]) == ["red", None, "blue"]
    assert out["error"][1] and out["error"][0] is None
    assert out["probabilities"][1] is None


def test_paths_and_urls_are_never_opened(colour_model_dir, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(solid("red")))
    classifier = mlflow_clip.load_model(str(colour_model_dir))
    for value in (str(secret), f"file://{secret}", "http://127.0.0.1:9/x.png"):
        out = classifier.predict([value], on_error="null")
        assert out["label"][0] is None
        assert "path or URL" in out["error"][0]


def test_rows_per_request_limit(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir), model_config={"max_rows": 2})
    with pytest.raises(MlflowException, match="at most 2"):
        model.predict(pd.DataFrame({"image": [encode(solid("red"))] * 3}))


def test_chunked_and_concurrent_predictions_agree(colour_model_dir):
    images = [encode(solid(c, (20 + i, 31))) for i, c in enumerate(["red", "green", "blue"] * 4)]
    whole = mlflow_clip.load_model(str(colour_model_dir)).predict(images)
    chunked_model = mlflow_clip.load_model(str(colour_model_dir), model_config={"chunk_size": 5})
    chunked = chunked_model.predict(images)
    np.testing.assert_allclose(np.stack(chunked["probabilities"]), np.stack(whole["probabilities"]), atol=TOL)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: chunked_model.predict(images), range(16)))
    for result in results:
        np.testing.assert_allclose(np.stack(result["probabilities"]), np.stack(whole["probabilities"]), atol=TOL)


def test_providers_are_filtered_and_logged(colour_onnx, tmp_path, caplog):
    path = tmp_path / "model"
    mlflow_clip.save_model(
        colour_onnx, path, runtime={"providers": ["NoSuchExecutionProvider", "CPUExecutionProvider"]}
    )
    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        classifier = mlflow_clip.load_model(str(path))
    assert classifier.session.providers == ("CPUExecutionProvider",)
    assert "asks for NoSuchExecutionProvider first, but runs on CPUExecutionProvider" in caplog.text
    assert "model.onnx runs on CPUExecutionProvider (execution providers ('CPUExecutionProvider',))" in caplog.text


def test_unknown_runtime_override_is_a_clear_error(colour_model_dir):
    with pytest.raises(MlflowException, match="unknown runtime settings"):
        mlflow_clip.load_model(str(colour_model_dir), model_config={"threads": 2})


def test_log_model_registers_a_version(colour_onnx, tracking_uri):
    with mlflow.start_run():
        info = mlflow_clip.log_model(
            colour_onnx,
            name="model",
            registered_model_name="colours",
            input_example=pd.DataFrame({"image": [encode(solid("red"))]}),
        )
    assert str(info.registered_model_version) == "1"
    model = mlflow.pyfunc.load_model("models:/colours/1")
    assert list(model.predict(pd.DataFrame({"image": [encode(solid("green"))]}))["label"]) == ["green"]


def test_loads_and_predicts_without_torch(colour_model_dir, tmp_path):
    """A serving machine without torch, torchvision or clip: the model must load from its own
    code/ folder and predict."""
    image_path = tmp_path / "blue.png"
    image_path.write_bytes(encode(solid("blue")))
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(colour_model_dir)!r})
        out = model.predict(pd.DataFrame({{"image": [open({str(image_path)!r}, "rb").read()]}}))
        served = [m for m in sys.modules if m.startswith("mlflow_clip_serving_")]
        assert served and all(sys.modules[m].__file__.startswith({str(colour_model_dir)!r}) for m in served), served
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("LABEL", out["label"][0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LABEL blue" in result.stdout


def test_output_label_returns_one_label_per_row(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    frame = pd.DataFrame({"image": [encode(solid("green")), encode(solid("blue"))]})
    labels = model.predict(frame, params={"output": "label"})
    assert isinstance(labels, pd.Series) and list(labels) == ["green", "blue"]
    with pytest.raises(MlflowException, match="expected one of"):
        model.predict(frame, params={"output": "everything"})


def test_importing_the_package_needs_no_heavy_dependency(tmp_path):
    """`import mlflow_clip` (and the image modules) work where mlflow, onnxruntime, pandas and
    torch are absent; the flavor API loads them on first use."""
    script = BLOCK_TORCH.replace(
        '{"torch", "torchvision", "clip"}', '{"torch", "torchvision", "clip", "mlflow", "onnxruntime", "pandas"}'
    ) + textwrap.dedent(
        """
        import mlflow_clip, mlflow_clip.serving.images, mlflow_clip.serving.preprocess, mlflow_clip.serving.prompts
        assert mlflow_clip.FLAVOR_NAME == "mlflow_clip" and mlflow_clip.__version__
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_log_model_takes_every_argument_of_mlflows_own_flavors():
    """Every parameter of `mlflow.onnx.log_model` except the ONNX-runtime-specific three (which
    `runtime` replaces), visible in the signature rather than hidden in **kwargs."""
    import inspect

    theirs = set(inspect.signature(mlflow.onnx.log_model).parameters)
    ours = set(inspect.signature(mlflow_clip.log_model).parameters)
    assert theirs - ours == {"onnx_execution_providers", "onnx_session_options", "save_as_external_data"}
    assert {"name", "artifact_path", "params", "tags", "model_type", "step", "model_id"} <= ours


def test_log_model_behaves_as_mlflows_flavors(colour_onnx, tracking_uri, caplog):
    """`artifact_path` still works, with MLflow's deprecation warning; params, tags, model_type
    and step land on the logged model; the registered version carries the tags too."""
    with mlflow.start_run() as run:
        old = mlflow_clip.log_model(colour_onnx, artifact_path="legacy")
        assert "`artifact_path` is deprecated" in caplog.text  # MLflow's own warning, as for its flavors
        info = mlflow_clip.log_model(
            colour_onnx,
            name="colours",
            params={"threshold": 0.5},
            tags={"team": "vision"},
            model_type="zero-shot-classifier",
            step=3,
            registered_model_name="colours",
            metadata={"owner": "vision"},
        )
    logged = mlflow.get_logged_model(info.model_id)
    assert logged.params == {"threshold": "0.5"} and logged.tags["team"] == "vision"
    assert logged.model_type == "zero-shot-classifier" and logged.source_run_id == run.info.run_id
    assert mlflow.get_logged_model(old.model_id).name == "legacy"
    version = mlflow.MlflowClient().get_model_version("colours", info.registered_model_version)
    assert version.tags["team"] == "vision" and "manifest_sha256" in version.tags
    assert mlflow.models.get_model_info(info.model_uri).metadata["owner"] == "vision"


def test_log_model_honours_code_signature_requirements_and_model_id(colour_onnx, tracking_uri, tmp_path):
    """The remaining arguments of MLflow's flavors, each with its effect: `code_paths` ships a
    file beside the serving code (and the manifest covers it), `signature` replaces the default
    one, `extra_pip_requirements` and `pip_requirements` land in requirements.txt, `model_id`
    logs into an existing LoggedModel, and `await_registration_for` registers a READY version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    helper = tmp_path / "team_helpers.py"
    helper.write_text("GREETING = 'hello'\n")
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]))
    with mlflow.start_run():
        existing = mlflow.initialize_logged_model(name="colours-existing")
        info = mlflow_clip.log_model(
            colour_onnx,
            name="colours-existing",
            code_paths=[str(helper)],
            signature=signature,
            extra_pip_requirements=["team-extra==1.0"],
            model_id=existing.model_id,
            registered_model_name="colours-extra",
            await_registration_for=30,
        )
        pinned = mlflow_clip.log_model(colour_onnx, name="pinned", pip_requirements=["onnxruntime", "pillow"])
    assert info.model_id == existing.model_id
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    assert (local / "code" / "team_helpers.py").read_text() == "GREETING = 'hello'\n"
    manifest = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["mlflow_clip"]["manifest"]
    assert "code/team_helpers.py" in json.dumps(manifest)
    assert mlflow.models.get_model_info(info.model_uri).signature.inputs.input_names() == ["image"]
    assert mlflow.models.get_model_info(info.model_uri).signature.params is None  # the given one, not the default
    assert "team-extra==1.0" in (local / "requirements.txt").read_text().split()
    pinned_dir = Path(mlflow.artifacts.download_artifacts(pinned.model_uri, dst_path=str(tmp_path / "pinned")))
    # exactly the given ones, plus the mlflow pin MLflow adds to every flavor's requirements
    pinned_reqs = (pinned_dir / "requirements.txt").read_text().split()
    assert pinned_reqs == [f"mlflow=={mlflow.__version__}", "onnxruntime", "pillow"]
    version = mlflow.MlflowClient().get_model_version("colours-extra", info.registered_model_version)
    assert version.status == "READY"
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert list(model.predict(pd.DataFrame({"image": [encode(solid("red"))]}))["label"]) == ["red"]


def test_a_misnamed_column_says_that_mlflow_dropped_it(colour_model_dir):
    """MLflow drops the columns a signature does not name before the model sees the rows: the
    error says so and names the columns to use, instead of counting the rows that are left."""
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    with pytest.raises(MlflowException) as refused:
        model.predict(pd.DataFrame({"img": [encode(solid("red"))]}))
    message = refused.value.message
    assert "without an 'image' or 'text' column" in message and "MLflow drops the columns" in message
    assert "0 rows" not in message
