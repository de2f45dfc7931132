"""Environments built from a model alone: `mlflow models serve --env-manager uv` and
`virtualenv`, and the image `mlflow models generate-dockerfile` describes. mlflow-clip is not
installed there; the model's own code serves, with the native resize the model carries, on the
mlflow-skinny the model declares (no pyarrow, scipy or scikit-learn)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import (
    encode,
    free_port,
    require_env_manager,
    requires_export,
    solid,
    start_server,
    stop_process,
    subprocess_env,
    wait_for_http,
)

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

# Full mlflow and the heavy packages it brings, none of which serving imports (distribution names).
HEAVY = {"mlflow", "pyarrow", "scipy", "scikit-learn", "matplotlib", "sqlalchemy"}
SCORE_TOL = 1e-5


def _serving_package(model_dir: Path) -> str:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["mlflow_clip"]["serving_package"]


def _model_python(model_dir: Path) -> str:
    return yaml.safe_load((model_dir / "python_env.yaml").read_text())["python"]


@contextlib.contextmanager
def _serving(argv: list[str], tmp_path: Path, env: dict[str, str]):
    """Start a scoring server on a free port; yield its URL and the path of its log."""
    port = free_port()
    log = tmp_path / "server.log"
    process = start_server([*argv, "-h", "127.0.0.1", "-p", str(port)], log, env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process, timeout=900)
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop_process(process)


def _serve_from_model_env(model_dir: Path, env_manager: str, tmp_path: Path):
    """`mlflow models serve` with an environment built from the model alone, under tmp_path/envs."""
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", env_manager]
    return _serving(argv, tmp_path, subprocess_env(MLFLOW_ENV_ROOT=str(tmp_path / "envs")))


def _site_packages(env_dir: Path) -> Path:
    (site,) = env_dir.glob("lib/python*/site-packages")
    return site


def _built_env_site_packages(tmp_path: Path) -> Path:
    (env_dir,) = (tmp_path / "envs").glob("mlflow-*")
    return _site_packages(env_dir)


def _distributions(site: Path) -> set[str]:
    names = (p.name.split("-")[0] for p in site.glob("*.dist-info"))
    return {name.lower().replace("_", "-") for name in names}


def _sample_images():
    """The package's sample images with their true classes (the ones that have one)."""
    from mlflow_clip.package_data import default_images_dir

    manifest = json.loads((default_images_dir() / "manifest.json").read_text())
    return [(default_images_dir() / e["file"], e["class"]) for e in manifest if e["class"]]


def _assert_serves_the_samples(url: str, model_dir: Path) -> None:
    """Every labelled sample image gets its true class, with the score the model's reference
    (recorded at save, in the full environment) gives it."""
    from mlflow_clip.references import read_reference

    samples = _sample_images()
    rows = [[base64.b64encode(path.read_bytes()).decode()] for path, _ in samples]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    response = requests.post(f"{url}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text[:2000]
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [label for _, label in samples]
    reference = read_reference(model_dir)
    expected = dict(zip(reference["images"], reference["baked"]))
    for (path, _), prediction in zip(samples, predictions):
        assert prediction["score"] == pytest.approx(expected[path.name]["top_scores"][0], abs=SCORE_TOL), path.name


def test_serve_with_an_environment_built_by_uv(colour_model_dir, tmp_path):
    require_env_manager("uv", colour_model_dir)
    with _serve_from_model_env(colour_model_dir, "uv", tmp_path) as (url, log_path):
        body = {"inputs": {"image": [base64.b64encode(encode(solid("blue"))).decode()]}}
        response = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == "blue"
    log = log_path.read_text(errors="replace")
    assert not list(_built_env_site_packages(tmp_path).glob("mlflow_clip*")), "mlflow-clip leaked in"
    assert f"serving {colour_model_dir} with {_serving_package(colour_model_dir)} (the model's own code)" in log
    assert (
        "image resize: native (carried by the model: " in log
        and str(colour_model_dir) in log.split("image resize: native")[1][:400]
    )


@requires_export
@pytest.mark.parametrize("env_manager", ["uv", "virtualenv"])
def test_an_environment_built_from_the_model_is_skinny_and_serves(demo_model_dir, tmp_path, env_manager):
    """The model declares mlflow-skinny: the environment MLflow builds from it has neither full
    mlflow nor its data-science stack, and serves the demo CLIP's true labels on real images."""
    require_env_manager(env_manager, demo_model_dir)
    with _serve_from_model_env(demo_model_dir, env_manager, tmp_path) as (url, _):
        _assert_serves_the_samples(url, demo_model_dir)
    installed = _distributions(_built_env_site_packages(tmp_path))
    assert {"mlflow-skinny", "onnxruntime", "pandas", "fastapi", "uvicorn"} <= installed
    assert not installed & HEAVY, f"{sorted(installed & HEAVY)} in an environment built from the model"


def _generate_dockerfile(model_dir: Path, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", str(model_dir), "-d", str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (out / "Dockerfile").read_text()


def test_the_generated_dockerfile_carries_the_native_resize(colour_model_dir, tmp_path):
    import sysconfig

    dockerfile = _generate_dockerfile(colour_model_dir, tmp_path / "docker")
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


@requires_export
def test_the_generated_dockerfiles_install_steps_serve(demo_model_dir, tmp_path):
    """The Dockerfile's own RUN steps, replayed in a fresh virtual environment of the model's
    Python (no docker daemon needed): MLflow's image installs full mlflow itself, then the
    model's requirements (mlflow-skinny at the same version) on top; the result serves the
    demo CLIP's true labels, started as the image's entrypoint starts it."""
    require_env_manager("uv", demo_model_dir)
    dockerfile = _generate_dockerfile(demo_model_dir, tmp_path / "docker")
    (install_mlflow,) = (line for line in dockerfile.splitlines() if line.startswith("RUN pip install mlflow"))
    (install_model,) = (line for line in dockerfile.splitlines() if "_install_pyfunc_deps" in line)
    assert install_mlflow.split() == ["RUN", "pip", "install", f"mlflow=={mlflow.__version__}"]
    assert "env_manager='local'" in install_model and 'ENTRYPOINT ["python", "-c"' in dockerfile

    venv = tmp_path / "image"
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv"
    subprocess.run([uv, "venv", "-q", "--seed", "--python", _model_python(demo_model_dir), str(venv)], check=True)
    env = subprocess_env(PATH=f"{venv / 'bin'}:/usr/bin:/bin", VIRTUAL_ENV=str(venv))
    (model,) = (tmp_path / "docker" / "model_dir").iterdir()
    code = install_model.removeprefix('RUN python -c "').removesuffix('"').replace("/opt/ml/model", str(model))
    for argv in (["pip", "install", "-q", *install_mlflow.split()[3:]], ["python", "-c", code]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
    assert {"mlflow", "mlflow-skinny"} <= _distributions(_site_packages(venv))
    # The entrypoint's C._serve('local') runs scoring_server.get_cmd's uvicorn, as this does.
    argv = [str(venv / "bin" / "python"), "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local"]
    with _serving(argv, tmp_path, env) as (url, _):
        _assert_serves_the_samples(url, model)
