"""The README's commands stay honest: CI runs its test command, and its quickstart really runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, requires_export, subprocess_env

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    """The first two fenced bash blocks of the README: the quickstart, then the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_opens_with_the_two_commands():
    quickstart, tests = readme_commands()
    assert "mlflow run . --env-manager local -P model=demo" in quickstart
    assert "pytest" in tests
    assert README.index(quickstart) < README.index(tests) < README.index("## ")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = readme_commands()
    assert tests in ci.splitlines()


def test_conda_env_lists_the_same_packages_as_setup():
    import yaml

    setup = (ROOT / "setup.py").read_text()
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for requirement in pip_deps:
        assert f'"{requirement}"' in setup, f"{requirement} is in conda.yaml but not in setup.py"


@pytest.mark.slow
@requires_export
def test_quickstart_mlflow_run_registers_a_checked_version(tmp_path):
    """Runs the quickstart's `mlflow run` for real, against a temporary tracking store."""
    from mlflow.tracking import MlflowClient

    quickstart, _ = readme_commands()
    mlflow_run = quickstart[quickstart.index("mlflow run .") :]
    argv = shlex.split(mlflow_run)
    argv[argv.index(".")] = str(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, PATH=bin_dir + os.pathsep + os.environ["PATH"])
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='clip-zero-shot'")
    assert str(version.version) == "1"
    assert version.tags["parity_status"] == "passed" and version.tags["clip_model"] == "demo"
    assert version.tags["num_classes"] == "3"
    run = client.get_run(version.run_id)
    # mlflow run records entry-point parameters shell-quoted, as it passed them to the command
    assert shlex.split(run.data.params["classes"]) == ["a red circle,a green square,a blue triangle"]
    assert run.data.params["class_names"] == '["a red circle", "a green square", "a blue triangle"]'
    assert run.data.metrics["parity_max_abs_prob_diff"] <= 1e-4
    assert run.data.metrics["parity_max_abs_pixel_diff"] == 0.0


@requires_export
def test_cli_reports_bad_classes_without_a_traceback(tmp_path):
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_clip.cli", "export", "--model", "demo", "--classes", "a,,b"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Class 1" in result.stderr and "Traceback" not in result.stderr
