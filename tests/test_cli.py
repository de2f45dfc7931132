"""The command line a new user meets first: its version, argument errors reported in one line
before torch loads, `@file` paths found where the user is, and each progress line printed once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from helpers import BLOCK_TORCH, requires_export, subprocess_env

from mlflow_clip.cli import cli
from mlflow_clip.serving.prompts import PromptError, parse_classes
from mlflow_clip.version import __version__


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mlflow-clip {__version__}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--opset", "11"], "Received opset=11; expected a whole number, 12 or newer"),
        (["--templates", "@nowhere.txt"], "The template file nowhere.txt was not found (looked in"),
        (["--classes", "a,,b"], "Class 1"),
        (
            ["--classes", " ".join(["red"] * 80) + " circle,a blue square"],
            "Class 0 gives a prompt longer than CLIP's context of 77 tokens",
        ),
    ],
    ids=["opset", "missing template file", "empty class", "a class over the context"],
)
def test_bad_export_arguments_are_one_line_before_torch_is_imported(tmp_path, args, message):
    """torch cannot even be imported here: the argument must be refused before anything loads."""
    argv = ["export", "--model", "demo", "--classes", "a red circle,a blue square", *args]
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        from mlflow_clip.cli import main
        sys.argv = ["mlflow-clip", *{argv!r}]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "blocked" not in result.stderr


def test_an_at_file_is_found_in_the_callers_directory(tmp_path, monkeypatch):
    """`mlflow run` starts the job in the project's directory; `$PWD` is still the caller's."""
    caller, project = tmp_path / "caller", tmp_path / "project"
    caller.mkdir(), project.mkdir()
    (caller / "classes.txt").write_text("a forklift\na pallet\n", encoding="utf-8")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PWD", str(caller))
    assert parse_classes("@classes.txt") == ["a forklift", "a pallet"]
    (project / "classes.txt").write_text("a truck\na van\n", encoding="utf-8")
    assert parse_classes("@classes.txt") == ["a forklift", "a pallet"]  # the caller's wins
    with pytest.raises(PromptError, match=rf"looked in {caller} and {project}\)"):
        parse_classes("@other.txt")


@pytest.mark.slow
@requires_export
def test_each_progress_line_is_printed_once(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow_clip.cli",
            "export",
            "--model",
            "demo",
            "--classes",
            "a red circle,a blue square",
            "--templates",
            "photo",
            "--experiment-name",
            "first",
        ],
        cwd=tmp_path,
        env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    steps = [line for line in output.splitlines() if line.startswith("[mlflow-clip] ")]
    assert len(steps) >= 6 and len(set(steps)) == len(steps)
    for step in steps:
        assert output.count(step.removeprefix("[mlflow-clip] ")) == 1, step
    assert "Warning" not in output and "warn" not in output.lower()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("first") is not None


def test_evaluating_a_tampered_model_is_one_line_and_exit_code_2(colour_model_dir, tmp_path, monkeypatch):
    """A model that fails its manifest is one of the library's own errors: the CLI prints one
    line naming the changed file, with exit code 2, and Python callers can catch it either way."""
    import shutil

    from mlflow.exceptions import MlflowException
    from tampering import swap_classes

    import mlflow_clip
    from mlflow_clip.errors import MlflowClipError

    model = tmp_path / "model"
    shutil.copytree(colour_model_dir, model)
    changed = swap_classes(model)
    with pytest.raises(MlflowClipError, match=changed) as refused:
        mlflow_clip.load_model(str(model))
    assert isinstance(refused.value, MlflowException)
    (tmp_path / "val" / "red").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["evaluate", "--model-uri", str(model), "--data", str(tmp_path / "val")])
    assert result.exit_code == 2, result.output
    assert changed in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
