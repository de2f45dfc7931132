"""Registry promotion against a real `mlflow server` (SQLite, and PostgreSQL where CI starts it)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import using_store, demo_image_bytes, free_port, requires_export, start_server, stop_process, subprocess_env, wait_for_http

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
def tracking_server(request, tmp_path_factory):
    """`mlflow server` with the backend under test and a local artifact root, on a free port."""
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    backend = _backend_uri(request.param, tmp)
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        tmp / "server.log", subprocess_env(), cwd=tmp,
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
    second = export_and_register(CLASSES, model="demo", templates="ensemble", registered_model_name=NAME,
                                 alias="challenger")
    return first.model_version, second.model_version


def test_promote_gate_serve_tamper_rollback(tracking_server, two_versions):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import PromotionError, promote, promotion_stack, read_history, rollback

    client = MlflowClient()
    v1, v2 = two_versions
    first = promote(NAME, v1, "production")
    assert first.moved and first.previous_version is None
    assert {g.name for g in first.gates} == {"checksum", "parity", "loads and predicts"}
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
        _serve_alias_and_predict(tracking_server["url"], tracking_server["artifacts"].parent)

    v3 = _tampered_version(client, tracking_server["artifacts"])
    with pytest.raises(PromotionError, match=r"gate 'checksum' failed: 1 file\(s\) differ from the export's manifest: model.onnx changed"):
        promote(NAME, v3, "production")
    assert str(client.get_model_version_by_alias(NAME, "production").version) == v2

    assert rollback(NAME, "production").version == v1
    assert str(client.get_model_version_by_alias(NAME, "production").version) == v1
    rollback(NAME, "production")
    with pytest.raises(Exception):
        client.get_model_version_by_alias(NAME, "production")
    assert promotion_stack(read_history(client, NAME, "production")) == []
    with pytest.raises(PromotionError, match="nothing|No promotion"):
        rollback(NAME, "production")


def _tampered_version(client, artifacts: Path) -> str:
    """A freshly exported version whose model.onnx is then altered in the artifact store."""
    from mlflow_clip.serving.contract import sha256_file
    from mlflow_clip.export.job import export_and_register

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
    from mlflow_clip.serving.contract import sha256_file
    from mlflow_clip.export.job import export_and_register

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
    assert "fresh process" in predict.detail and predict.figures["per_request"] is True


def _serve_alias_and_predict(tracking_url: str, log_dir: Path) -> None:
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@production",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        log_dir / "serve.log", subprocess_env(MLFLOW_TRACKING_URI=tracking_url),
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process)
        import base64

        images = demo_image_bytes([(c, "PNG") for c in CLASSES])
        body = {"inputs": {"image": [base64.b64encode(d).decode() for d, _ in images]}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert [p["label"] for p in response.json()["predictions"]] == CLASSES
    finally:
        stop_process(process)


def test_concurrent_promotions_leave_one_holder_and_a_consistent_history(tracking_server, two_versions):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry import promote, promotion_stack, read_history

    client = MlflowClient()
    v1, _ = two_versions
    versions = []
    for _ in range(8):
        copied = client.copy_model_version(f"models:/{NAME}/{v1}", NAME)
        for key, value in client.get_model_version(NAME, v1).tags.items():
            client.set_model_version_tag(NAME, copied.version, key, value)
        versions.append(str(copied.version))
    before = len(read_history(client, NAME, "live"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda v: promote(NAME, v, "live", client=MlflowClient()), versions))

    assert all(r.moved for r in results)
    holder = str(client.get_model_version_by_alias(NAME, "live").version)
    assert holder in versions
    history = read_history(client, NAME, "live")[before:]
    assert len(history) == 8 and sorted(e["version"] for e in history) == sorted(versions)
    for earlier, later in zip(history, history[1:]):
        assert later["previous"] == earlier["version"], history
    assert history[-1]["version"] == holder
    assert promotion_stack(read_history(client, NAME, "live"))[-1]["version"] == holder
    lock_tags = [k for k in client.get_registered_model(NAME).tags if k.startswith("mlflow_clip.lock.")]
    assert lock_tags == []


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
