"""The public API, pinned: the package's names and flavor signatures, the CLI's commands and
options, the MLproject entry points and parameters, the evaluator plugin's name. Moving code
around must not change any of them; a deliberate change updates this file in the same commit."""

from __future__ import annotations

import inspect

import yaml
from helpers import ROOT, requires_export

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
        "tokenizer_files",
        "precisions",
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
        "tokenizer_files",
        "precisions",
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
# The export's options (mlflow_clip/export/options.py), keyword-only after the classes.
EXPORT_OPTIONS = [
    "model",
    "checkpoint",
    "tokenizer",
    "head",
    "templates",
    "registered_model_name",
    "opset",
    "images",
    "max_prob_diff",
    "alias",
    "text_encoder",
    "precision",
    "truncate",
]
EXPORT_SIGNATURES = {
    "export_and_register": ["classes", *EXPORT_OPTIONS, "thresholds"],
    "build_classifier": ["classes", *EXPORT_OPTIONS, "out_dir"],
    "ExportSpec.create": ["classes", *EXPORT_OPTIONS, "thresholds"],
}
CLI_OPTIONS = {
    "export": {
        "--alias",
        "--checkpoint",
        "--classes",
        "--experiment-name",
        "--experiment_name",
        "--head",
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
        "--tokenizer",
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
    "predict": {
        "source",  # the argument: a folder, a CSV of paths or a Parquet table
        "--model-uri",
        "-m",
        "--output",
        "-o",
        "--mode",
        "--top-k",
        "--classes",
        "--templates",
        "--batch-size",
        "--column",
        "--overwrite",
    },
    "benchmark": {
        "--model-uri",
        "-m",
        "--images",
        "--size",
        "--batch",
        "--threads",
        "--seconds",
        "--runtimes",
        "--json",
    },
}
ENTRY_POINTS = {
    "main": {
        "alias",
        "checkpoint",
        "classes",
        "head",
        "images",
        "model",
        "opset",
        "precision",
        "registered_model_name",
        "templates",
        "text_encoder",
        "tokenizer",
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


@requires_export
def test_export_signatures():
    """The export's functions take the options of the one table, keyword-only, in its order."""
    import mlflow_clip.export
    from mlflow_clip.export.options import EXPORT_OPTIONS as TABLE
    from mlflow_clip.export.spec import ExportSpec

    assert set(mlflow_clip.export.__all__) == {"build_classifier", "export_and_register"}
    assert [o.name for o in TABLE if not o.required] == EXPORT_OPTIONS
    assert list(inspect.signature(ExportSpec.create).parameters) == EXPORT_SIGNATURES["ExportSpec.create"]
    for name in ("export_and_register", "build_classifier"):
        parameters = inspect.signature(getattr(mlflow_clip.export, name)).parameters
        assert list(parameters) == EXPORT_SIGNATURES[name], name
        assert all(parameters[p].kind == inspect.Parameter.KEYWORD_ONLY for p in EXPORT_SIGNATURES[name][1:]), name


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
