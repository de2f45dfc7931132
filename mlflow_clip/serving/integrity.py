"""A model's serving code imports only verified source: the check that runs before any of it.

MLflow's own loaders (`mlflow.pyfunc.load_model`, `mlflow models serve`, `spark_udf`, MLServer)
put the model's `code/` first on `sys.path` and import the model's loader from it: the model's
copy of this package runs before anything can check the model. So the package's `__init__`, the
one file that runs unchecked, checks this module's source against the manifest and calls
`protect`, which, before any other module of the package runs:

1. installs `VerifiedSourceFinder`, which imports every module of the package from its source,
   read once, checked against its SHA-256 in the manifest and compiled from the bytes checked:
   no bytecode is read or written, so a stray `.pyc` never runs in place of its source (and
   the native resize's binary is checked before it is loaded);
2. checks all of `code/` against the manifest (`manifest.verify_manifest(code_only=True)`):
   every listed file unchanged, nothing unlisted, `__pycache__` included (`bytecode.py`).

The rest of the directory (graphs, vocabulary, MLmodel) is checked when the loader reads it,
where `model_config={"verify": False}` can still turn that off; `MLFLOW_CLIP_VERIFY=0` turns off
both. This is a self-check: it finds a model changed in part (a module edited, a file or a
`.pyc` added), not one rewritten whole with its manifest recomputed, nor a change to `__init__`
itself. Loads that mlflow-clip controls (`mlflow_clip.load_model`, `mlflow-clip serve`,
promotion, evaluation, the Spark helper) check the manifest against the registry first, with
the installed library, before any of the model's code is imported.

    >>> protect(package, "model/code/" + package, "model", read_mlmodel("model"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping

CODE_DIR_NAME = "code"
# model_config cannot turn this check off: it runs before the model's loader is called.
IMPORT_OPT_OUT = "set MLFLOW_CLIP_VERIFY=0 (model_config={'verify': False} comes too late for code)"


class VerifiedSourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of one package, each only as the manifest lists it (source or binary)."""

    def __init__(self, package: str, directory: Path, digests: Mapping[str, str]):
        self.package, self.directory, self.digests = package, Path(directory), dict(digests)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        prefix = self.package + "."
        if not fullname.startswith(prefix) or "." in fullname[len(prefix) :]:
            return None
        name = fullname[len(prefix) :]
        if f"{name}.py" in self.digests:
            file = self.directory / f"{name}.py"
            loader: importlib.abc.Loader = VerifiedSourceLoader(fullname, file, self.digests[f"{name}.py"])
        else:
            found = [s for s in importlib.machinery.EXTENSION_SUFFIXES if f"{name}{s}" in self.digests]
            if not found:
                raise ModuleNotFoundError(f"{fullname} is not in the model's manifest", name=fullname)
            file = self.directory / f"{name}{found[0]}"
            loader = VerifiedExtensionLoader(fullname, str(file), self.digests[file.name])
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def _verified(path: Path | str, digest: str) -> bytes:
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ImportError(f"{Path(path).name} does not match the model's manifest (it changed after it was saved)")
    return data


class VerifiedSourceLoader(importlib.abc.InspectLoader):
    """Runs a module from its source, checked against its digest; never reads or writes bytecode."""

    def __init__(self, fullname: str, path: Path, digest: str):
        self.fullname, self.path, self.digest = fullname, path, digest

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.get_code(module.__name__), module.__dict__)

    def get_code(self, fullname: str):
        return compile(_verified(self.path, self.digest), str(self.path), "exec", dont_inherit=True)

    def get_source(self, fullname: str) -> str:
        return importlib.util.decode_source(_verified(self.path, self.digest))

    def is_package(self, fullname: str) -> bool:
        return False


class VerifiedExtensionLoader(importlib.machinery.ExtensionFileLoader):
    """Loads a native module only if its file matches its digest."""

    def __init__(self, fullname: str, path: str, digest: str):
        super().__init__(fullname, path)
        self.digest = digest

    def create_module(self, spec):
        _verified(self.path, self.digest)
        return super().create_module(spec)


def protect(package: str, package_dir: str | os.PathLike, model_dir: str | os.PathLike, mlmodel: Mapping) -> None:
    """Import the rest of `package` only from verified source, then check all of `code/`.

    Raises MLflow's `MlflowException` naming each problem; the model's `code/` is then taken
    off `sys.path` again, so that nothing else imports from it.
    """
    root, directory = Path(model_dir), Path(package_dir)
    files = mlmodel["flavors"]["mlflow_clip"]["manifest"]["files"]
    prefix = directory.relative_to(root).as_posix() + "/"
    digests = {rel[len(prefix) :]: digest for rel, digest in files.items() if rel.startswith(prefix)}
    finder = VerifiedSourceFinder(package, directory, digests)
    sys.meta_path.insert(0, finder)
    try:
        manifest = importlib.import_module(f"{package}.manifest")
        problems = manifest.verify_manifest(root, mlmodel, code_only=True)
        message = manifest.integrity_message(root, problems, IMPORT_OPT_OUT) if problems else None
    except ImportError as e:
        message = (
            f"The model at {root} does not match the manifest written when it was saved: {e}. Load the version "
            f"as it was registered (download it again); if you edited it on purpose, {IMPORT_OPT_OUT}."
        )
    if message is not None:
        refuse(package, root / CODE_DIR_NAME, message)


def refuse(package: str, code_dir: Path, message: str) -> None:
    """Forget the package and the model's `code/` folder, then raise `message`."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_STATE

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "package", None) != package]
    forget_code_dir(code_dir)
    raise MlflowException(message, error_code=INVALID_STATE)


def forget_code_dir(code_dir: Path) -> None:
    """Take a refused model's `code/` off `sys.path`, where MLflow put it before loading."""
    real = os.path.realpath(code_dir)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != real]
