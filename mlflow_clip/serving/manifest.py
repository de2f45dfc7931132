"""The manifest: the SHA-256 of every file of a model directory that decides a prediction.

`save_model` records it in MLmodel (`flavors.mlflow_clip.manifest`); the export tags the
registered version with its digest (`manifest_sha256`). Covered: every file the model directory
holds (the graphs, the vocabulary, the JSON sidecars, each file under `code/`, the native
resize's source and binary among them) and the MLmodel file itself, canonicalized (its `flavors` and
`signature` as parsed data, so re-serializing the YAML changes nothing). Not covered: the
environment files MLflow itself rewrites (`requirements.txt`, `conda.yaml`, `python_env.yaml`,
`constraints.txt`, through `mlflow.models.update_model_requirements`), the input examples and
MLflow's own bookkeeping files, none of which decide a prediction.

Under `code/`, any file the manifest does not list is reported as added, since Python could
import it. That includes `__pycache__`: a bytecode cache is accepted at load only when it is
provably the compilation of its verified source (Python's own cache, written when a plain MLflow
load imported the model's code; `bytecode.py` says how that is proven), and refused by promotion,
which reads a fresh download where none can legitimately exist. Where the manifest is pinned
(the registered version's `manifest_sha256` tag), `check_manifest` also compares the manifest's
own digest with the pin: a directory rewritten whole, its manifest recomputed, is refused too.

    >>> problems = verify_manifest("path/to/model")  # doctest: +SKIP
    >>> describe_problems(problems)  # doctest: +SKIP
    'clip_classifier.json changed'
"""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .bytecode import BYTECODE_DIR, bytecode_problem, source_of
from .contract import CODE_DIR_NAME, FLAVOR_NAME, MLMODEL_FILE_NAME, FlavorKey, sha256_bytes, sha256_file
from .errors import ModelIntegrityError

ALGORITHM = "sha256"
NOT_COVERED = frozenset(
    {
        MLMODEL_FILE_NAME,  # covered as canonical data instead (the manifest lives in it)
        "requirements.txt",
        "conda.yaml",
        "python_env.yaml",
        "constraints.txt",
        "input_example.json",
        "serving_input_example.json",
        "registered_model_meta",
        "environment_variables.txt",
    }
)
HASH_THREADS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Problem:
    """One way a model directory differs from its manifest."""

    path: str
    kind: str  # "changed", "missing", "added", "outside the model directory", "no manifest"

    def __str__(self) -> str:
        return f"{self.path} {self.kind}"


def read_mlmodel(model_dir: str | Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(model_dir) / MLMODEL_FILE_NAME).read_text(encoding="utf-8")) or {}


def canonical_mlmodel(mlmodel: Mapping[str, Any]) -> bytes:
    """The parts of MLmodel that decide predictions (flavors and signature), as canonical JSON,
    without the manifest itself."""
    flavors = copy.deepcopy(dict(mlmodel.get("flavors") or {}))
    if isinstance(flavors.get(FLAVOR_NAME), dict):
        flavors[FLAVOR_NAME].pop(FlavorKey.MANIFEST, None)
    document = {"flavors": flavors, "signature": mlmodel.get("signature")}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def covered_files(model_dir: str | Path) -> list[str]:
    """Relative POSIX paths of the files the manifest covers, sorted."""
    root = Path(model_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != BYTECODE_DIR)
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in NOT_COVERED:
                found.append(rel)
    return sorted(found)


def build_manifest(model_dir: str | Path, mlmodel: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of `model_dir`, whose MLmodel content (without the manifest) is `mlmodel`."""
    root = Path(model_dir)
    names = covered_files(root)
    files = dict(zip(names, _hash_all([root / name for name in names])))
    return {"algorithm": ALGORITHM, "mlmodel": sha256_bytes(canonical_mlmodel(mlmodel)), "files": files}


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, the largest first, in parallel threads (hashlib releases the GIL)."""
    order = sorted(range(len(paths)), key=lambda i: -paths[i].stat().st_size)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = dict(zip(order, pool.map(lambda i: sha256_file(paths[i]), order)))
    return [digests[i] for i in range(len(paths))]


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The digest of a manifest, as the registered version's `manifest_sha256` tag records it."""
    return sha256_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


def recorded_manifest(mlmodel: Mapping[str, Any]) -> dict[str, Any] | None:
    conf = (mlmodel.get("flavors") or {}).get(FLAVOR_NAME) or {}
    manifest = conf.get(FlavorKey.MANIFEST)
    return manifest if isinstance(manifest, dict) else None


def verify_manifest(
    model_dir: str | Path,
    mlmodel: Mapping[str, Any] | None = None,
    allow_bytecode: bool = True,
    code_only: bool = False,
) -> list[Problem]:
    """Every difference between `model_dir` and the manifest in its MLmodel ([] when none).

    `allow_bytecode`: accept Python's own caches of verified modules (else every `.pyc` is an
    added file). `code_only`: check `code/` alone (what must hold before any of it is imported).
    """
    root = Path(model_dir)
    mlmodel = read_mlmodel(root) if mlmodel is None else mlmodel
    manifest = recorded_manifest(mlmodel)
    if manifest is None or manifest.get("algorithm") != ALGORITHM or not isinstance(manifest.get("files"), dict):
        return [Problem(MLMODEL_FILE_NAME, "has no manifest")]
    problems = []
    if not code_only and sha256_bytes(canonical_mlmodel(mlmodel)) != manifest.get("mlmodel"):
        problems.append(Problem(MLMODEL_FILE_NAME, "changed"))
    real_root = root.resolve()
    present = []
    for rel in sorted(manifest["files"]):
        if code_only and not rel.startswith(f"{CODE_DIR_NAME}/"):
            continue
        problem = _where_problem(root, real_root, rel)
        if problem is None:
            present.append(rel)
        else:
            problems.append(problem)
    for rel, actual in zip(present, _hash_all([root / rel for rel in present])):
        if actual != manifest["files"][rel]:
            problems.append(Problem(rel, "changed"))
    problems.extend(_added_code(root, manifest["files"], allow_bytecode))
    return sorted(problems, key=lambda p: (p.path != MLMODEL_FILE_NAME, p.path))


def _where_problem(root: Path, real_root: Path, rel: str) -> Problem | None:
    path = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return Problem(rel, "outside the model directory")
    if not path.is_file():
        return Problem(rel, "missing")
    if not path.resolve().is_relative_to(real_root):
        return Problem(rel, "outside the model directory")
    return None


def _added_code(root: Path, files: Mapping[str, str], allow_bytecode: bool) -> list[Problem]:
    code = root / CODE_DIR_NAME
    if not code.is_dir():
        return []
    added = []
    for dirpath, dirnames, filenames in os.walk(code):
        # a linked folder is not walked into, but Python would import from it
        added += [
            Problem(f"{Path(dirpath, d).relative_to(root).as_posix()}", "added")
            for d in dirnames
            if Path(dirpath, d).is_symlink()
        ]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in files:
                continue
            if Path(dirpath).name != BYTECODE_DIR or not allow_bytecode:
                added.append(Problem(rel, "added"))
            elif (reason := _bytecode_problem(root, path, files)) is not None:
                added.append(Problem(rel, f"added ({reason})"))
    return sorted(added, key=lambda p: p.path)


def _bytecode_problem(root: Path, path: Path, files: Mapping[str, str]) -> str | None:
    """None for Python's own cache of a listed, unchanged module; else why it is refused."""
    found = source_of(path)
    if found is None:
        return "not a cache this Python writes of a module"
    source, optimize = found
    rel = source.relative_to(root).as_posix()
    if rel not in files or not source.is_file():
        return f"a cache of {source.name}, which the manifest does not list"
    data = source.read_bytes()
    if sha256_bytes(data) != files[rel]:
        return f"a cache of {source.name}, which changed"
    return bytecode_problem(path, data, optimize)


def describe_problems(problems: list[Problem], shown: int = 8) -> str:
    parts = [str(p) for p in problems[:shown]]
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(parts) + more


def check_manifest(
    model_dir: str | Path,
    mlmodel: Mapping[str, Any] | None = None,
    pinned: str | None = None,
    pinned_by: str = "the registry's record of it (manifest_sha256 tag)",
) -> None:
    """Raise `ModelIntegrityError` naming every file that differs from the manifest, and the
    manifest itself when its digest is not `pinned` (recorded by `pinned_by`)."""
    mlmodel = read_mlmodel(model_dir) if mlmodel is None else mlmodel
    problems = verify_manifest(model_dir, mlmodel)
    manifest = recorded_manifest(mlmodel)
    if pinned is not None and (manifest is None or manifest_digest(manifest) != pinned):
        pin = Problem(f"the manifest in {MLMODEL_FILE_NAME}", f"differs from {pinned_by} ({pinned[:16]}...)")
        problems.insert(0, pin)
    if problems:
        raise ModelIntegrityError(integrity_message(model_dir, problems))


def integrity_message(model_dir: str | Path, problems: list[Problem], opt_out: str = "") -> str:
    """The error for a model directory that fails its check, with the fix that fits."""
    caches = (
        f", or delete the {BYTECODE_DIR} folders under {CODE_DIR_NAME}/"
        if any(BYTECODE_DIR in p.path for p in problems)
        else ""
    )
    opt_out = opt_out or "load it with model_config={'verify': False} (or MLFLOW_CLIP_VERIFY=0)"
    return (
        f"The model at {model_dir} does not match the manifest written when it was saved: "
        f"{describe_problems(problems)}. Load the version as it was registered (download it again){caches}; "
        f"if you edited it on purpose, {opt_out}."
    )
