"""The README's commands stay honest: CI runs its test command, its quickstart really runs, and
every bash and python block of the README and of the docs pages that continue its story works
when pasted."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, requires_export, subprocess_env

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", flags=re.S)
# Pages whose blocks run after the README's, in this order, in the same shell and checkout: they
# continue its story (its ./mlflow.db, its versions, its val/ images).
RUN_PAGES = ("docs/limits.md", "docs/batch.md", "docs/performance.md", "docs/evaluation.md", "docs/sources.md")
# Pages with blocks this test does not paste, and why.
NOT_RUN = {
    "docs/mlserver.md": "MLServer runs in an environment of its own; tests/e2e/test_mlserver.py runs its steps",
    "docs/benchmark.md": "the benchmark's own commands, minutes to hours each; tests/bench runs its quick mode",
    "docs/gpu.md": "its blocks need a GPU to show anything; tests/serving/test_gpu.py checks the requirements, "
    "the log and the provider options on a CPU",
}


def readme_commands() -> list[str]:
    """The first two fenced bash blocks of the README: the quickstart, then the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [block.strip() for block in blocks[:2]]


# What a checkout holds that the blocks use (`mlflow run .` runs the installed package).
CHECKOUT_FILES = ("MLproject", "conda.yaml", "README.md", "examples")
README_PORT = 5001  # the port the README's serve blocks use
INSTALL_PREFIX = re.compile(r"^python3 -m venv .*?&& pip install [^&]*&& ")


def page_blocks(page: str) -> list[tuple[str, str]]:
    """Every fenced bash and python block of `page` (relative to the checkout), as (language, text)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(lang, block.strip()) for lang, block in BLOCK.findall(text)]


def readme_blocks() -> list[tuple[str, str, str]]:
    """The README's blocks, then those of RUN_PAGES, in order, as (page, language, text)."""
    return [(page, lang, text) for page in ("README.md", *RUN_PAGES) for lang, text in page_blocks(page)]


def readme_script() -> str:
    """The README and RUN_PAGES as one shell session: the quickstart without its install (done by
    CI), then every later block as written (python ones fed to `python -`), leaving out only the
    test command, which is this suite."""
    (first_page, _, quickstart), _tests, *rest = readme_blocks()
    lines = ["set -euo pipefail"]
    for number, (page, lang, text) in enumerate([(first_page, "bash", INSTALL_PREFIX.sub("", quickstart)), *rest], 1):
        lines.append(f"echo '=== block {number} ({page})' >&2")
        lines.append(text if lang == "bash" else f"python - <<'README_PYTHON'\n{text}\nREADME_PYTHON")
    return "\n".join(lines) + "\n"


def test_every_page_with_blocks_is_run_or_says_why_not():
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md") if BLOCK.search(p.read_text()))
    assert [p for p in pages if p not in RUN_PAGES and p not in NOT_RUN] == []
    assert all(page_blocks(page) for page in (*RUN_PAGES, *NOT_RUN)), "a listed page has no blocks left"


def test_the_readme_links_every_docs_page():
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md"))
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", README))
    assert [p for p in pages if p not in linked and p not in GENERATED_PAGES] == []
    assert [p for p in linked if not (ROOT / "docs" / p).exists()] == []
    for page, via in GENERATED_PAGES.items():
        assert f"]({page}" in (ROOT / "docs" / via).read_text(), f"docs/{via} does not link {page}"


# Pages the README reaches through another page (generated, or detail behind a topic page).
GENERATED_PAGES = {"benchmark.md": "performance.md", "draft_mode.md": "performance.md", "parity_table.md": "export.md"}


def test_readme_opens_with_the_two_commands():
    quickstart, tests = readme_commands()
    assert "mlflow run . --env-manager local -P model=demo" in quickstart
    assert "pytest" in tests
    assert README.index(quickstart) < README.index(tests) < README.index("## ")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = readme_commands()
    assert tests in ci.splitlines()


def test_conda_env_lists_the_same_packages_as_setup():
    import yaml

    setup = (ROOT / "setup.py").read_text()
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for requirement in pip_deps:
        assert f'"{requirement}"' in setup, f"{requirement} is in conda.yaml but not in setup.py"


def test_uv_and_virtualenv_runs_of_the_project_build_the_same_packages():
    """`mlflow run . --env-manager uv|virtualenv` turns the project's conda.yaml into a python
    env with MLflow's own converter: the same Python and exactly the pip packages conda gets."""
    import yaml
    from mlflow.projects._project_spec import load_project
    from mlflow.utils.environment import _PythonEnv

    project = load_project(str(ROOT))
    assert project.env_type == "conda_env" and project.env_config_path.endswith("conda.yaml")
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    python_env = _PythonEnv.from_conda_yaml(project.env_config_path)
    assert python_env.python == "3.11" and python_env.dependencies == pip
    page = " ".join((ROOT / "docs" / "export.md").read_text().split())
    assert "mlflow run . --env-manager uv -P model=demo" in page


@pytest.mark.slow
@requires_export
def test_quickstart_mlflow_run_registers_a_checked_version(tmp_path):
    """Runs the quickstart's `mlflow run` for real, against a temporary tracking store."""
    from mlflow.tracking import MlflowClient

    quickstart, _ = readme_commands()
    mlflow_run = quickstart[quickstart.index("mlflow run .") :]
    argv = shlex.split(mlflow_run)
    argv[argv.index(".")] = str(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = str(Path(sys.executable).parent)
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, PATH=bin_dir + os.pathsep + os.environ["PATH"])
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='clip-zero-shot'")
    assert str(version.version) == "1"
    assert version.tags["parity_status"] == "passed" and version.tags["clip_model"] == "demo"
    assert version.tags["num_classes"] == "3"
    run = client.get_run(version.run_id)
    # mlflow run records entry-point parameters shell-quoted, as it passed them to the command
    assert shlex.split(run.data.params["classes"]) == ["a red circle,a green square,a blue triangle"]
    assert run.data.params["class_names"] == '["a red circle", "a green square", "a blue triangle"]'
    assert run.data.metrics["parity_max_abs_prob_diff"] <= 1e-4
    assert run.data.metrics["parity_max_abs_pixel_diff"] == 0.0


@requires_export
def test_cli_reports_bad_classes_without_a_traceback(tmp_path):
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_clip.cli", "export", "--model", "demo", "--classes", "a,,b"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Class 1" in result.stderr and "Traceback" not in result.stderr


def test_the_readme_script_keeps_every_block():
    script = readme_script()
    assert "pip install" not in script.split("=== block 2")[0]  # the install is left out
    for _page, _lang, text in readme_blocks()[2:]:
        assert text in script, text[:80]
    assert "until curl -sf http://127.0.0.1:5001/ping" in script  # a serve block waits for its server


@pytest.mark.slow
@requires_export
def test_every_readme_block_works_when_pasted(tmp_path):
    """Pastes the README, then the pages that continue it, into one shell, in a checkout with its
    default tracking store (./mlflow.db): quickstart, serving, Python, promotion, rollback,
    evaluation, other sources. Any block that fails stops the run with its number and page."""
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", README_PORT)) == 0:
            pytest.skip(f"port {README_PORT}, which the README's blocks serve on, is in use here")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in CHECKOUT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, checkout / name)
    (checkout / "readme.sh").write_text(readme_script())
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    process = subprocess.Popen(
        ["bash", "readme.sh"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=1500)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a server a failed block left running
    assert process.returncode == 0, output[-6000:]
    blocks = len(readme_blocks()) - 1
    assert f"=== block {blocks} (" in output
    assert '"label": "a red circle"' in output  # the quickstart's server, asked about a red circle
    assert '"label": "a green square"' in output  # production, after the promotion
    # docs/limits.md: an image as the body, then a form of two files, through mlflow-clip serve
    assert '{"predictions": [{"label": "a red circle"}]}' in output, output[-3000:]
    assert re.search(r'"top_labels": \["a green square", "[a-z ]+"\]', output), output[-3000:]
    assert re.search(r"36 rows \['path', 'embedding', 'error'\] \d+ floats each", output), output[-3000:]
    # the history the README prints, under its header: two promotions, then the rollback from version 2 to 1
    assert re.search(r"seq\s+time \(UTC\)\s+event\s+from\s+to\s+outcome\s+by", output), output[-3000:]
    assert re.search(r"promote\s+none\s+1\s+done ", output), output[-3000:]
    assert re.search(r"promote\s+1\s+2\s+done ", output), output[-3000:]
    assert re.search(r"rollback\s+2\s+1\s+done ", output), output[-3000:]
    # the promotion was gated on accuracy: two recorded accuracies, on the same images, compared
    gate = r"gate accuracy: passed in \d+\.\d\d s: accuracy \d\.\d{4} \(version 2\) vs \d\.\d{4} \(version 1,"
    assert re.search(gate, output), output[-3000:]


def test_the_promotion_story_records_both_accuracies_before_the_gated_promotion():
    """The accuracy gate compares the challenger with the holder: both are evaluated (on the
    same images) before the promotion that passes max_accuracy_drop."""
    story = next(text for _page, _lang, text in readme_blocks() if "-P version=challenger -P alias=production" in text)
    lines = story.splitlines()
    evaluated = [i for i, line in enumerate(lines) if "-e evaluate" in line]
    promoted = next(i for i, line in enumerate(lines) if "-P version=challenger" in line)
    data = {re.search(r"-P data=(\S+)", lines[i]).group(1) for i in evaluated}
    models = {re.search(r"model_uri=(\S+)", lines[i]).group(1) for i in evaluated}
    assert models == {"models:/clip-zero-shot@production", "models:/clip-zero-shot@challenger"} and len(data) == 1
    assert max(evaluated) < promoted and "-P max_accuracy_drop=" in lines[promoted]
