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


def test_presets():
    assert resolve_templates("none") == ["{}"]
    assert resolve_templates("photo") == ["a photo of a {}."]
    assert len(resolve_templates("ensemble")) == 80 == len(set(IMAGENET_TEMPLATES))
    assert describe_templates("ensemble") == "ensemble" and describe_templates(["{}!"]) == "custom"


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


def test_served_prompts_read_no_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("a cat\n", encoding="utf-8")
    assert parse_classes(f"@{path}") == [f"@{path}"]  # text, not a path
    with pytest.raises(PromptError, match="placeholder"):
        resolve_templates([f"@{path}"])
