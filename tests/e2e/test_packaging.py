"""What users install: a wheel built from this tree, installed the regular way (not editable).

An editable install resolves `mlflow_clip` through setuptools' finder, which hides packaging
defects (a missing data file, a model's code copy shadowing the package). These tests build the
wheel, install it into a fresh environment whose only other packages are this environment's
dependencies, and use it there as a user would.
"""

from __future__ import annotations

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
def wheel(module_tmp) -> Path:
    out = module_tmp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("mlflow_clip-*.whl")
    return path


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


def _run(python: Path, script: str, cwd: Path) -> str:
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
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
        "mlflow_clip/bench/docs_template.md",
    ):
        assert expected in names
    assert any(n.startswith("mlflow_clip/serving/_mlflow_clip_resample.") and n.endswith(".so") for n in names)
    assert not any("tests/" in n or n.startswith("scripts/") for n in names)


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


def test_regular_install_cli_and_evaluator_plugin(installed, tmp_path):
    out = _run(
        installed,
        """
        from click.testing import CliRunner
        from mlflow_clip.cli import cli
        import mlflow_clip
        result = CliRunner().invoke(cli, ["--help"])
        assert result.exit_code == 0 and "promote" in result.output, result.output
        from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry
        _model_evaluation_registry.register_entrypoints()
        assert "clip-zero-shot" in _model_evaluation_registry._registry
        print("OK")
    """,
        tmp_path,
    )
    assert "OK" in out
