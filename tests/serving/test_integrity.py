"""Nothing a model directory holds runs before it is checked: Python's own bytecode caches are
told apart from forged ones, and MLflow's own loaders import a model's serving code only from
verified source (tampering with a marker file the injected code would write)."""

from __future__ import annotations

import importlib.util
import json
import marshal
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env
from tampering import INJECTIONS, package

import mlflow_clip
from mlflow_clip.serving.manifest import verify_manifest

TAG = sys.implementation.cache_tag


@pytest.fixture()
def model(colour_model_dir, tmp_path) -> Path:
    """A private copy of the colour model without any bytecode cache."""
    copy = Path(shutil.copytree(colour_model_dir, tmp_path / "model", ignore=shutil.ignore_patterns("__pycache__")))
    return copy


def _python_s_own_caches(model: Path) -> list[Path]:
    """What Python writes itself: a timestamp .pyc of each module, as an import or
    `python -m compileall` would (and one at -O, `.opt-1`)."""
    written = []
    for source in sorted((model / "code").rglob("*.py")):
        written.append(Path(py_compile.compile(str(source), doraise=True)))
    source = model / "code" / package(model) / "loader.py"
    written.append(Path(py_compile.compile(str(source), optimize=1, doraise=True)))
    return written


def _problems(model: Path) -> dict[str, str]:
    return {p.path: p.kind for p in verify_manifest(model)}


def test_python_s_own_caches_are_accepted_wherever_the_directory_moved(model, tmp_path):
    caches = _python_s_own_caches(model)
    assert any(".opt-1." in c.name for c in caches) and len(caches) > 20
    assert _problems(model) == {}
    moved = Path(shutil.copytree(model, tmp_path / "moved"))  # the caches name the old paths inside
    assert _problems(moved) == {}
    assert mlflow_clip.load_model(str(moved)).classes == ["red", "green", "blue"]
    # promotion reads a fresh download, where no cache can legitimately be
    assert verify_manifest(moved, allow_bytecode=False)


def _forge(model: Path, name: str, flags: int, header: bytes, code) -> str:
    cache = model / "code" / package(model) / "__pycache__" / name
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + header + marshal.dumps(code))
    return cache.relative_to(model).as_posix()


def test_forged_bytecode_is_refused_whatever_its_header_says(model, tmp_path):
    """Each header Python trusts, on a body that is not the source's compilation; the honest
    body under a header Python never writes; another Python's cache; a sourceless .pyc."""
    source = model / "code" / package(model) / "classifier.py"
    honest = compile(source.read_bytes(), str(source), "exec", dont_inherit=True)
    evil = compile(source.read_text() + "\nopen('/dev/null', 'w')\n", str(source), "exec", dont_inherit=True)
    stat = source.stat()
    timestamp = int(stat.st_mtime).to_bytes(4, "little") + stat.st_size.to_bytes(4, "little")
    source_hash = importlib.util.source_hash(source.read_bytes())
    cases = {
        "timestamp header of the source": (f"classifier.{TAG}.pyc", 0, timestamp, evil, "not the compilation"),
        "checked hash of the source": (f"classifier.{TAG}.pyc", 3, source_hash, evil, "not the compilation"),
        "unchecked hash, honest body": (f"classifier.{TAG}.pyc", 1, source_hash, honest, "unchecked hash-based"),
        "a module the manifest lacks": (f"sitecustomize.{TAG}.pyc", 0, timestamp, honest, "does not list"),
        "another Python's cache": ("classifier.cpython-399.pyc", 0, timestamp, honest, "not a cache this Python"),
        "an optimization level of its own": (f"classifier.{TAG}.opt-2.pyc", 0, timestamp, honest, "not the compil"),
    }
    for how, (name, flags, header, code, reason) in cases.items():
        copy = Path(shutil.copytree(model, tmp_path / how.replace(" ", "-")))
        rel = _forge(copy, name, flags, header, code)
        assert reason in _problems(copy).get(rel, ""), (how, _problems(copy))
    oversized = Path(shutil.copytree(model, tmp_path / "oversized"))
    rel = _forge(oversized, f"classifier.{TAG}.pyc", 0, timestamp, tuple(range(10**6)))
    assert "more than any compilation" in _problems(oversized)[rel]
    (model / "code" / package(model) / "classifier.pyc").write_bytes(b"")  # Python imports these sourceless
    assert _problems(model) == {f"code/{package(model)}/classifier.pyc": "added"}


_PLAIN_LOADS = r"""
import json, os, sys, mlflow
from mlflow.exceptions import MlflowException
cases, pristine = json.loads(sys.argv[1]), sys.argv[2]
for model, marker, expected in cases:
    try:
        mlflow.pyfunc.load_model(model)
        raise SystemExit(f"{model} loaded")
    except MlflowException as e:
        assert expected in e.message and "MLFLOW_CLIP_VERIFY=0" in e.message, e.message
    assert not os.path.exists(marker), marker
    assert not any(os.path.realpath(p).startswith(model) for p in sys.path), "the refused code/ stays on sys.path"
import onnxruntime  # the real one, now that the refused model's code/ is off the path
assert "site-packages" in onnxruntime.__file__, onnxruntime.__file__
model = mlflow.pyfunc.load_model(pristine)
loaders = {n: type(m.__loader__).__name__ for n, m in sys.modules.items() if n.startswith("mlflow_clip_serving_")}
print("LOADERS " + json.dumps(loaders))
"""


def test_mlflow_s_own_loader_imports_only_verified_source(model, tmp_path):
    """`mlflow.pyfunc.load_model` imports the model's serving package first: its `__init__`
    checks the rest before any other module runs, and every module comes from checked source,
    never from bytecode. Each injection is refused naming its file, and its code never runs."""
    cases = []
    for how, inject in INJECTIONS.items():
        copy = Path(shutil.copytree(model, tmp_path / how.replace(" ", "-")))
        marker = tmp_path / f"{copy.name}.ran"
        cases.append((str(copy.resolve()), str(marker), inject(copy, marker)))
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOADS, json.dumps(cases), str(model)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    loaders = json.loads(done.stdout.split("LOADERS ", 1)[1])
    pkg = package(model)
    assert loaders.pop(pkg) == "SourceFileLoader"  # the one file Python imports itself (and caches)
    loaders.pop(f"{pkg}.integrity")  # which __init__ checked and ran
    assert loaders.pop(f"{pkg}._mlflow_clip_resample") == "VerifiedExtensionLoader"  # checked, then loaded
    assert set(loaders.values()) == {"VerifiedSourceLoader"} and f"{pkg}.classifier" in loaders
    assert {p.name for p in (model / "code").rglob("*.pyc")} == {f"__init__.{TAG}.pyc"}  # Python's own, of __init__
    assert _problems(model) == {}  # which the next strict load accepts


def test_the_verified_finder_refuses_a_module_the_manifest_lacks(model):
    from mlflow_clip.serving.integrity import VerifiedSourceFinder

    directory = model / "code" / package(model)
    finder = VerifiedSourceFinder("pkg", directory, {"loader.py": "0" * 64})
    with pytest.raises(ModuleNotFoundError, match="not in the model's manifest"):
        finder.find_spec("pkg.classifier")
    spec = finder.find_spec("pkg.loader")
    assert finder.find_spec("other.loader") is None
    with pytest.raises(ImportError, match="does not match the model's manifest"):
        spec.loader.get_code("pkg.loader")


def test_verify_off_lets_edited_code_run_with_a_warning(model, tmp_path):
    marker = tmp_path / "ran"
    INJECTIONS["a line added to a module"](model, marker)
    script = f"import mlflow; mlflow.pyfunc.load_model({str(model)!r})"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "MLFLOW_CLIP_VERIFY": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists() and "runs unchecked (MLFLOW_CLIP_VERIFY=0)" in done.stderr
