"""The labelled images an evaluation reads: a folder of class subfolders, or a CSV of path,label.

Folder and label names are matched to the model's classes exactly, then ignoring case, then
ignoring a leading article ("red circle" finds "a red circle").

    >>> items = load_labelled_images("data/val", ["a red circle", "a blue square"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from mlflow_clip.errors import EvaluationError
from mlflow_clip.package_data import IMAGE_SUFFIXES
from mlflow_clip.serving.prompts import strip_article

_logger = logging.getLogger(__name__)

_MAX_LISTED = 40


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation image: `name` is what reports show, `label` one of the model's classes,
    `source` a file to read or the image value itself (encoded bytes, base64 text, ...)."""

    name: str
    label: str
    source: Any

    def read(self) -> Any:
        return self.source.read_bytes() if isinstance(self.source, Path) else self.source


def map_labels(names: Sequence[str], classes: Sequence[str], source: str = "the data") -> dict[str, str]:
    """Map each dataset label to one of the model's classes: exactly, then ignoring case, then
    ignoring a leading article ('red circle' -> 'a red circle').

    Raises EvaluationError listing every label that matches no class (or several), and the classes.

        >>> map_labels(["Red Circle", "blue square"], ["a red circle", "a blue square"])
        {'Red Circle': 'a red circle', 'blue square': 'a blue square'}
    """
    lookups = [
        _lookup(classes, lambda s: s),
        _lookup(classes, str.casefold),
        _lookup(classes, lambda s: strip_article(s.strip()).casefold()),
    ]
    mapping, unmatched = {}, []
    for name in dict.fromkeys(names):
        mapping[name] = _match(name, lookups)
        if mapping[name] is None:
            unmatched.append(name)
    if unmatched:
        raise EvaluationError(_unmatched_message(unmatched, classes, source))
    return mapping


def _lookup(classes: Sequence[str], key: Callable[[str], str]) -> tuple[Callable[[str], str], dict[str, list[str]]]:
    table: dict[str, list[str]] = {}
    for name in classes:
        table.setdefault(key(name), []).append(name)
    return key, table


def _match(name: str, lookups) -> str | None:
    for key, table in lookups:
        found = table.get(key(name), [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            return None  # ambiguous at this level: the user must use an exact class name
    return None


def _unmatched_message(unmatched: list[str], classes: Sequence[str], source: str) -> str:
    return (
        f"{len(unmatched)} label(s) in {source} match none of the model's classes: {listing(unmatched)}. "
        f"The model's {len(classes)} classes are: {listing(classes)}. Labels match a class exactly, "
        "ignoring case, or ignoring a leading 'a', 'an' or 'the'; rename the class folders (or the "
        "CSV's label values) to the model's class names, or evaluate a model exported with these classes."
    )


def listing(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_MAX_LISTED])
    return shown + (f" (and {len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else "")


def load_labelled_images(data: str | Path, classes: Sequence[str]) -> list[LabelledImage]:
    """The images of `data` with their labels mapped to `classes`.

    `data`: a folder with one subfolder per class (files with an image suffix are used), or a CSV
    file with `path,label` columns (relative paths are resolved against the CSV's folder).

        >>> items = load_labelled_images("val", ["a red circle", "a blue square"])  # doctest: +SKIP
        >>> items[0].name, items[0].label  # doctest: +SKIP
        ('red circle/0001.png', 'a red circle')
    """
    path = Path(data).expanduser()
    if path.is_dir():
        pairs = _folder_pairs(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path)
    else:
        raise EvaluationError(
            f"Received data={str(data)!r}; expected a folder with one subfolder of images per class, "
            "or a .csv file with 'path' and 'label' columns. "
            + ("No such file or folder." if not path.exists() else "")
        )
    mapping = map_labels([label for _, _, label in pairs], classes, source=str(path))
    return [LabelledImage(name, mapping[label], source) for name, source, label in pairs]


def _folder_pairs(root: Path) -> list[tuple[str, Path, str]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    pairs = [
        (f"{folder.name}/{file.name}", file, folder.name)
        for folder in folders
        for file in sorted(folder.iterdir())
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not pairs:
        raise EvaluationError(
            f"The folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders; expected "
            f"{root}/<class name>/<image>, e.g. {root}/a cat/0001.jpg, or a CSV with path,label columns."
        )
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        _logger.warning("Ignoring %d image(s) directly in %s (not in a class subfolder)", len(loose), root)
    return pairs


def _csv_pairs(csv_path: Path) -> list[tuple[str, Path, str]]:
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise EvaluationError(
            f"The CSV {csv_path} has columns {list(table.columns)}; expected 'path' and 'label' "
            f"(missing {missing}). Write a header line 'path,label'."
        )
    blank = [
        i + 2 for i, (p, label) in enumerate(zip(table["path"], table["label"])) if not p.strip() or not label.strip()
    ]
    if blank:
        raise EvaluationError(
            f"The CSV {csv_path} has an empty path or label on line(s) {listing(blank)}; fill or remove them."
        )
    if table.empty:
        raise EvaluationError(f"The CSV {csv_path} lists no images; expected one 'path,label' row per image.")
    base = csv_path.resolve().parent
    return [
        (p.strip(), base / Path(p.strip()).expanduser(), label.strip())
        for p, label in zip(table["path"], table["label"])
    ]
