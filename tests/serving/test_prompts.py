"""Class names and prompt templates."""

from __future__ import annotations

import pytest

from mlflow_clip.serving.prompts import (
    IMAGENET_TEMPLATES,
    PromptError,
    describe_templates,
    fill_template,
    parse_classes,
    resolve_templates,
    texts_for_class,
)


def test_parse_comma_separated_strips_whitespace():
    assert parse_classes(" a person, a car ,a dog") == ["a person", "a car", "a dog"]


def test_parse_file_one_per_line_keeps_commas(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\nsalt, coarse\npepper\n\n", encoding="utf-8")
    assert parse_classes(f"@{path}") == ["salt, coarse", "pepper"]


def test_parse_file_reads_utf8(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("crème brûlée\n寿司\n", encoding="utf-8")
    assert parse_classes(f"@{path}") == ["crème brûlée", "寿司"]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "No class names"),
        ("a,,b", "Class 1"),
        ("a, ,b", "is empty or blank"),
        ("a cat,A Cat", "duplicates class 0"),
        ("a;b,c", "contains ';'"),
    ],
)
def test_bad_class_lists_are_clear_errors(spec, words):
    with pytest.raises(PromptError, match=words):
        parse_classes(spec)


def test_missing_class_file_says_so(tmp_path):
    with pytest.raises(PromptError, match=r"nope.txt was not found \(looked in "):
        parse_classes(f"@{tmp_path / 'nope.txt'}")


def test_non_utf8_class_file_says_so(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not valid UTF-8"):
        parse_classes(f"@{path}")


def test_presets():
    assert resolve_templates("none") == ["{}"]
    assert resolve_templates("photo") == ["a photo of a {}."]
    assert len(resolve_templates("ensemble")) == 80 == len(set(IMAGENET_TEMPLATES))
    assert describe_templates("ensemble") == "ensemble" and describe_templates(["{}!"]) == "custom"


def test_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# my templates\na sketch of a {}.\n\n{} on a table\n", encoding="utf-8")
    assert resolve_templates(f"@{path}") == ["a sketch of a {}.", "{} on a table"]


@pytest.mark.parametrize("templates", ["bogus", ["no placeholder"], ["two {} {}"]])
def test_bad_templates(templates):
    with pytest.raises(PromptError):
        resolve_templates(templates)


@pytest.mark.parametrize(
    "template, name, expected",
    [
        ("a photo of a {}.", "car", "a photo of a car."),
        ("a photo of a {}.", "a car", "a photo of a car."),
        ("a photo of a {}.", "an apple", "a photo of an apple."),
        ("a photo of a {}.", "the Eiffel tower", "a photo of the Eiffel tower."),
        ("a photo of the {}.", "a car", "a photo of the car."),
        ("a photo of a clean {}.", "a car", "a photo of a clean car."),
        ("a {} in a video game.", "an apple", "an apple in a video game."),
        ("{}", "a red circle", "a red circle"),
        ("{} on a table", "a cup", "a cup on a table"),
        ("photo of {}", "a cup", "photo of a cup"),
        ("A photo of a {}.", "An owl", "A photo of an owl."),
    ],
)
def test_fill_template_never_doubles_articles(template, name, expected):
    assert fill_template(template, name) == expected


def test_no_ensemble_text_has_a_doubled_article():
    for text in texts_for_class("a car", IMAGENET_TEMPLATES) + texts_for_class("an apple", IMAGENET_TEMPLATES):
        words = text.lower().replace(".", "").split()
        assert not any(a in {"a", "an", "the"} and b in {"a", "an", "the"} for a, b in zip(words, words[1:])), text
