"""What the export checks before torch loads: the weights are there, the runtime is installed.
(Each mistake through the command line, with torch blocked: tests/test_cli.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import BLOCK_TORCH, ROOT, free_port, requires_export, subprocess_env
from stores import fresh_sqlite_uri

from mlflow_clip.export import preflight
from mlflow_clip.export.preflight import WeightsError, check_openai_weights, is_online
from mlflow_clip.export.spec import ExportSpec, SpecError


@pytest.fixture()
def offline(tmp_path, monkeypatch) -> Path:
    """An empty download cache, and an HTTPS proxy that refuses every connection."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MLFLOW_CLIP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return cache


@requires_export
def test_the_table_of_openai_names_is_clips_own():
    from mlflow_clip.export.compat import import_clip

    clip = import_clip()
    urls = clip.clip._MODELS
    assert {name: url.rsplit("/", 1)[1] for name, url in urls.items()} == preflight.OPENAI_MODEL_FILES
    assert {url.split("/")[2] for url in urls.values()} == {preflight.OPENAI_DOWNLOAD_HOST}


def test_a_cached_name_is_accepted_offline_and_an_uncached_one_refused(offline):
    with pytest.raises(WeightsError, match=r"'RN50', which is not in the cache .*cannot reach"):
        ExportSpec.create("a,b", model="RN50")
    (offline / "RN50.pt").write_bytes(b"weights")
    assert ExportSpec.create("a,b", model="RN50").model == "RN50"


def test_online_means_a_connection_to_the_download_host_or_its_proxy_opens(monkeypatch):
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert is_online()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    assert not is_online()


def test_bf16_is_refused_where_openvino_would_run_it_in_fp32_and_auto_leaves_it_out(monkeypatch):
    """On a CPU without AVX-512, OpenVINO compiles a graph asked for bf16 at f32: a bf16 export
    gated there would measure fp32. Stood in for on every CPU by the check's answer."""
    from mlflow_clip.export.spec import parse_precisions
    from mlflow_clip.serving import openvino_runtime

    monkeypatch.setattr(preflight, "openvino_available", lambda: True)
    for runs_bf16, auto in ((False, ("fp32", "int8")), (True, ("fp32", "bf16", "int8"))):
        monkeypatch.setattr(preflight, "openvino_runs_bf16", lambda runs=runs_bf16: runs)
        monkeypatch.setattr(openvino_runtime, "openvino_runs_bf16", lambda runs=runs_bf16: runs)
        assert parse_precisions("auto") == auto
        if runs_bf16:
            preflight.check_runtime("bf16")
            continue
        for precision in ("bf16", "fp32,bf16"):
            with pytest.raises(
                SpecError, match=r"OpenVINO has no bf16 on this CPU \(it needs AVX-512.*choose fp32 or int8"
            ):
                ExportSpec.create("a,b", model="demo", precision=precision)


def test_openvino_runs_bf16_where_the_cpu_has_it_and_not_without_avx_512():
    from mlflow_clip.serving.openvino_runtime import openvino_available, openvino_runs_bf16
    from mlflow_clip.serving.variants import cpu_flags

    if not openvino_available():
        pytest.skip('needs ".[openvino]"')
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert openvino_runs_bf16()
    elif "avx512f" not in flags:
        assert not openvino_runs_bf16()
    else:
        pytest.skip("AVX-512 without native bf16: OpenVINO's choice (emulated bf16 or f32)")


def test_a_relative_checkpoint_is_found_in_the_callers_directory(tmp_path, monkeypatch):
    """`mlflow run` starts the job in the project's folder and keeps the caller's in $PWD."""
    caller, project = tmp_path / "caller", tmp_path / "project"
    caller.mkdir(), project.mkdir()
    (caller / "ViT-B-32.pt").write_bytes(b"weights")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PWD", str(caller))
    assert check_openai_weights("ViT-B-32.pt") == str(caller / "ViT-B-32.pt")
    with pytest.raises(WeightsError, match=rf"looked for other.pt in {caller} and {project}\)"):
        check_openai_weights("other.pt")
    (project / "ViT-B-32.pt").write_bytes(b"weights")
    monkeypatch.setenv("PWD", str(project))
    assert check_openai_weights("ViT-B-32.pt") == "ViT-B-32.pt"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_checkpoint_is_refused(tmp_path):
    path = tmp_path / "RN50.pt"
    path.write_bytes(b"weights")
    path.chmod(0)
    with pytest.raises(WeightsError, match="cannot be read"):
        check_openai_weights(str(path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "params, message",
    [
        (["model=/nowhere/ViT-B-32.pt"], "no file exists at /nowhere/ViT-B-32.pt"),
        (["precision=bf16"], "which runs on OpenVINO, and OpenVINO is not installed here"),
        (["precision=fp8"], "Received precision='fp8'; expected one of fp32, fp16, int8, bf16."),
        (["precison=bf16"], "No such parameter -P precison. Did you mean -P precision?"),
    ],
    ids=["missing checkpoint", "bf16 without OpenVINO", "unknown precision", "misspelt parameter"],
)
def test_under_mlflow_run_each_mistake_is_one_line_before_torch_is_imported(tmp_path, params, message):
    """`mlflow run` with torch (and OpenVINO) unimportable in the job: the job's error is one line
    in the words of `mlflow run`, and nothing names a command the user never typed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH + '\nBLOCKED.add("openvino")\n')
    given = dict(p.split("=", 1) for p in ["model=demo", "classes=a red circle,a blue square", *params])
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
    argv += [a for name, value in given.items() for a in ("-P", f"{name}={value}")]
    env = subprocess_env(MLFLOW_TRACKING_URI=fresh_sqlite_uri(tmp_path / "mlflow.db"), PYTHONPATH=str(blocker))
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "--help" not in result.stderr and "blocked" not in result.stderr


def test_the_checks_import_no_torch(tmp_path):
    script = BLOCK_TORCH + textwrap.dedent(
        """
        from mlflow_clip.export.spec import ExportSpec
        ExportSpec.create("a,b", model="demo", precision="int8")
        assert not any(m.split(".")[0] in {"torch", "clip", "openvino"} for m in sys.modules)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "OK", result.stderr[-2000:]
