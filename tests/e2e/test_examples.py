"""The examples in examples/, run as a user would: subprocesses against the demo CLIP registered
as `clip-zero-shot` (the examples' default) in a temporary SQLite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ROOT, free_port, subprocess_env

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
N_PER_CLASS = 2
MIN_ACCURACY = 0.9
SERVER_START_SECONDS = 120
SCRIPT_TIMEOUT = 300
NOT_AN_IMAGE = b"shopping list: milk, eggs, a red circle\n"


@pytest.fixture(scope="module")
def env(module_store) -> dict[str, str]:
    """The store, and this interpreter's bin/ (mlflow, python) first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess_env(
        MLFLOW_TRACKING_URI=module_store, MLFLOW_REGISTRY_URI=module_store, PATH=path, PYTHONUNBUFFERED="1"
    )


def run(args: list[str], env: dict[str, str], timeout: float = SCRIPT_TIMEOUT, **extra) -> subprocess.CompletedProcess:
    """Run in a process group of its own; whatever is left of the group is killed at the end."""
    proc = subprocess.Popen(
        [str(a) for a in args],
        env={**env, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # lets serve_and_query.sh's trap stop its server
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"{args} took over {timeout}s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, f"{args} exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)


def wait_for_ping(url: str, proc: subprocess.Popen, log: Path, timeout: float = SERVER_START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"no answer on {url}/ping after {timeout}s:\n{log.read_text()[-5000:]}")


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def true_class(path: str | Path) -> str:
    return Path(path).parent.name


@pytest.fixture(scope="module")
def demo_images(module_tmp, env) -> Path:
    folder = module_tmp("examples") / "demo images"  # a space, as users' folders have
    result = run(
        [
            sys.executable,
            EXAMPLES / "make_demo_images.py",
            folder,
            "--per-class",
            N_PER_CLASS,
            "--seed",
            5,
            "--varied-sizes",
        ],
        env,
        timeout=120,
    )
    assert str(folder) in result.stdout
    return folder


@pytest.fixture(scope="module")
def server_url(module_demo_model_uri, env, module_tmp):
    """One `mlflow models serve --env-manager local` for the module, always stopped."""
    port = free_port()
    log = module_tmp("server") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                module_demo_model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, proc, log)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass


def test_make_demo_images_writes_one_folder_per_class(demo_images):
    from PIL import Image

    from mlflow_clip.demo_data import DEMO_CLASSES

    assert sorted(p.name for p in demo_images.iterdir()) == sorted(DEMO_CLASSES)
    files = sorted(demo_images.rglob("*.png"))
    assert len(files) == N_PER_CLASS * len(DEMO_CLASSES)
    assert all(len(list((demo_images / name).glob("*.png"))) == N_PER_CLASS for name in DEMO_CLASSES)
    sizes = set()
    for path in files:
        with Image.open(path) as image:
            image.verify()
            sizes.add(image.size)
    assert len(sizes) > 1  # --varied-sizes


def test_serve_and_query_prints_the_right_label(module_demo_model_uri, demo_images, env):
    port = free_port()
    # MODEL_URI left unset: the script's default, models:/clip-zero-shot/latest
    result = run(["bash", EXAMPLES / "serve_and_query.sh", demo_images], env, PORT=str(port), TOP_K="3")

    image = result.stderr.split("Image: ", 1)[1].splitlines()[0]
    assert image == min(str(p) for p in demo_images.rglob("*.png"))  # the script sorts with LC_ALL=C
    prediction = json.loads(result.stdout)["predictions"]
    assert len(prediction) == 1
    assert prediction[0]["label"] == true_class(image)
    assert prediction[0]["top_labels"][0] == prediction[0]["label"]
    assert len(prediction[0]["top_scores"]) == 3
    assert prediction[0]["error"] is None
    assert not port_is_open(port), "the script left its server running"


def test_query_server_classifies_files_and_reports_bad_ones(server_url, demo_images, env, tmp_path):
    images = sorted(demo_images.rglob("*.png"))
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(NOT_AN_IMAGE)

    result = run(
        [sys.executable, EXAMPLES / "query_server.py", server_url, *images, bad, "--top-k", "2", "--on-error", "null"],
        env,
        timeout=120,
    )

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in [*images, bad]]
    good, failed = rows[:-1], rows[-1]
    accuracy = np.mean([row["label"] == true_class(row["path"]) for row in good])
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.0%} right on {len(good)} images"
    assert all(len(row["top_labels"]) == 2 and row["error"] is None for row in good)
    assert failed["label"] is None and failed["score"] is None
    assert failed["error"].startswith("not an image")


def test_query_server_shows_the_servers_message_on_a_bad_request(server_url, env, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(NOT_AN_IMAGE)
    proc = subprocess.run(
        [sys.executable, EXAMPLES / "query_server.py", server_url, bad],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "HTTP 400" in proc.stderr and "INVALID_PARAMETER_VALUE" in proc.stderr
    assert "on_error" in proc.stderr  # the server's own hint about the fix
    assert proc.stdout == ""


def test_spark_batch_score_writes_labels_and_errors(module_demo_model_uri, demo_images, env, tmp_path):
    pytest.importorskip("pyspark")
    folder = tmp_path / "to score"
    for path in demo_images.rglob("*.png"):
        target = folder / path.relative_to(demo_images)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (folder / "notes.jpg").write_bytes(NOT_AN_IMAGE)
    output = tmp_path / "scores.parquet"

    result = run(
        [
            sys.executable,
            EXAMPLES / "spark_batch_score.py",
            module_demo_model_uri,
            folder,
            output,
            "--master",
            "local[2]",
        ],
        env,
    )

    n_images = len(list(demo_images.rglob("*.png")))
    assert f"Scored {n_images + 1} files (1 unreadable)" in result.stdout
    scores = pd.read_parquet(output)
    assert list(scores.columns) == ["path", "label", "score", "error"]
    scores["path"] = scores["path"].str.removeprefix("file:")
    assert sorted(scores["path"]) == sorted([str(p) for p in folder.rglob("*.png")] + [str(folder / "notes.jpg")])
    failed = scores[scores["path"].str.endswith("notes.jpg")].iloc[0]
    assert pd.isna(failed["label"]) and pd.isna(failed["score"])
    assert failed["error"].startswith("not an image")
    good = scores[~scores["path"].str.endswith("notes.jpg")]
    assert good["error"].isna().all() and good["label"].notna().all()
    accuracy = np.mean([label == true_class(path) for label, path in zip(good["label"], good["path"])])
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.0%} right on {len(good)} images"
