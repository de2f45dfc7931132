"""Class names and prompt templates: parsing user input and turning classes into texts.

Pure Python, so both the exporter and the serving side (per-request labels) can use it.

    >>> parse_classes("a red circle, a blue square")
    ['a red circle', 'a blue square']
    >>> fill_template("a photo of a {}.", "an apple")
    'a photo of an apple.'
"""

from __future__ import annotations

import re
from typing import Sequence

from .errors import PromptError, shown

# The 80 prompt templates CLIP's authors used for zero-shot ImageNet.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

PHOTO_TEMPLATE = "a photo of a {}."
TEMPLATE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": ("{}",),
    "photo": (PHOTO_TEMPLATE,),
    "ensemble": IMAGENET_TEMPLATES,
}
PLACEHOLDER = "{}"
# Characters that would break the edge output name `scores-0:classA;1:classB`.
FORBIDDEN_CLASS_CHARS = (";",)

_LEADING_ARTICLE = re.compile(r"^(a|an|the)\s+(?=\S)", re.IGNORECASE)
_DETERMINERS = frozenset("a an the my one many this that these those some your his her their our its".split())
_INDEFINITE_BEFORE_PLACEHOLDER = re.compile(r"\b(a|an)\s+$", re.IGNORECASE)


def parse_classes(spec: str | Sequence[str], source: str = "") -> list[str]:
    """Parse `a,b,c` or a list of names (`mlflow_clip.prompt_files` reads `@file` into a list);
    `source` names where the list came from in errors.

    Raises PromptError for empty, blank or duplicate names.
    """
    if isinstance(spec, str):
        names, source = _split_class_spec(spec), source or "the classes parameter"
    else:
        names, source = list(spec), source or "the class list"
    if not names:
        raise PromptError(f"No class names in {source}; expected at least one, e.g. 'a cat,a dog'.")
    cleaned = [str(name).strip() for name in names]
    _check_class_names(cleaned, source)
    return cleaned


def _split_class_spec(spec: str) -> list[str]:
    return spec.split(",") if spec.strip() else []


def _check_class_names(names: list[str], source: str) -> None:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if not name:
            raise PromptError(
                f"Class {index} in {source} is empty or blank; remove it or give it a name "
                "(a trailing or doubled comma is the usual cause)."
            )
        for char in FORBIDDEN_CLASS_CHARS:
            if char in name:
                raise PromptError(
                    f"Class {index} ({shown(name)}) contains {char!r}, which separates classes in the "
                    "model's output name; rephrase the class without it."
                )
        key = name.casefold()
        if key in seen:
            raise PromptError(
                f"Class {index} ({shown(name)}) duplicates class {seen[key]} ({shown(names[seen[key]])}) in "
                f"{source}; each class name must be unique (ignoring case)."
            )
        seen[key] = index


def resolve_templates(spec: str | Sequence[str], source: str = "") -> list[str]:
    """Return the templates for `none`, `photo`, `ensemble` or an explicit list (`@file` is read
    into a list by `mlflow_clip.prompt_files`); `source` names where the list came from in errors."""
    if isinstance(spec, str):
        key = spec.strip()
        if key in TEMPLATE_PRESETS:
            return list(TEMPLATE_PRESETS[key])
        raise PromptError(
            f"Received templates={shown(spec)}; expected one of {sorted(TEMPLATE_PRESETS)} "
            "or a list of templates containing {} (or, when exporting, @path to a file of them)."
        )
    templates, source = [str(t) for t in spec], source or "the template list"
    if not templates:
        raise PromptError(f"No templates in {source}; expected at least one line containing {{}}.")
    for index, template in enumerate(templates):
        if template.count(PLACEHOLDER) != 1:
            raise PromptError(
                f"Template {index} in {source} ({shown(template)}) must contain the placeholder {{}} "
                "exactly once, e.g. 'a photo of a {}.'"
            )
    return templates


def describe_templates(spec: str | Sequence[str]) -> str:
    """A short, stable name for the templates, as recorded in the model."""
    if isinstance(spec, str) and spec.strip() in TEMPLATE_PRESETS:
        return spec.strip()
    return "custom"


def fill_template(template: str, class_name: str) -> str:
    """Put a class name into a template without doubling articles.

    `a photo of a {}.` + `a car` gives `a photo of a car.`, and + `an apple` gives
    `a photo of an apple.`; a class without an article is inserted unchanged, as in CLIP.
    """
    prefix, _, suffix = template.partition(PLACEHOLDER)
    article = _LEADING_ARTICLE.match(class_name)
    if article is None or not _has_determiner(prefix):
        return f"{prefix}{class_name}{suffix}"
    bare = class_name[article.end() :]
    indefinite = _INDEFINITE_BEFORE_PLACEHOLDER.search(prefix)
    if indefinite is not None:
        # The template's "a"/"an" right before the class takes the class's own article.
        own = article.group(1)
        prefix = prefix[: indefinite.start()] + _match_case(own, indefinite.group(1)) + " "
    return f"{prefix}{bare}{suffix}"


def strip_article(name: str) -> str:
    """`a red circle` -> `red circle`; names without a leading article are returned unchanged."""
    return _LEADING_ARTICLE.sub("", name, count=1)


def texts_for_class(class_name: str, templates: Sequence[str]) -> list[str]:
    """All prompt texts for one class, in template order."""
    return [fill_template(template, class_name) for template in templates]


def _has_determiner(prefix: str) -> bool:
    words = re.findall(r"[A-Za-z']+", prefix.lower())
    return any(word in _DETERMINERS for word in words)


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word.lower()
