"""Each export option is written once (mlflow_clip/export/options.py): the command's options and
help, `ExportSpec.create`, the Python signatures and the docs table come from it, and MLproject,
which MLflow reads as a file, is held to it here."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml
from helpers import ROOT, requires_export

from mlflow_clip.export.options import EXPORT_OPTIONS, SpecError, markdown_table, option
from mlflow_clip.export.spec import ExportSpec

TABLE_HEADER = "| parameter | default | meaning |"


def _main_entry_point() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text(encoding="utf-8"))["entry_points"]["main"]


def _docs_table() -> tuple[str, str]:
    """The parameter table, from docs/export.md (or the README, where it used to live)."""
    for name in ("docs/export.md", "README.md"):
        path = ROOT / name
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if TABLE_HEADER in text:
            rows = text[text.index(TABLE_HEADER) :].split("\n\n")[0]
            return name, rows.strip()
    pytest.fail(f"no parameter table ({TABLE_HEADER}) in docs/export.md or README.md")


def test_mlproject_declares_each_option_with_its_default_and_passes_it_on():
    main = _main_entry_point()
    declared = [o for o in EXPORT_OPTIONS if o.declared]
    assert list(main["parameters"]) == [o.name for o in declared]
    for o in declared:
        parameter = main["parameters"][o.name]
        assert parameter["type"] == "string", o.name
        assert parameter.get("default") == o.text_default, o.name  # classes: no default, so MLflow requires it
    command = main["command"].split()
    assert command[:4] == ["python", "-m", "mlflow_clip.cli", "export"]
    passed = dict(zip(command[4::2], command[5::2]))
    assert passed == {o.flags[0]: "{" + o.name + "}" for o in declared}
    assert not {o.name for o in EXPORT_OPTIONS if not o.declared} & set(main["parameters"])


def test_the_docs_table_is_the_option_table():
    where, table = _docs_table()
    assert table == markdown_table(), (
        f"{where}'s parameter table differs from mlflow_clip/export/options.py; paste this:\n{markdown_table()}"
    )


def test_the_export_command_takes_each_option_with_its_default_and_help():
    from mlflow_clip.cli import cli

    params = {p.name: p for p in cli.commands["export"].params if p.name != "experiment_name"}
    assert list(params) == [o.name for o in EXPORT_OPTIONS]
    for o in EXPORT_OPTIONS:
        assert tuple(params[o.name].opts) + tuple(params[o.name].secondary_opts) == o.flags
        assert params[o.name].required == o.required
        assert o.required or params[o.name].default == o.text_default
        assert params[o.name].help == o.help
    assert "hf:<folder>" in option("model").help


@requires_export
def test_python_signatures_list_each_option_with_its_default():
    from mlflow_clip.export.job import build_classifier, export_and_register

    for function, own in ((export_and_register, ["thresholds"]), (build_classifier, ["out_dir"])):
        parameters = inspect.signature(function).parameters
        expected = {o.name: o.default for o in EXPORT_OPTIONS if not o.required}
        assert list(parameters) == ["classes", *expected, *own]
        assert {name: parameters[name].default for name in expected} == expected


def test_text_from_the_command_line_means_what_the_typed_value_means():
    typed = ExportSpec.create("a,b", model="demo", opset=14, text_encoder=False, truncate=True, max_prob_diff=1e-3)
    text = ExportSpec.create(
        "a,b", model="demo", opset="14", text_encoder="false", truncate="true", max_prob_diff="1e-3"
    )
    assert typed == text and typed.thresholds.max_prob_diff == 1e-3
    assert ExportSpec.create("a,b", model="demo", max_prob_diff="").thresholds.max_prob_diff == 1e-4


@pytest.mark.parametrize(
    "options, words",
    [
        ({"text_encoder": "maybe"}, "Received text_encoder='maybe'; expected true or false."),
        ({"max_prob_diff": "lots"}, "Received max_prob_diff='lots'; expected a number"),
        ({"opset": "seventeen"}, "Received opset='seventeen'; expected a whole number, 12 or newer"),
        ({"precision": "fp8"}, "Received precision='fp8'; expected one of fp32, fp16, int8, bf16."),
        ({"temperature": 2}, "Received unknown export option(s) temperature; expected classes, model,"),
    ],
)
def test_bad_values_are_named_with_what_is_expected(options, words):
    with pytest.raises(SpecError, match=re.escape(words)):
        ExportSpec.create("a,b", model="demo", **options)
