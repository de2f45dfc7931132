"""The command line a new user meets first: its version, argument errors reported in one line
before torch loads, `@file` paths found where the user is, and each progress line printed once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from helpers import BLOCK_TORCH, free_port, requires_export, subprocess_env

from mlflow_clip.cli import cli
from mlflow_clip.errors import PromptError
from mlflow_clip.prompt_files import parse_classes
from mlflow_clip.version import __version__


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mlflow-clip {__version__}"


def test_every_registry_option_says_what_it_takes():
    from mlflow_clip.cli import cli

    for command in ("promote", "rollback", "history"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        silent = [p.opts[0] for p in cli.commands[command].params if p.opts[0] != "--help" and not p.help]
        assert silent == [] and "--model-name" in help_text and "--alias" in help_text, (command, silent)
    assert "up to 200 characters" in CliRunner().invoke(cli, ["promote", "--help"]).output


# Each mistake a newcomer makes, with the line that must refuse it before torch is imported.
# EMPTY, FOLDER and CACHE stand for paths made by the test; offline means that the machine
# cannot reach the download host (its HTTPS proxy refuses connections).
MISTAKES = {
    "opset": (["--opset", "11"], "Received opset=11; expected a whole number, 12 or newer"),
    "missing template file": (
        ["--templates", "@nowhere.txt"],
        "The template file nowhere.txt was not found (looked in",
    ),
    "empty class": (["--classes", "a,,b"], "Class 1"),
    "a class over the context": (
        ["--classes", " ".join(["red"] * 80) + " circle,a blue square"],
        "Class 0 gives a prompt longer than CLIP's context of 77 tokens",
    ),
    "missing checkpoint": (["--model", "/nowhere/ViT-B-32.pt"], "no file exists at /nowhere/ViT-B-32.pt. Expected"),
    "checkpoint is a folder": (["--model", "FOLDER"], "is a folder, not a checkpoint file"),
    "empty checkpoint": (["--model", "EMPTY"], "EMPTY is empty"),
    "uncached name, offline": (
        ["--model", "ViT-B/32"],
        "which is not in the cache (CACHE/ViT-B-32.pt), and this machine cannot reach openaipublic.azureedge.net",
    ),
    "bf16 without OpenVINO": (
        ["--precision", "bf16"],
        'which runs on OpenVINO, and OpenVINO is not installed here: pip install "mlflow-clip[openvino]"',
    ),
    "unknown precision": (["--precision", "fp8"], "Received precision='fp8'; expected one of fp32, fp16, int8, bf16."),
    "open_clip checkpoint missing": (
        ["--model", "open_clip:ViT-B-32", "--checkpoint", "/nowhere/open_clip.bin"],
        "Received checkpoint='/nowhere/open_clip.bin'; no file exists there",
    ),
}


def _paths(tmp_path, text: str) -> str:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "folder.pt").mkdir(exist_ok=True)
    (tmp_path / "empty.pt").touch()
    names = {"FOLDER": tmp_path / "folder.pt", "EMPTY": tmp_path / "empty.pt", "CACHE": tmp_path / "cache"}
    for name, path in names.items():
        text = text.replace(name, str(path))
    return text


def _offline_env(tmp_path) -> dict[str, str]:
    return subprocess_env(
        MLFLOW_CLIP_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY=f"http://127.0.0.1:{free_port()}", NO_PROXY=""
    )


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_bad_export_arguments_are_one_line_before_torch_is_imported(tmp_path, mistake):
    """torch cannot even be imported here (nor OpenVINO): each mistake must be refused before
    anything loads, in one line that names the fix."""
    args, message = MISTAKES[mistake]
    argv = [
        _paths(tmp_path, a) for a in ["export", "--model", "demo", "--classes", "a red circle,a blue square", *args]
    ]
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        BLOCKED.add("openvino")
        from mlflow_clip.cli import main
        sys.argv = ["mlflow-clip", *{argv!r}]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and _paths(tmp_path, message) in lines[0], lines
    assert "blocked" not in result.stderr


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


@pytest.mark.alone  # binds the README's port, 5001, which tests/e2e/test_readme.py serves on
def test_serve_takes_the_first_free_default_port_never_5000_and_refuses_a_busy_one_at_once(monkeypatch):
    import socket

    from mlflow_clip.gateway import DEFAULT_PORT, LAST_PORT, choose_port

    first = choose_port("127.0.0.1", None)
    assert DEFAULT_PORT <= first <= LAST_PORT and 5000 not in range(DEFAULT_PORT, LAST_PORT + 1)
    with socket.create_server(("127.0.0.1", first)):
        assert first < choose_port("127.0.0.1", None) <= LAST_PORT
        monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
        result = CliRunner().invoke(cli, ["serve", "-m", "models:/no-such-model/1", "-p", str(first)])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"error: Cannot serve on 127.0.0.1: port {first} is in use. Stop what listens there, or pick a port with -p."
    )
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # MLflow's download bars only with -v


@pytest.mark.parametrize(
    "args, message",
    [
        (["query_server.py", "URL", "nothere.png"], "error: no image file at nothere.png"),
        (["query_server.py", "URL", "IMAGE"], "error: no answer from URL ([Errno 111] Connection refused). Is the"),
        (["spark_batch_score.py", "models:/m/1", "nowhere/", "out.parquet"], "error: no folder of images at nowhere/"),
        (["make_demo_images.py", "out", "--classes", "a cat"], "error: Received classes ['a cat']; expected some of"),
    ],
    ids=["missing image", "no server", "missing folder", "unknown demo class"],
)
def test_the_examples_answer_a_users_mistake_in_one_line(tmp_path, args, message):
    from helpers import ROOT

    from mlflow_clip.package_data import sample_image_paths

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    image = str(sample_image_paths()[0])
    argv = [a.replace("URL", url).replace("IMAGE", image) for a in args]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / argv[0]), *argv[1:]],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(
        message.replace("URL", url)
    ), result.stderr
