"""The error family is kept: one module holds it, every deliberate raise is a member, the docs list it."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import mlflow_clip.errors as errors
from mlflow_clip.errors import MlflowClipError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlflow_clip"
BUILTIN_ERRORS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}
# Raises of built-in exceptions that must stay built-in, with why.
ALLOWED = {
    # Python's import system expects ImportError from a finder or loader: these refuse to import
    # unverified model code, and run before any of the package can be imported.
    ("serving/__init__.py", "ImportError"),
    ("serving/integrity.py", "ImportError"),
    ("serving/integrity.py", "ModuleNotFoundError"),
    # Module `__getattr__` must raise AttributeError for a name it does not have.
    ("__init__.py", "AttributeError"),
    ("export/__init__.py", "AttributeError"),
    ("registry/__init__.py", "AttributeError"),
    ("gateway.py", "AttributeError"),
    ("errors.py", "AttributeError"),
    ("mlflow_internals.py", "AttributeError"),
    # Raised while `evaluation/builtin.py` is imported, so that importing it fails as an import
    # does when this MLflow's classifier evaluator cannot be replaced.
    ("mlflow_internals.py", "ImportError"),
    # The gateway command exits with the server's status.
    ("gateway.py", "SystemExit"),
    # An abstract method of the tokenizer protocol.
    ("serving/text_tokenizers.py", "NotImplementedError"),
}


def _builtin_raises() -> set[tuple[str, str, int]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id in BUILTIN_ERRORS:
                found.add((path.relative_to(PACKAGE).as_posix(), target.id, node.lineno))
    return found


def test_every_deliberate_raise_is_a_family_member():
    stray = sorted(r for r in _builtin_raises() if r[:2] not in ALLOWED)
    assert stray == [], f"raise a class of mlflow_clip.errors instead of a built-in exception: {stray}"


def test_every_allowed_builtin_raise_still_exists():
    assert {r[:2] for r in _builtin_raises()} >= ALLOWED


def _defined_exception_classes() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & (BUILTIN_ERRORS | set(errors.__all__) | {"MlflowException"}):
                    names.add((path.relative_to(PACKAGE).as_posix(), node.name))
    return names


def test_every_error_class_lives_in_the_error_modules():
    homes = {"errors.py", "serving/errors.py", "serving/loader.py"}  # loader: the MlflowExceptions
    elsewhere = sorted(c for c in _defined_exception_classes() if c[0] not in homes)
    assert elsewhere == []
    assert {name for _, name in _defined_exception_classes()} == set(errors.__all__)


def test_the_family_shares_one_root_and_keeps_builtin_bases():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, MlflowClipError), name
    assert issubclass(errors.SettingsError, ValueError)
    assert issubclass(errors.ModelConfigError, ValueError)
    assert issubclass(errors.LockError, RuntimeError)


def test_docs_errors_page_lists_the_family_and_nothing_else():
    page = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert listed == set(errors.__all__)


def test_the_module_docstring_is_the_hierarchy():
    assert set(re.findall(r"[├└]── (\w+)", errors.__doc__ or "")) | {"MlflowClipError"} == set(errors.__all__)
