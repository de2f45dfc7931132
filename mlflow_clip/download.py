"""Downloading a model for the loads mlflow-clip controls, checked before any of its code runs.

`mlflow_clip.load_model`, `mlflow-clip serve`, `mlflow-clip evaluate` and the Spark helper
resolve a model URI once (an alias or a stage names a version when it is resolved, not when it
is read again), download that exact version, and check the directory with the installed
library: every file against the manifest in MLmodel, and the manifest against the record the
registry keeps of it (the `manifest_sha256` tag set when the version, or the logged model, was
created). An artifact store changed after registration, even rewritten whole with its manifest
recomputed, is refused there; only then is the verified local directory handed on, to the
installed library or to MLflow's scoring server. A local path or another URI (`runs:/`, `s3://`)
has no registry record: its manifest is checked against the directory alone.

    >>> model = download_verified("models:/clip-zero-shot@production")  # doctest: +SKIP
    >>> model.source, model.pinned_by  # doctest: +SKIP
    ('models:/clip-zero-shot/3', "version 3 of clip-zero-shot's manifest_sha256 tag")
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from mlflow_clip.errors import ModelNotFoundError
from mlflow_clip.serving.contract import MANIFEST_SHA256_TAG
from mlflow_clip.serving.errors import ModelIntegrityError
from mlflow_clip.serving.loader import ModelError, verify_setting
from mlflow_clip.serving.manifest import check_manifest, read_mlmodel, recorded_manifest

_logger = logging.getLogger(__name__)
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class DownloadedModel:
    """A model directory on local disk, and what the registry pins of it."""

    path: Path
    source: str  # what was downloaded: `models:/name/3` for `models:/name@alias`, else the URI given
    name: str | None = None  # the registered model and version, when the URI names one
    version: str | None = None
    pinned: str | None = None  # the manifest digest the registry records, if it records one
    pinned_by: str = ""
    private_dir: Path | None = None  # the temporary folder holding a private copy, which `cleanup` removes

    def cleanup(self) -> None:
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)


_PREFIX = "mlflow-clip-model-"


def download_model(model_uri: str, dst_path: str | os.PathLike | None = None) -> DownloadedModel:
    """Resolve `model_uri` once and download what it names (a local directory is used in place
    unless `dst_path` is given). Raises `ModelNotFoundError` when there is nothing there."""
    source, name, version, pinned, pinned_by = _resolve(model_uri)
    parsed = urllib.parse.urlparse(model_uri)
    if parsed.scheme in ("", "file") and not os.path.exists(parsed.path if parsed.scheme else model_uri):
        raise ModelNotFoundError(model_uri, "no such file or directory")
    if dst_path is None and os.path.isdir(model_uri):
        return DownloadedModel(Path(model_uri), source, name, version, pinned, pinned_by)
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    try:
        local = _download_artifact_from_uri(source, output_path=None if dst_path is None else str(dst_path))
    except MlflowException as e:
        if e.error_code in _NOT_FOUND_CODES:
            raise ModelNotFoundError(model_uri, e.message) from None
        raise
    return DownloadedModel(Path(local), source, name, version, pinned, pinned_by)


def download_verified(model_uri: str, verify: bool | None = None) -> DownloadedModel:
    """`download_model` into a private temporary folder (a local directory is used in place),
    then checked against its manifest and the registry's pin, before any of its code can run.

    `verify=False` (or MLFLOW_CLIP_VERIFY=0) skips the check, with a warning. A model without a
    manifest (saved by mlflow-clip 0.1.0) is refused: its code cannot be checked.
    """
    private = None if os.path.isdir(model_uri) else Path(tempfile.mkdtemp(prefix=_PREFIX))
    try:
        model = replace(download_model(model_uri, private), private_dir=private)
        check_model(model, verify_setting(verify))
    except BaseException:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        raise
    return model


def check_model(model: DownloadedModel, verify: bool = True) -> None:
    """Check a downloaded model with the installed library (see `download_verified`)."""
    if not verify:
        _logger.warning("mlflow-clip: %s is not checked against its manifest (verify is off).", model.path)
        return
    mlmodel = read_mlmodel(model.path)
    if recorded_manifest(mlmodel) is None and model.pinned is None:
        raise ModelError(
            f"The model at {model.path} has no manifest (saved by mlflow-clip 0.1.0, or not an mlflow-clip model): "
            "its code cannot be checked before it runs. Export it again, or set MLFLOW_CLIP_VERIFY=0 to run it "
            "unchecked.",
            error_code=databricks_pb2.INVALID_STATE,
        )
    if model.name is not None and model.pinned is None:
        _logger.warning(
            "mlflow-clip: version %s of %s has no %s tag (it was registered without mlflow-clip): its manifest is "
            "checked against the directory alone.",
            model.version,
            model.name,
            MANIFEST_SHA256_TAG,
        )
    try:
        check_manifest(model.path, mlmodel, model.pinned, model.pinned_by)
    except ModelIntegrityError as e:  # as the loader raises it: one of ours, and an MlflowException
        raise ModelError(str(e), error_code=databricks_pb2.INVALID_STATE) from None


def _resolve(model_uri: str) -> tuple[str, str | None, str | None, str | None, str]:
    """(what to download, registered name, version, pinned manifest digest, what pins it)."""
    if not model_uri.startswith("models:"):
        return model_uri, None, None, None, ""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    try:
        resolved = get_model_name_and_version(client, model_uri)
        if len(resolved) == 1:  # a logged model: models:/m-<id>
            tags = client.get_logged_model(resolved[0]).tags
            return model_uri, None, None, tags.get(MANIFEST_SHA256_TAG), f"logged model {resolved[0]}'s tag"
        name, version = resolved
        tags = client.get_model_version(name, version).tags
    except MlflowException as e:
        if e.error_code in _NOT_FOUND_CODES or "not found" in e.message or "No versions" in e.message:
            raise ModelNotFoundError(model_uri, e.message) from None
        raise
    pinned_by = f"version {version} of {name}'s {MANIFEST_SHA256_TAG} tag"
    return f"models:/{name}/{version}", name, str(version), tags.get(MANIFEST_SHA256_TAG), pinned_by
