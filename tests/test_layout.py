"""The layout keeps its promises: no import cycles, no reaching into another module's privates,
modules and functions a person can read (in the package and in the benchmark harness beside it),
the torch-free worlds free of torch, and a layout table (docs/development.md) that names every
part of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "mlflow_clip"
# The comparative benchmark: a top-level folder of the checkout, not installed, held to the same rules.
HARNESS = ROOT / "benchmarks"
FIRST_PARTY = ("mlflow_clip", "benchmarks")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # the body, after the signature and docstring
# MLflow calls a flavor's loader `_load_pyfunc`; the native resize is the extension `_mlflow_clip_resample`.
ALLOWED_PRIVATE_IMPORTS = {"_load_pyfunc", "_mlflow_clip_resample"}  # and the native extension's module
TORCH_FREE = ("mlflow_clip.serving", "mlflow_clip.registry", "mlflow_clip.evaluation", "mlflow_clip.flavor")


def _modules() -> dict[str, Path]:
    out = {}
    for path in [*PACKAGE.rglob("*.py"), *HARNESS.rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for each import in `path`."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for module, names in _imports(name, path):
            if not module.startswith(FIRST_PARTY):
                continue
            for target in [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names] or [module]:
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    targets.add(target)
        edges[name] = targets
    return edges


def test_no_import_cycles():
    edges, state, stack, cycles = _edges(), {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert cycles == []


def test_no_module_reaches_into_another_modules_privates():
    offenders = []
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if module.startswith(FIRST_PARTY) and module != name:
                offenders += [
                    f"{name} imports {module}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__") and n not in ALLOWED_PRIVATE_IMPORTS
                ]
    assert offenders == []


def test_modules_and_functions_are_short_enough_to_read():
    long_modules = [
        f"{n} ({len(p.read_text().splitlines())} lines)"
        for n, p in MODULES.items()
        if len(p.read_text().splitlines()) > MAX_MODULE_LINES
    ]
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_the_torch_free_worlds_import_no_torch_at_module_level():
    """Serving, the registry, evaluation and the flavor never import torch or the export world
    when they are imported (evaluation's `reference=` imports the exporter inside a function)."""
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith(TORCH_FREE):
            continue
        for module, _ in _imports(name, path, top_level_only=True):
            if module.split(".")[0] in ("torch", "torchvision", "clip") or module.startswith("mlflow_clip.export"):
                offenders.append(f"{name} imports {module}")
    assert offenders == []


def test_the_layout_table_names_every_part_of_the_package():
    page = (ROOT / "docs" / "development.md").read_text()
    table = page[page.index("## Layout") :]
    table = table[: table.index("\n## ", 4)] if "\n## " in table[4:] else table
    parts = sorted(
        {
            p.relative_to(PACKAGE).parts[0]
            for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
        }
    )
    missing = [part for part in parts if not re.search(rf"`mlflow_clip/{re.escape(Path(part).stem)}(/|\.py|`)", table)]
    assert missing == []
    # and each folder's row names every module in it
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        row = next(line for line in table.splitlines() if f"`mlflow_clip/{folder.name}/`" in line)
        unnamed = [m.name for m in sorted(folder.glob("*.py")) if m.name != "__init__.py" and f"`{m.name}`" not in row]
        assert unnamed == [], f"docs/development.md's row for mlflow_clip/{folder.name}/ does not name {unnamed}"


def test_ruff_finds_nothing():
    """The lint and format CI holds the tree to (configured in pyproject.toml)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is in the test extra: pip install -e '.[test]'"
    for command in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_the_package_does_not_import_the_benchmark_harness():
    """`benchmarks/` is not installed: nothing in the package may import it."""
    offenders = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if name.startswith("mlflow_clip")
        for module, _ in _imports(name, path)
        if module.split(".")[0] == "benchmarks"
    ]
    assert offenders == []


def test_every_docs_page_the_code_and_docs_name_exists():
    """Module docstrings and pages send readers to docs/...md for figures and reasons; each exists."""
    sources = [*PACKAGE.rglob("*.py"), *HARNESS.rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    sources += [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    named = {
        (path.relative_to(ROOT).as_posix(), page)
        for path in sources
        for page in re.findall(r"\bdocs/[\w./-]+?\.md\b", path.read_text(encoding="utf-8"))
    }
    assert sorted((where, page) for where, page in named if not (ROOT / page).is_file()) == []
