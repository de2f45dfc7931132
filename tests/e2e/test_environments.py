"""Environments built from a model alone: `mlflow models serve --env-manager uv`, and the image
`mlflow models generate-dockerfile` describes. mlflow-clip is not installed there; the model's
own code serves, with the native resize the model carries."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import encode, free_port, solid, start_server, stop_process, subprocess_env, wait_for_http

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow


def _serving_package(model_dir: Path) -> str:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["mlflow_clip"]["serving_package"]


def test_serve_with_an_environment_built_by_uv(colour_model_dir, tmp_path):
    if shutil.which("uv", path=str(Path(sys.executable).parent)) is None and shutil.which("uv") is None:
        pytest.skip("uv is not installed (pip install uv; it is in the test extra)")
    port = free_port()
    env = subprocess_env(MLFLOW_ENV_ROOT=str(tmp_path / "envs"))
    process = start_server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            str(colour_model_dir),
            "--env-manager",
            "uv",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        tmp_path / "server.log",
        env,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process, timeout=900)
        import base64

        body = {"inputs": {"image": [base64.b64encode(encode(solid("blue"))).decode()]}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == "blue"
    finally:
        stop_process(process)
    log = (tmp_path / "server.log").read_text(errors="replace")
    env_dirs = list((tmp_path / "envs").glob("*"))
    assert env_dirs and not list(env_dirs[0].glob("lib/python*/site-packages/mlflow_clip")), "mlflow-clip leaked in"
    assert f"serving {colour_model_dir} with {_serving_package(colour_model_dir)} (the model's own code)" in log
    assert (
        "image resize: native (built: " in log and str(colour_model_dir) in log.split("image resize: native")[1][:400]
    )


def test_the_generated_dockerfile_carries_the_native_resize(colour_model_dir, tmp_path):
    import subprocess
    import sysconfig

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "generate-dockerfile",
            "-m",
            str(colour_model_dir),
            "-d",
            str(tmp_path / "docker"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dockerfile = (tmp_path / "docker" / "Dockerfile").read_text()
    python = ".".join(map(str, sys.version_info[:2]))
    assert f"FROM python:{python}" in dockerfile  # so the carried binary's tag matches the image's Python
    model = tmp_path / "docker" / "model_dir" / "model"
    binary = (
        model
        / "code"
        / _serving_package(colour_model_dir)
        / f"_mlflow_clip_resample{sysconfig.get_config_var('EXT_SUFFIX')}"
    )
    assert binary.is_file() and (binary.parent / "resample.c").is_file()
    requirements = (model / "requirements.txt").read_text()
    assert "mlflow-clip" not in requirements and "torch" not in requirements
