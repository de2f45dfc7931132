"""The loads mlflow-clip controls (`mlflow_clip.load_model`, `mlflow-clip evaluate`, the Spark
helper, and the check `mlflow-clip serve` runs before starting its server) resolve a URI once
and refuse a version changed in the artifact store, even rewritten with its manifest recomputed,
before any of its code runs; a URI that names nothing is one line and exit code 2."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from helpers import has_module
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tampering import INJECTIONS, PINNED_ONLY, recompute_manifest

import mlflow_clip
from mlflow_clip.cli import cli
from mlflow_clip.download import ModelNotFoundError, download_model, download_verified
from mlflow_clip.errors import MlflowClipError

NAME = "clip-pinned"


@pytest.fixture()
def registered(colour_onnx, tracking_uri, tmp_path):
    """The colour model as version 1 of NAME (alias `production`), and its folder in the
    local artifact store, where tampering happens."""
    with mlflow.start_run():
        info = mlflow_clip.log_model(colour_onnx, registered_model_name=NAME)
    MlflowClient().set_registered_model_alias(NAME, "production", "1")
    stored = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))  # a local store answers with the folder
    assert stored.is_relative_to(tmp_path) and (stored / "MLmodel").is_file()
    return info, stored


def _refusals(uri: str, data: Path) -> dict[str, str]:
    """What each load mlflow-clip controls says about `uri`."""
    from mlflow_clip.spark import classify_column

    said, loads = (
        {},
        {"load_model": lambda: mlflow_clip.load_model(uri), "serve's check": lambda: download_verified(uri)},
    )
    if has_module("pyspark"):  # the serving tier runs without it
        loads["the Spark helper"] = lambda: classify_column(None, uri, None)  # refused before Spark is touched
    for how, load in loads.items():
        with pytest.raises(MlflowClipError) as refused:
            load()
        assert isinstance(refused.value, MlflowException), how
        said[how] = str(refused.value)
    result = CliRunner().invoke(cli, ["evaluate", "--model-uri", uri, "--data", str(data)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    said["mlflow-clip evaluate"] = result.output
    return said


@pytest.mark.parametrize("how", [*INJECTIONS, *PINNED_ONLY])
def test_a_version_changed_in_the_store_is_refused_before_its_code_runs(registered, tmp_path, how):
    _, stored = registered
    marker = tmp_path / "injected-code-ran"
    expected = {**INJECTIONS, **PINNED_ONLY}[how](stored, marker)
    (tmp_path / "val" / "red").mkdir(parents=True)
    for uri in (f"models:/{NAME}/1", f"models:/{NAME}@production"):
        for where, message in _refusals(uri, tmp_path / "val").items():
            assert expected in message, (where, message)
            if how in PINNED_ONLY:
                assert f"version 1 of {NAME}'s manifest_sha256 tag" in message or "registry's record" in message
    assert not marker.exists()


def test_the_registry_pins_the_manifest(registered, tmp_path):
    """A tag that disagrees with the store, and a pinned version whose manifest was removed
    (as if saved before manifests), are refused; the version as registered loads."""
    _, stored = registered
    assert mlflow_clip.load_model(f"models:/{NAME}@production").classes == ["red", "green", "blue"]
    client = MlflowClient()
    tag = client.get_model_version(NAME, "1").tags["manifest_sha256"]
    client.set_model_version_tag(NAME, "1", "manifest_sha256", "0" * 64)
    with pytest.raises(MlflowClipError, match="differs from the registry's record of it"):
        mlflow_clip.load_model(f"models:/{NAME}/1")
    client.set_model_version_tag(NAME, "1", "manifest_sha256", tag)
    mlmodel = yaml.safe_load((stored / "MLmodel").read_text())
    del mlmodel["flavors"]["mlflow_clip"]["manifest"]
    (stored / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(MlflowClipError, match="MLmodel has no manifest"):
        mlflow_clip.load_model(f"models:/{NAME}/1")


def test_an_alias_is_resolved_once_to_the_version_downloaded(registered):
    info, _ = registered
    model = download_model(f"models:/{NAME}@production")
    assert (model.source, model.name, model.version) == (f"models:/{NAME}/1", NAME, "1")
    assert model.pinned == MlflowClient().get_model_version(NAME, "1").tags["manifest_sha256"]
    verified = download_verified(f"models:/{NAME}@production")  # serve's: a private copy, removed after
    assert verified.private_dir is not None and verified.path.is_relative_to(verified.private_dir)
    verified.cleanup()
    assert not verified.private_dir.exists()


def test_a_logged_model_is_pinned_by_its_own_tag(registered):
    info, stored = registered
    uri = f"models:/{info.model_id}"
    assert download_model(uri).pinned == MlflowClient().get_logged_model(info.model_id).tags["manifest_sha256"]
    PINNED_ONLY["max_pixels x100, the manifest recomputed"](stored, stored / "unused")
    with pytest.raises(MlflowClipError, match=f"differs from logged model {info.model_id}'s tag"):
        download_verified(uri)


def test_a_version_registered_without_mlflow_clip_is_checked_against_itself(registered, caplog):
    info, stored = registered
    version = mlflow.register_model(info.model_uri, "registered-plainly")
    with caplog.at_level(logging.WARNING, logger="mlflow_clip"):
        download_verified(f"models:/registered-plainly/{version.version}").cleanup()
    assert "has no manifest_sha256 tag" in caplog.text
    recompute_manifest(stored)  # nothing pins it: a self-consistent directory passes
    download_verified(f"models:/registered-plainly/{version.version}").cleanup()


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "-m", "models:/clip-zero-shot/99"],
        ["serve", "-m", "models:/clip-zero-shot@nope"],
        ["serve", "-m", "./no-such-model"],
        ["serve", "-m", "runs:/0123456789abcdef/model"],
        ["evaluate", "--model-uri", "models:/clip-zero-shot/99", "--data", "."],
        ["promote", "--version", "99"],
        ["rollback", "--model-name", "no-such-model"],
        ["history", "--model-name", "no-such-model"],
    ],
)
def test_a_missing_model_is_one_line_and_exit_code_2(tracking_uri, args):
    MlflowClient().search_registered_models()  # the store exists (MLflow logs its creation)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    named = args[2] if args[0] != "promote" else "clip-zero-shot"  # the model is checked before its version
    assert named.removeprefix("./").removeprefix("models:/clip-zero-shot/") in result.output


def test_load_model_names_a_missing_version_for_python_callers(tracking_uri):
    with pytest.raises(ModelNotFoundError, match="No model at models:/clip-zero-shot/99") as missing:
        mlflow_clip.load_model("models:/clip-zero-shot/99")
    assert isinstance(missing.value, MlflowException) and missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
