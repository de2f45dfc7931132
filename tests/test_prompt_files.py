"""`@file` class and template lists, expanded on the export and CLI side."""

from __future__ import annotations

import pytest

from mlflow_clip.errors import PromptError
from mlflow_clip.prompt_files import parse_classes, resolve_templates


def test_parse_file_one_per_line_keeps_commas(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\nsalt, coarse\npepper\n\n", encoding="utf-8")
    assert parse_classes(f"@{path}") == ["salt, coarse", "pepper"]


def test_parse_file_reads_utf8(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("crème brûlée\n寿司\n", encoding="utf-8")
    assert parse_classes(f"@{path}") == ["crème brûlée", "寿司"]


def test_missing_class_file_says_so(tmp_path):
    with pytest.raises(PromptError, match=r"nope.txt was not found \(looked in "):
        parse_classes(f"@{tmp_path / 'nope.txt'}")


def test_non_utf8_class_file_says_so(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not valid UTF-8"):
        parse_classes(f"@{path}")


def test_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# my templates\na sketch of a {}.\n\n{} on a table\n", encoding="utf-8")
    assert resolve_templates(f"@{path}") == ["a sketch of a {}.", "{} on a table"]
