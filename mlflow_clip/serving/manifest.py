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
import it; Python's own bytecode caches (`__pycache__`) are ignored at load and refused by
promotion, which reads a fresh download where none can legitimately exist.

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
BYTECODE_DIR = "__pycache__"
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
    model_dir: str | Path, mlmodel: Mapping[str, Any] | None = None, allow_bytecode: bool = True
) -> list[Problem]:
    """Every difference between `model_dir` and the manifest in its MLmodel ([] when none)."""
    root = Path(model_dir)
    mlmodel = read_mlmodel(root) if mlmodel is None else mlmodel
    manifest = recorded_manifest(mlmodel)
    if manifest is None or manifest.get("algorithm") != ALGORITHM or not isinstance(manifest.get("files"), dict):
        return [Problem(MLMODEL_FILE_NAME, "has no manifest")]
    problems = []
    if sha256_bytes(canonical_mlmodel(mlmodel)) != manifest.get("mlmodel"):
        problems.append(Problem(MLMODEL_FILE_NAME, "changed"))
    real_root = root.resolve()
    present = []
    for rel in sorted(manifest["files"]):
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
        if allow_bytecode:
            dirnames[:] = [d for d in dirnames if d != BYTECODE_DIR]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in files:
                added.append(Problem(rel, "added"))
    return sorted(added, key=lambda p: p.path)


def describe_problems(problems: list[Problem], shown: int = 8) -> str:
    parts = [str(p) for p in problems[:shown]]
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(parts) + more


def check_manifest(model_dir: str | Path, mlmodel: Mapping[str, Any] | None = None) -> None:
    """Raise `ModelIntegrityError` naming every file that differs from the manifest."""
    problems = verify_manifest(model_dir, mlmodel)
    if problems:
        raise ModelIntegrityError(
            f"The model at {model_dir} does not match the manifest written when it was saved: "
            f"{describe_problems(problems)}. Load the version as it was registered (download it again), "
            "or, if you edited it on purpose, load it with model_config={'verify': False} "
            "(or MLFLOW_CLIP_VERIFY=0)."
        )
