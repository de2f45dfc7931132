"""`mlflow-clip serve` checks a registered version before any of its code runs: a version changed
in the artifact store, even rewritten with its manifest recomputed, never starts a server (the
injected code would write a marker file), and the intact version is served from a private,
verified copy of the exact version its alias named."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from helpers import encode, free_port, solid, subprocess_env, wait_for_http
from mlflow.tracking import MlflowClient
from tampering import INJECTIONS, PINNED_ONLY

import mlflow_clip

pytestmark = pytest.mark.slow
NAME = "clip-served"
CLI = str(Path(sys.executable).with_name("mlflow-clip"))


def _serve(uri: str, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # its own process group: stopping it stops its server too
        return subprocess.Popen(
            [CLI, "serve", "-m", uri, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _retag(stored: Path, marker: Path) -> str:
    """The store as registered, the registry's record of it changed (any other digest)."""
    MlflowClient().set_model_version_tag(NAME, "1", "manifest_sha256", "0" * 64)
    return f"differs from version 1 of {NAME}'s manifest_sha256 tag"


def test_serve_refuses_a_changed_version_and_serves_the_intact_one(colour_onnx, tracking_uri, tmp_path):
    with mlflow.start_run():
        mlflow_clip.log_model(colour_onnx, registered_model_name=NAME)
    MlflowClient().set_registered_model_alias(NAME, "production", "1")
    stored = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    pristine = Path(shutil.copytree(stored, tmp_path / "pristine"))
    tag = MlflowClient().get_model_version(NAME, "1").tags["manifest_sha256"]
    port = free_port()
    cases = {
        "a line added to a module": INJECTIONS["a line added to a module"],
        "an unchecked hash-based .pyc": INJECTIONS["an unchecked hash-based .pyc"],
        "code edited, the manifest recomputed": PINNED_ONLY["code edited, the manifest recomputed"],
        "the registry's tag differs": _retag,
    }  # the other injections: tests/serving/test_verified_loads.py, through the same check in-process
    for how, tamper in cases.items():
        marker = tmp_path / "injected-code-ran"
        expected = tamper(stored, marker)
        log = tmp_path / f"{how.replace(' ', '-')}.log"
        process = _serve(f"models:/{NAME}@production", port, log)
        try:
            code = process.wait(timeout=180)
        finally:
            _stop(process)
        output = log.read_text()
        assert code == 2 and expected in output and "Traceback" not in output, (how, output[-3000:])
        assert [line for line in output.splitlines() if line.startswith("error: ")] == [output.strip().splitlines()[-1]]
        assert not marker.exists(), how
        shutil.rmtree(stored)
        shutil.copytree(pristine, stored)
    MlflowClient().set_model_version_tag(NAME, "1", "manifest_sha256", tag)

    process = _serve(f"models:/{NAME}@production", port, tmp_path / "intact.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process)
        body = {"inputs": {"image": [base64.b64encode(encode(solid("green"))).decode()]}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "green"
    finally:
        _stop(process)
    log = (tmp_path / "intact.log").read_text()
    served = log.split("mlflow-clip: serving ", 1)[1].split(" with ", 1)[0]
    assert "mlflow-clip-model-" in served and not Path(served).is_relative_to(stored), served  # a private copy
    assert not list(stored.rglob("__pycache__"))  # the store itself was never imported from
