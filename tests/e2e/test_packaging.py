"""What users install: a wheel built from this tree, installed the regular way (not editable).

An editable install resolves `mlflow_clip` through setuptools' finder, which hides packaging
defects (a missing data file, a model's code copy shadowing the package). These tests build the
wheel, install it into a fresh environment whose only other packages are this environment's
dependencies, and use it there as a user would.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(project_wheel) -> Path:
    return project_wheel


@pytest.fixture(scope="module")
def installed(wheel, module_tmp) -> Path:
    """A new environment with the wheel installed; its dependencies come from this environment's
    site-packages, appended after its own (so the editable install here is not seen)."""
    root = module_tmp("regular")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib, str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _run(python: Path, script: str, cwd: Path, **extra_env: str) -> str:
    env = {k: v for k, v in {**subprocess_env(), **extra_env}.items() if k != "PYTHONPATH" and v != ""}
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_the_wheel_carries_the_package_data_and_the_native_resize(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "mlflow_clip/assets/bpe_simple_vocab_16e6.txt.gz",
        "mlflow_clip/assets/CLIP_LICENSE",
        "mlflow_clip/assets/demo_clip.pt",
        "mlflow_clip/serving/resample.c",
        "mlflow_clip/assets/sample_images/manifest.json",
        "mlflow_clip/benchmark.py",  # `mlflow-clip benchmark`: a given model on the user's machine
    ):
        assert expected in names
    assert any(n.startswith("mlflow_clip/serving/_mlflow_clip_resample.") and n.endswith(".so") for n in names)
    assert not any("tests/" in n or n.startswith("scripts/") for n in names)
    # The comparative harness (benchmarks/, with its docs page template) stays in the checkout.
    harness = [n for n in names if n.startswith(("benchmarks/", "mlflow_clip/bench/")) or n.endswith(".md")]
    assert harness == []


def test_regular_install_saves_loads_and_keeps_every_module_importable(installed, tmp_path, colour_onnx):
    """After `mlflow.pyfunc.load_model`, every public module of the installed package still
    imports, and the model is served by its own copy of the serving code, natively resized."""
    out = _run(
        installed,
        f"""
        import sys, mlflow, pandas as pd, mlflow_clip
        assert "site-packages" in mlflow_clip.__file__ and "{ROOT}" not in mlflow_clip.__file__, mlflow_clip.__file__
        mlflow_clip.save_model({str(colour_onnx)!r}, {str(tmp_path / "model")!r})
        model = mlflow.pyfunc.load_model({str(tmp_path / "model")!r})
        import mlflow_clip.registry, mlflow_clip.evaluation, mlflow_clip.spark, mlflow_clip.cli, mlflow_clip.flavor
        import mlflow_clip.evaluation.plugin, mlflow_clip.client, mlflow_clip.references, mlflow_clip.errors
        served = [m for m in sys.modules if m.startswith("mlflow_clip_serving_")]
        assert served and all("{tmp_path}" in sys.modules[m].__file__ for m in served)
        from mlflow_clip.serving.preprocess import native_status
        assert native_status().available, native_status().reason
        print("OK", mlflow_clip.load_model({str(tmp_path / "model")!r}).classes)
    """,
        tmp_path,
    )
    assert "OK ['red', 'green', 'blue']" in out


def test_regular_install_cli_and_evaluator_plugin(installed, tmp_path, colour_onnx):
    """The CLI (with `mlflow-clip benchmark`, whose measuring processes run the installed module)
    and the evaluator plugin, from the regular install."""
    out = _run(
        installed,
        f"""
        import json
        from click.testing import CliRunner
        from mlflow_clip.cli import cli
        import mlflow_clip
        result = CliRunner().invoke(cli, ["--help"])
        assert result.exit_code == 0 and "promote" in result.output, result.output
        mlflow_clip.save_model({str(colour_onnx)!r}, "model")
        args = ["benchmark", "-m", "model", "--runtimes", "onnxruntime", "--size", "64x48", "--seconds", "0", "--json"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        (measured,) = json.loads(result.stdout)["measurements"]
        assert measured["status"] == "ok" and measured["images_per_s"] > 0, measured
        from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry
        _model_evaluation_registry.register_entrypoints()
        assert "clip-zero-shot" in _model_evaluation_registry._registry
        print("OK")
    """,
        tmp_path,
    )
    assert "OK" in out


def test_regular_install_checks_a_model_before_any_of_its_code_runs(installed, tmp_path, colour_onnx):
    """Saved by the regular install: MLflow's own loader refuses each injection before the
    injected code runs, and so does `mlflow_clip.load_model`; the intact model's code comes from
    verified source (Python caches only its `__init__`, which a strict load then accepts), with
    the native resize the model carries, built from the source it carries."""
    import json
    import shutil

    from tampering import INJECTIONS

    model = tmp_path / "model"
    _run(installed, f"import mlflow_clip; mlflow_clip.save_model({str(colour_onnx)!r}, {str(model)!r})", tmp_path)
    cases = []
    for how, inject in INJECTIONS.items():
        copy = Path(shutil.copytree(model, tmp_path / how.replace(" ", "-")))
        cases.append((str(copy), str(tmp_path / f"{copy.name}.ran"), inject(copy, tmp_path / f"{copy.name}.ran")))
    out = _run(
        installed,
        f"""
        import hashlib, json, os, sys, mlflow, mlflow_clip
        from mlflow.exceptions import MlflowException
        for model, marker, expected in {json.dumps(cases)}:
            for load in (mlflow.pyfunc.load_model, mlflow_clip.load_model):
                try:
                    load(model)
                    raise SystemExit(model + " loaded")
                except MlflowException as e:
                    assert expected in e.message, e.message
                assert not os.path.exists(marker), marker
        served = mlflow.pyfunc.load_model({str(model)!r})
        package = min((m for m in sys.modules if m.startswith("mlflow_clip_serving_")), key=len)
        assert type(sys.modules[package + ".classifier"].__loader__).__name__ == "VerifiedSourceLoader"
        resize = sys.modules[package + ".preprocess"].native_status().describe()
        assert resize.startswith("native (carried by the model: {model}"), resize
        from mlflow_clip.serving import _mlflow_clip_resample as built, resample
        assert built.SOURCE_SHA256 == hashlib.sha256(resample.SOURCE.read_bytes()).hexdigest()
        print("OK")
        """,
        tmp_path,
        PYTHONDONTWRITEBYTECODE="",
    )
    assert "OK" in out
    assert [p.name for p in model.rglob("*.pyc")] == [f"__init__.{sys.implementation.cache_tag}.pyc"]
    _run(installed, f"import mlflow_clip; mlflow_clip.load_model({str(model)!r})", tmp_path)  # Python's own cache


# What MLflow's own commands print on the first screen, which the project cannot change: `mlflow
# run`'s `=== ... ===` log lines (one names the temporary directory it makes for `path`
# parameters) and its database set-up, and `mlflow models serve`'s download bar.
MLFLOW_OWN_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.(projects|store)|^Downloading artifacts: ")
NOISE = re.compile(r"Traceback|Warning|warn|Downloading artifacts|Created directory|--help|[A-Za-z0-9+/]{200}", re.I)


def _console_scripts(python: Path) -> None:
    """The commands the first screen runs by name, as `pip install` puts them next to the
    interpreter (the regular install here has none): `mlflow`, and `uvicorn`, which
    `mlflow models serve` starts."""
    for name in ("mlflow", "uvicorn"):
        script = python.parent / name
        script.write_text(f"#!{python}\nimport runpy\nrunpy.run_module({name!r}, run_name='__main__')\n")
        script.chmod(0o755)


def _as_a_terminal_shows_it(output: str) -> list[str]:
    """Each line as it ends up on a terminal: a carriage return (a progress bar's redraw) starts
    the line over."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


def test_a_newcomer_follows_the_readmes_first_screen(installed, tmp_path):
    """The README's quickstart (after its install, which the regular install here stands for),
    then its first serve and query, pasted into a shell in a checkout, as a newcomer would: every
    command works and what it prints is what a person should see, with no traceback, no warning,
    no download bar or temporary-directory line from the project's own commands, and its hints."""
    import os
    import signal
    import socket

    from test_readme import CHECKOUT_FILES, INSTALL_PREFIX, README_PORT, readme_blocks

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", README_PORT)) == 0:
            pytest.skip(f"port {README_PORT}, which the README's first server takes, is in use here")
    _console_scripts(installed)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in CHECKOUT_FILES:
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, checkout / name)
    readme = [text for page, lang, text in readme_blocks() if page == "README.md" and lang == "bash"]
    (quickstart, _tests, serve_and_query) = readme[:3]
    script = "set -euo pipefail\n" + INSTALL_PREFIX.sub("", quickstart) + "\n" + serve_and_query + "\n"
    keep = {k: v for k, v in subprocess_env().items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    env = {**keep, "PATH": f"{installed.parent}{os.pathsep}{keep['PATH']}"}  # a newcomer sets no MLFLOW_ variable
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output = process.communicate(timeout=900)[0].decode("utf-8", "replace")  # bytes: keep each "\r" as sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server, if a line failed before `kill %1`
    lines = _as_a_terminal_shows_it(output)
    assert process.returncode == 0, "\n".join(lines[-60:])
    noise = [line for line in lines if NOISE.search(line) and not MLFLOW_OWN_LINE.match(line)]
    assert noise == [], noise
    assert "serve it: mlflow models serve -m models:/clip-zero-shot/1 --env-manager local -p 5001" in lines
    assert any(
        re.fullmatch(r"parity: max \|dp\| \S+, .*top-1 agreement 1\.000, max \|dpixel\| 0\.0e\+00", x) for x in lines
    )
    assert "Wrote 36 images in 9 class folders under demo-images" in lines
    assert any(
        line.startswith('{"path": "demo-images/a red circle/0001.png", "label": "a red circle"') for line in lines
    )
