"""Shared fixtures: tiny purpose-built models, images made here, and fresh MLflow stores.

The helpers they use (and tests import) are in helpers.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import build_colour_onnx, encode, has_module, solid, using_store
from stores import fresh_sqlite_uri

pytest_plugins = ["alone"]  # tests marked `alone` run with no other test beside them under xdist

# MLflow's artifact progress bars would fill the logs of every test that downloads a model.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# The serving tier (`python -m pytest -m serving`, with `pip install -e ".[test]"` and no torch): the
# tests of what every model carries, of the public API and of the layout. Tests in them that need
# the export, OpenVINO or Spark skip where those are not installed.
SERVING_TIER = ("serving/", "test_public_api.py", "test_layout.py", "test_options.py", "registry/test_card.py")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        if where.startswith(SERVING_TIER):
            item.add_marker(pytest.mark.serving)


def pytest_report_header(config):
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free
    return f"free disk for temporary files: {free / 2**30:.1f} GiB"


@pytest.fixture(scope="session", autouse=True)
def _store_template(tmp_path_factory):
    """Fresh SQLite stores copied from one MLflow migrated once in this process (tests/stores.py)."""
    import stores

    stores.install(tmp_path_factory.mktemp("store-template"))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`module_tmp(name)` makes a fresh folder that lasts until the test module is done; then the
    module's folders are removed. A full run writes several GB (environments, full-size models,
    stores), which would otherwise stay on disk to the end of the session."""
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """A wheel built from this tree once for the session: what users install (the regular way)."""
    from benchmarks.mlserver import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def colour_onnx(tmp_path_factory) -> Path:
    return build_colour_onnx(tmp_path_factory.mktemp("colour") / "colour.onnx")


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory, colour_onnx) -> Path:
    import mlflow_clip

    path = tmp_path_factory.mktemp("colour-model") / "model"
    mlflow_clip.save_model(colour_onnx, path)
    return path


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store and registry, and a local artifact root, for one test."""
    import mlflow

    uri = fresh_sqlite_uri(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    # Both: a registry URI left behind would point the next test at this (removed) folder.
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def demo_built(tmp_path_factory):
    """The demo CLIP exported once for the session (all 9 classes, ensemble templates)."""
    if not (has_module("torch") and has_module("clip")):
        pytest.skip("needs the export extra")
    from mlflow_clip.demo_data import DEMO_CLASSES
    from mlflow_clip.export.job import build_classifier

    return build_classifier(DEMO_CLASSES, model="demo", templates="ensemble", out_dir=tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory, demo_built) -> Path:
    import mlflow_clip

    path = tmp_path_factory.mktemp("demo-model") / "model"
    mlflow_clip.save_model(demo_built.onnx_path, path, text_encoder=demo_built.text_encoder_path)
    return path


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory, demo_built):
    """The demo classifier registered as `clip-demo` version 1 in a session SQLite store.

    Yields (tracking_uri, model_uri); the store is private to the test session.
    """
    import mlflow
    import pandas as pd

    import mlflow_clip

    root = tmp_path_factory.mktemp("registry")
    uri = fresh_sqlite_uri(root / "mlflow.db")
    with using_store(uri):
        experiment = mlflow.create_experiment("demo", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            example = pd.DataFrame({"image": [encode(solid("red"))]})
            info = mlflow_clip.log_model(
                demo_built.onnx_path,
                name="model",
                registered_model_name="clip-demo",
                input_example=example,
                text_encoder=demo_built.text_encoder_path,
            )
    return uri, f"models:/clip-demo/{info.registered_model_version}"


@pytest.fixture(scope="module")
def module_store(tmp_path_factory) -> str:
    """A fresh SQLite store for one test module, in os.environ (so subprocesses and Spark
    workers see it), with the working directory as artifact root."""
    import mlflow

    root = tmp_path_factory.mktemp("module-store")
    uri = fresh_sqlite_uri(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.chdir(root)  # the default artifact root is relative to the working directory
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield uri
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def module_demo_model_uri(module_store, demo_built) -> str:
    """The demo classifier registered as `clip-zero-shot` version 1 in the module's store."""
    import mlflow

    import mlflow_clip

    with mlflow.start_run():
        info = mlflow_clip.log_model(
            demo_built.onnx_path, registered_model_name="clip-zero-shot", text_encoder=demo_built.text_encoder_path
        )
    assert str(info.registered_model_version) == "1"
    return "models:/clip-zero-shot/1"
