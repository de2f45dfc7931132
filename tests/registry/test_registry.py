"""Registry promotion against a real `mlflow server` (SQLite, and PostgreSQL where CI starts it)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    demo_image_bytes,
    free_port,
    requires_export,
    start_server,
    stop_process,
    subprocess_env,
    using_store,
    wait_for_http,
)

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, requires_export]

POSTGRES_ENV = "MLFLOW_CLIP_TEST_POSTGRES_URI"
NAME = "clip-zero-shot"
CLASSES = ["a red circle", "a green square", "a blue triangle"]


def _backend_uri(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'backend.db'}"
    uri = os.environ.get(POSTGRES_ENV)
    if not uri:
        pytest.skip(f"PostgreSQL is not available: set {POSTGRES_ENV} (CI's .ci/run installs and starts it)")
    return _fresh_postgres_database(uri)


def _fresh_postgres_database(uri: str) -> str:
    """A new, empty database on the server named by `uri`, so each run starts clean."""
    import sqlalchemy

    name = f"mlflow_clip_test_{os.getpid()}_{int(time.time())}"
    engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return uri.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tracking_server(request, module_tmp):
    """`mlflow server` with the backend under test and a local artifact root, on a free port."""
    tmp = module_tmp(f"server-{request.param}")
    backend = _backend_uri(request.param, tmp)
    port = free_port()
    process = start_server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        tmp / "server.log",
        # MLflow 3.17's server also starts its job runner: 8 more processes, about 2 GB and 14 CPU
        # seconds at start-up, for jobs (scorers, periodic tasks) a registry never runs
        subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", process)
        with using_store(url):
            yield {"url": url, "artifacts": tmp / "artifacts", "backend": request.param}
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def two_versions(tracking_server):
    from mlflow_clip.export.job import export_and_register

    first = export_and_register(CLASSES, model="demo", templates="photo", registered_model_name=NAME)
    second = export_and_register(
        CLASSES, model="demo", templates="ensemble", registered_model_name=NAME, alias="challenger"
    )
    return first.model_version, second.model_version


def test_promote_gate_serve_tamper_rollback(tracking_server, two_versions):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import PromotionError, current_holder, history, promote, promotion_stack, rollback

    client = MlflowClient()
    v1, v2 = two_versions
    first = promote(NAME, v1, "production")
    assert first.moved and first.previous_version is None
    assert [g.name for g in first.gates] == ["version exists", "checksum", "parity", "loads and predicts"]
    assert all(g.passed for g in first.gates)

    second = promote(NAME, "challenger", "production")
    assert second.version == v2 and second.previous_version == v1
    assert str(client.get_model_version_by_alias(NAME, "production").version) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promoted_alias"] == "production" and tags["promoted_previous_version"] == v1
    assert tags["promoted_by"] and tags["promoted_at"] and "parity_max_abs_prob_diff" in tags["promotion_gates"]

    again = promote(NAME, v2, "production")
    assert not again.moved and "already holds" in again.message

    if tracking_server["backend"] == "sqlite":
        _serve_alias_and_predict(tracking_server["url"], tracking_server["artifacts"].parent, v1, v2)

    v3 = _tampered_version(client, tracking_server["artifacts"])
    with pytest.raises(
        PromotionError,
        match=r"gate 'checksum' failed: 1 file\(s\) differ from the export's manifest: model.onnx changed",
    ):
        promote(NAME, v3, "production")
    assert str(client.get_model_version_by_alias(NAME, "production").version) == v2

    assert rollback(NAME, "production").version == v1
    assert str(client.get_model_version_by_alias(NAME, "production").version) == v1
    rollback(NAME, "production")
    assert current_holder(client, NAME, "production") is None
    assert promotion_stack(history(NAME, "production")) == []
    with pytest.raises(PromotionError, match="nothing|No promotion"):
        rollback(NAME, "production")


def _tampered_version(client, artifacts: Path) -> str:
    """A freshly exported version whose model.onnx is then altered in the artifact store."""
    from mlflow_clip.export.job import export_and_register
    from mlflow_clip.serving.contract import sha256_file

    result = export_and_register(CLASSES, model="demo", templates="none", registered_model_name=NAME)
    hits = [p for p in artifacts.rglob("model.onnx") if sha256_file(p) == result.onnx_sha256]
    assert len(hits) == 1, hits
    data = bytearray(hits[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    hits[0].write_bytes(bytes(data))
    return result.model_version


@pytest.fixture()
def exported_artifacts(tracking_server):
    """A freshly exported version and the folder its model lives in, in the artifact store."""
    from mlflow_clip.export.job import export_and_register
    from mlflow_clip.serving.contract import sha256_file

    result = export_and_register(CLASSES, model="demo", templates="none", registered_model_name=NAME)
    hits = [p for p in tracking_server["artifacts"].rglob("model.onnx") if sha256_file(p) == result.onnx_sha256]
    assert len(hits) == 1, hits
    return result.model_version, hits[0].parent


def test_each_tampered_file_is_refused_by_promotion_naming_it(tracking_server, exported_artifacts, tmp_path):
    """Files edited in the artifact store after export: promotion names each one and the alias
    stays where it was; the intact version then promotes."""
    import shutil

    from mlflow.tracking import MlflowClient
    from tampering import TAMPERING

    from mlflow_clip.registry import PromotionError, current_holder, promote

    client = MlflowClient()
    version, stored = exported_artifacts
    pristine = Path(shutil.copytree(stored, tmp_path / "pristine"))
    holder = current_holder(client, NAME, "production")
    for how, tamper in TAMPERING.items():
        expected = tamper(stored)
        with pytest.raises(PromotionError) as info:
            promote(NAME, version, "production")
        message = str(info.value)
        assert "gate 'checksum' failed" in message and expected in message, (how, message)
        assert "gate 'loads and predicts' failed: not run" in message  # tampered code never runs
        assert current_holder(client, NAME, "production") == holder
        shutil.rmtree(stored)
        shutil.copytree(pristine, stored)
    result = promote(NAME, version, "production")
    assert result.moved and all(g.passed for g in result.gates)
    predict = next(g for g in result.gates if g.name == "loads and predicts")
    assert "reference images" in predict.detail and predict.figures["per_request"] is True


def _serve_alias_and_predict(tracking_url: str, log_dir: Path, v1: str, v2: str) -> None:
    """A server started on @production serves the version the alias named at its start, and
    keeps serving it after a promotion moves the alias (the README says to restart it); after a
    restart it serves the new holder. The alias is put back with a rollback."""
    import base64

    import mlflow

    from mlflow_clip.registry import promote, rollback

    # the drawn shapes and two images of no shape; the versions' templates (photo, ensemble)
    # move the small probabilities by a few percent, so they are compared as log-probabilities
    images = [d for d, _ in demo_image_bytes([(c, "PNG") for c in CLASSES])] + _shapeless_pngs()
    body = {"inputs": {"image": [base64.b64encode(d).decode() for d in images]}}
    frame = pd.DataFrame({"image": images})
    expected = {
        v: _log(mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict(frame)["probabilities"].tolist())
        for v in (v1, v2)
    }
    assert np.abs(expected[v1] - expected[v2]).max() > 1e-2  # told apart: 10x the tolerance below

    with _alias_server(tracking_url, log_dir / "before.log") as url:
        assert np.abs(_probabilities(url, body) - expected[v2]).max() < 1e-3
        promote(NAME, v1, "production")  # moves the alias while this server runs
        assert np.abs(_probabilities(url, body) - expected[v2]).max() < 1e-3  # still v2: no reload
    with _alias_server(tracking_url, log_dir / "restarted.log") as url:
        assert np.abs(_probabilities(url, body) - expected[v1]).max() < 1e-3  # a restart picks up the new holder
    assert rollback(NAME, "production").version == v2


def _shapeless_pngs() -> list[bytes]:
    import io

    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = []
    for image in (Image.new("RGB", (64, 64), (128, 128, 128)), Image.fromarray(noise)):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _probabilities(url: str, body: dict) -> np.ndarray:
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions[: len(CLASSES)]] == CLASSES
    return _log([p["probabilities"] for p in predictions])


def _log(probabilities) -> np.ndarray:
    return np.log(np.clip(np.array(probabilities, dtype=np.float64), 1e-30, 1.0))


@contextlib.contextmanager
def _alias_server(tracking_url: str, log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@production"]
    process = start_server(
        [*argv, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        log,
        subprocess_env(MLFLOW_TRACKING_URI=tracking_url),
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def test_promote_across_registered_models_copies_the_version(tracking_server, two_versions):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.job import export_and_register
    from mlflow_clip.registry import promote

    staging = export_and_register(CLASSES, model="demo", templates="photo", registered_model_name=f"{NAME}-staging")
    result = promote(f"{NAME}-staging", staging.model_version, "release", copy_to=NAME)
    client = MlflowClient()
    copied = client.get_model_version(NAME, result.version)
    assert copied.tags["copied_from"] == f"{NAME}-staging/{staging.model_version}"
    assert copied.tags["onnx_sha256"] == staging.onnx_sha256 and copied.tags["promoted_alias"] == "release"
    assert str(client.get_model_version_by_alias(NAME, "release").version) == result.version
    assert client.get_registered_model(f"{NAME}-staging").aliases == {}


# ---------------------------------------------------------------------------------------------
# Names at each limit, on each backend (PostgreSQL refuses what does not fit its columns)

# Characters of three bytes in UTF-8: the columns count characters, not bytes.
LONGEST_NAME = ("模型-" * 100)[:256]
LONGEST_ALIAS = "产" * 200


def _cli(*args: str):
    from click.testing import CliRunner

    from mlflow_clip.cli import cli

    return CliRunner().invoke(cli, list(args))


def _all_runs(client) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=50000)


def test_names_at_each_limit_go_through_and_one_past_is_refused_before_anything(tracking_server, two_versions):
    """A 256-character model name (made with --copy-to, as an operator would) and a 200-character
    alias: promoted twice, rolled back, promoted directly and listed through the CLI, each a
    FINISHED run whose name fits. One character more, or a version past the INTEGER column, is
    one line and exit code 2 before any run is opened or model created."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    v1, v2 = two_versions
    before = len(_all_runs(client))
    for version in (v1, v2):
        done = _cli("promote", "--version", version, "--alias", LONGEST_ALIAS, "--copy-to", LONGEST_NAME)
        assert done.exit_code == 0, done.output
    back = _cli("rollback", "--model-name", LONGEST_NAME, "--alias", LONGEST_ALIAS)
    assert back.exit_code == 0 and f"\n{LONGEST_NAME} @{LONGEST_ALIAS}: version 2 -> 1 (" in back.output, back.output
    again = _cli("promote", "--model-name", LONGEST_NAME, "--version", "2", "--alias", LONGEST_ALIAS)
    assert again.exit_code == 0 and ": version 1 -> 2 (" in again.output, again.output
    listed = _cli("history", "--model-name", LONGEST_NAME, "--alias", LONGEST_ALIAS)
    assert listed.exit_code == 0 and len(listed.output.splitlines()) == 5, listed.output  # a header, 4 rows
    runs = _all_runs(client)
    assert len(runs) == before + 4 and all(r.info.status == "FINISHED" for r in runs[:4])  # newest first
    runs = runs[:4]
    assert all(len(r.info.run_name) <= 250 and r.data.params["alias"] == LONGEST_ALIAS for r in runs)
    assert [len(r.info.run_name) for r in runs[:2]] == [250, 250]  # the two on the 256-character model, shortened
    assert str(client.get_model_version_by_alias(LONGEST_NAME, LONGEST_ALIAS).version) == "2"

    models = {m.name for m in client.search_registered_models()}
    for args in (
        ["promote", "--version", v1, "--alias", "x", "--copy-to", LONGEST_NAME + "x"],
        ["promote", "--version", v1, "--alias", LONGEST_ALIAS + "x"],
        ["rollback", "--model-name", LONGEST_NAME, "--alias", LONGEST_ALIAS + "x"],
        ["history", "--model-name", LONGEST_NAME + "x"],
        ["promote", "--version", v1, "--experiment-name", "e" * 257],
        ["promote", "--version", "2147483648"],
    ):
        refused = _cli(*args)
        assert refused.exit_code == 2 and len(refused.output.splitlines()) == 1, (args, refused.output)
    missing = _cli("promote", "--version", "2147483647")  # the largest the column holds: looked up, not there
    assert missing.exit_code == 2 and "has no version 2147483647" in missing.output, missing.output
    assert len(_all_runs(client)) == before + 4 and {m.name for m in client.search_registered_models()} == models


# ---------------------------------------------------------------------------------------------
# Long histories, concurrency and crashes, on each backend


def _holder(client, alias: str) -> str | None:
    from mlflow_clip.registry import current_holder

    return current_holder(client, NAME, alias)


def _assert_chain(events) -> None:
    """Each move that took effect starts where the previous one left the alias."""
    moves = [e for e in events if e.event in ("promote", "rollback") and e.state == "done"]
    for earlier, later in zip(moves, moves[1:]):
        assert later.previous == earlier.version, [(e.seq, e.previous, e.version) for e in moves]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_100_alternating_promotions_then_10_rollbacks(tracking_server, two_versions):
    """PostgreSQL refused the 0.1.0 history after about 45 moves (one VARCHAR(5000) tag): 100
    moves there. SQLite does not bound a tag's length, so 30 moves show the same chain there."""
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import history, promote, rollback

    client, alias = MlflowClient(), "long"
    v1, v2 = two_versions
    moves = 100 if tracking_server["backend"] == "postgresql" else 30
    seconds = []
    for index in range(moves):
        target = (v1, v2)[index % 2]
        started = time.monotonic()
        result = promote(NAME, target, alias)
        seconds.append(time.monotonic() - started)
        assert result.moved and result.seq == index + 1 and _holder(client, alias) == target
    for index in range(10):
        expected = (v1, v2)[(moves - 2 - index) % 2]
        assert rollback(NAME, alias).version == expected and _holder(client, alias) == expected
    events = history(NAME, alias)
    assert len(events) == moves + 10 and all(e.state == "done" for e in events)
    _assert_chain(events)
    median = sorted(seconds)[moves // 2]
    print(f"{tracking_server['backend']}: median promotion {median:.2f} s (first {seconds[0]:.2f} s)")


def _promote_process(tracking_url: str, version: str, alias: str, log: Path, clock_offset: float = 0.0):
    """`mlflow-clip promote` in its own process; with `clock_offset`, its wall clock (time.time,
    which everything it writes is timed with) is that far ahead, as on a host whose clock is wrong."""
    code = "from mlflow_clip.cli import main; main()"
    if clock_offset:
        code = f"import time; _time = time.time; time.time = lambda: _time() + {clock_offset}\n" + code
    argv = [sys.executable, "-c", code, "promote", "--model-name", NAME, "--version", version, "--alias", alias]
    return start_server(argv, log, subprocess_env(MLFLOW_TRACKING_URI=tracking_url, MLFLOW_CLIP_PROMOTED_BY=log.stem))


def _copies(client, source: str, count: int) -> list[str]:
    versions = []
    for _ in range(count):
        copied = client.copy_model_version(f"models:/{NAME}/{source}", NAME)
        for key, value in client.get_model_version(NAME, source).tags.items():
            if not key.startswith("mlflow_clip.history."):
                client.set_model_version_tag(NAME, copied.version, key, value)
        versions.append(str(copied.version))
    return versions


def _wait_for_ticket(client, alias: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(k.startswith(f"mlflow_clip.lock.{alias}.") for k in client.get_registered_model(NAME).tags):
            return
        time.sleep(0.05)
    raise TimeoutError("no lock ticket appeared")


@pytest.mark.alone  # its bound counts seconds after a SIGKILL
def test_concurrent_promotions_with_one_killed(tracking_server, two_versions, tmp_path):
    """8 contenders, one SIGKILLed once its lock ticket is written: the survivors all finish
    within 60 s of the kill, the alias ends on exactly one of them, the history is a chain."""
    import signal

    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import history

    client, alias = MlflowClient(), "race"
    versions = _copies(client, two_versions[0], 8)
    victim = _promote_process(tracking_server["url"], versions[0], alias, tmp_path / "victim.log")
    _wait_for_ticket(client, alias)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = time.monotonic()
    others = [
        _promote_process(tracking_server["url"], v, alias, tmp_path / f"c{i}.log") for i, v in enumerate(versions[1:])
    ]
    for process in others:
        assert process.wait(timeout=180) == 0, Path(process.log_path).read_text()[-2000:]
    assert time.monotonic() - killed_at < 60 + 60  # 60 s after the kill, plus the survivors' own start and gates
    holder = _holder(client, alias)
    assert holder in versions[1:]
    events = history(NAME, alias)
    done = [e for e in events if e.state == "done" and e.event == "promote"]
    assert sorted(e.version for e in done) == sorted(versions[1:]) and done[-1].version == holder
    _assert_chain(events)
    assert not [k for k in client.get_registered_model(NAME).tags if k.startswith(f"mlflow_clip.lock.{alias}.")]


def test_a_contender_700_s_ahead_breaks_nothing(tracking_server, two_versions, tmp_path):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import history

    client, alias = MlflowClient(), "skew"
    versions = _copies(client, two_versions[1], 4)
    processes = [
        _promote_process(tracking_server["url"], v, alias, tmp_path / f"p{i}.log", clock_offset=700.0 if i == 0 else 0)
        for i, v in enumerate(versions)
    ]
    for process in processes:
        assert process.wait(timeout=180) == 0, Path(process.log_path).read_text()[-2000:]
    events = history(NAME, alias)
    assert sorted(e.version for e in events if e.event == "promote" and e.state == "done") == sorted(versions)
    _assert_chain(events)
    from datetime import datetime

    skewed = next(e for e in events if e.by == "p0")  # its clock really was off: its record says so
    assert all(
        (datetime.fromisoformat(skewed.at) - datetime.fromisoformat(e.at)).total_seconds() > 600
        for e in events
        if e.by != "p0"
    )


@pytest.mark.alone  # its bound counts seconds after a SIGKILL
@pytest.mark.parametrize("moment", ["importing", "gates", "ticket", "alias moved"])
def test_a_promotion_killed_at_any_moment_is_reconciled(tracking_server, two_versions, tmp_path, moment):
    """SIGKILL while importing, during the gates, as soon as the lock ticket exists, or as soon as
    the alias has moved: the next promotion succeeds within 60 s, and a rollback returns to the
    version the last move in effect came from."""
    import signal

    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import history, promote, rollback

    client, alias = MlflowClient(), f"kill-{moment.replace(' ', '-')}"
    v1, v2 = two_versions
    promote(NAME, v1, alias)
    victim = _promote_process(tracking_server["url"], v2, alias, tmp_path / "victim.log")
    if moment == "importing":
        time.sleep(0.5)
    elif moment == "gates":
        time.sleep(4.0)  # past the imports, into the download, checksum and probe
    elif moment == "ticket":
        _wait_for_ticket(client, alias)
    else:
        deadline = time.monotonic() + 120
        while _holder(client, alias) != v2 and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    started = time.monotonic()
    target = v1 if _holder(client, alias) == v2 else v2
    assert promote(NAME, target, alias).moved
    assert time.monotonic() - started < 60
    events = history(NAME, alias)
    _assert_chain(events)
    expected_back = [e for e in events if e.event == "promote" and e.state == "done"][-1].previous
    assert rollback(NAME, alias).version == expected_back
    assert _holder(client, alias) == expected_back
