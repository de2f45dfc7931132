"""The public API, pinned: the package's names and flavor signatures, the CLI's commands and
options, the MLproject entry points and parameters, the evaluator plugin's name. Moving code
around must not change any of them; a deliberate change updates this file in the same commit."""

from __future__ import annotations

import inspect

import yaml
from helpers import ROOT

import mlflow_clip

EXPORTS = {"FLAVOR_NAME", "__version__", "get_default_pip_requirements", "load_model", "log_model", "save_model"}
SIGNATURES = {
    "save_model": [
        "onnx_model",
        "path",
        "conda_env",
        "code_paths",
        "mlflow_model",
        "signature",
        "input_example",
        "pip_requirements",
        "extra_pip_requirements",
        "metadata",
        "runtime",
        "limits",
        "extra_files",
        "text_encoder",
    ],
    # MLflow 3's built-in flavors' arguments, in their order, then the flavor's own.
    "log_model": [
        "onnx_model",
        "artifact_path",
        "conda_env",
        "code_paths",
        "registered_model_name",
        "signature",
        "input_example",
        "await_registration_for",
        "pip_requirements",
        "extra_pip_requirements",
        "metadata",
        "runtime",
        "limits",
        "extra_files",
        "text_encoder",
        "name",
        "params",
        "tags",
        "model_type",
        "step",
        "model_id",
        "kwargs",
    ],
    "load_model": ["model_uri", "dst_path", "model_config"],
}
CLI_OPTIONS = {
    "export": {
        "--alias",
        "--checkpoint",
        "--classes",
        "--experiment-name",
        "--experiment_name",
        "--images",
        "--max-prob-diff",
        "--max_prob_diff",
        "--model",
        "--opset",
        "--precision",
        "--registered-model-name",
        "--registered_model_name",
        "--templates",
        "--text-encoder",
        "--text_encoder",
        "--truncate",
    },
    "promote": {
        "--alias",
        "--allow-legacy",
        "--allow_legacy",
        "--allow-missing-accuracy",
        "--allow_missing_accuracy",
        "--copy-to",
        "--copy_to",
        "--experiment-name",
        "--experiment_name",
        "--max-accuracy-drop",
        "--max-prob-diff",
        "--max_accuracy_drop",
        "--max_prob_diff",
        "--model-name",
        "--model_name",
        "--version",
    },
    "rollback": {"--alias", "--experiment-name", "--experiment_name", "--model-name", "--model_name"},
    "history": {"--alias", "--json", "--model-name", "--model_name"},
    "serve": {
        "--model-uri",
        "-m",
        "--host",
        "-h",
        "--port",
        "-p",
        "--workers",
        "-w",
        "--timeout",
        "-t",
        "--max-body-mb",
    },
    "evaluate": {"--data", "--experiment-name", "--experiment_name", "--model-uri", "--model_uri", "--reference"},
    "benchmark": {
        "--batches",
        "--from-json",
        "--hostile",
        "--hostile-flood",
        "--hostile-requests",
        "--json",
        "--log-to-mlflow",
        "--mlflow",
        "--models",
        "--precisions",
        "--quick",
        "--rebuild",
        "--requests",
        "--rounds",
        "--rows",
        "--seconds",
        "--server-configs",
        "--server-env",
        "--server-form",
        "--sizes",
        "--soak",
        "--soak-arena",
        "--soak-models",
        "--soak-requests",
        "--soak-size",
        "--threads",
        "--warmup",
        "--work-dir",
        "--write-docs",
    },
}
ENTRY_POINTS = {
    "main": {
        "alias",
        "checkpoint",
        "classes",
        "images",
        "model",
        "opset",
        "precision",
        "registered_model_name",
        "templates",
        "text_encoder",
        "truncate",
    },
    "promote": {
        "alias",
        "allow_legacy",
        "allow_missing_accuracy",
        "copy_to",
        "max_accuracy_drop",
        "max_prob_diff",
        "model_name",
        "version",
    },
    "rollback": {"alias", "model_name"},
    "evaluate": {"data", "model_uri", "reference"},
}


def test_package_exports():
    assert set(mlflow_clip.__all__) == EXPORTS
    for name in EXPORTS:
        assert getattr(mlflow_clip, name) is not None


def test_flavor_signatures():
    for name, parameters in SIGNATURES.items():
        assert list(inspect.signature(getattr(mlflow_clip, name)).parameters) == parameters, name


def test_legacy_loader_module_still_exists():
    """Models saved by 0.1.0 name `mlflow_clip.flavor` as their loader module."""
    import mlflow_clip.flavor

    assert callable(mlflow_clip.flavor._load_pyfunc)


def test_cli_commands_and_options():
    from mlflow_clip.cli import cli

    assert set(cli.commands) == set(CLI_OPTIONS)
    assert {o for p in cli.params for o in p.opts} == {"--version", "--verbose", "-v"}
    for name, options in CLI_OPTIONS.items():
        assert {o for p in cli.commands[name].params for o in p.opts} == options, name


def test_mlproject_entry_points_and_parameters():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert {name: set(e["parameters"]) for name, e in project["entry_points"].items()} == ENTRY_POINTS


def test_evaluator_plugin_names():
    """The project's own evaluator, and MLflow's classifier evaluator taught to read our output."""
    setup = (ROOT / "setup.py").read_text()
    assert '"clip-zero-shot=mlflow_clip.evaluation.plugin:ClipZeroShotEvaluator"' in setup
    assert '"classifier=mlflow_clip.evaluation.builtin:ClassifierEvaluator"' in setup
    assert '"console_scripts": ["mlflow-clip=mlflow_clip.cli:cli"]' in setup
