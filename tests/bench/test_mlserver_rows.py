"""The benchmark's MLServer rows: planning, V2 bodies and answers, the environment and the ratio
note (no MLServer), then one real quick run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import requires_export

from benchmarks import RowResult, make_options, quick_options, run_benchmark
from benchmarks import mlserver as bench_mlserver
from benchmarks.mlserver import (
    MLSERVER_RUNTIME,
    MODEL_NAME,
    MLServerUnavailable,
    ensure_mlserver_env,
    note_mlserver_ratios,
    v2_body,
    v2_call,
    write_model_settings,
)
from benchmarks.options import DEFAULT_ROWS
from benchmarks.plan import plan_group


def _plan(model_dir, **options):
    options = make_options(models="demo", sizes="640x480", batches="1", **options)
    builds = {("demo", "fp32"): {"status": "ok", "model_dir": str(model_dir)}}
    planned, rows = plan_group(options, "demo", (640, 480), 1, [], builds, {})
    return options, planned, rows


def test_mlserver_rows_run_only_when_asked_for():
    assert "mlserver" not in DEFAULT_ROWS and "mlserver" in make_options(rows="mlserver").rows


def test_the_mlserver_rows_are_batching_on_and_off_beside_row_d_with_the_same_clients(colour_model_dir, tmp_path):
    options, planned, rows = _plan(colour_model_dir, rows="mlserver", work_dir=str(tmp_path))
    assert [row.row for row in rows] == ["server-16c", "mlserver-16c-batching", "mlserver-16c-nobatch"]
    server, batching, nobatch = planned
    assert server.task == "server" and server.spec["clients"] == [16]
    assert (batching.task, nobatch.task) == ("mlserver", "mlserver")
    assert (
        batching.spec["batching"] == {"max_batch_size": 16, "max_batch_time": 0.01} and nobatch.spec["batching"] == {}
    )
    for item in (batching, nobatch):
        assert item.spec["clients"] == [16] and item.spec["parallel_workers"] == 0
        assert item.spec["model_config"] == server.spec["model_config"]  # the same onnxruntime threads as (d)
        assert item.spec["env_dir"] == str(tmp_path / "mlserver-env")
        assert item.rows[0][1] == "16"
    assert batching.spec["repository"] != nobatch.spec["repository"]


def test_row_d_keeps_its_own_clients_and_adds_mlservers(colour_model_dir, tmp_path):
    options, planned, rows = _plan(colour_model_dir, rows="server,mlserver", work_dir=str(tmp_path))
    assert planned[0].spec["clients"] == [*options.clients, 16]
    assert [row.row for row in rows][: len(options.clients) + 1] == [f"server-{c}c" for c in (*options.clients, 16)]
    _, planned, rows = _plan(colour_model_dir, rows="server", work_dir=str(tmp_path))
    assert not any(row.row.startswith("mlserver") for row in rows) and {p.task for p in planned} == {"server"}


def _row(name: str, images_per_s: float, batch: int = 1, status: str = "ok", note: str = "") -> RowResult:
    return RowResult("demo", "640x480", batch, name, name, status=status, note=note, images_per_s=images_per_s)


def test_each_mlserver_row_notes_its_ratio_to_row_d_with_the_same_clients():
    rows = [
        _row("server-4c", 50.0),
        _row("server-16c", 80.0),
        _row("mlserver-16c-batching", 120.0, note="spoke V2"),
        _row("mlserver-16c-nobatch", 40.0),
        _row("mlserver-16c-failed", 0.0, status="failed", note="HTTP 500"),
        _row("mlserver-16c-batching", 30.0, batch=8),  # no row (d) at batch 8
    ]
    note_mlserver_ratios(rows)
    assert rows[2].note == "1.50x server-16c; spoke V2"
    assert rows[3].note == "0.50x server-16c"
    assert rows[4].note == "HTTP 500" and rows[5].note == ""


def test_v2_bodies_carry_base64_rows_and_answers_give_the_probabilities():
    body = json.loads(v2_body(["aGk=", "aG8="]))
    assert body == {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": ["aGk=", "aG8="]}]}

    class Answer:
        status_code, text = 200, ""

        def json(self):
            rows = ["[0.25,0.75]", "[1.0,0.0]"]
            return {"outputs": [{"name": "label", "data": ["a", "b"]}, {"name": "probabilities", "data": rows}]}

    class Session:
        def post(self, url, **kwargs):
            self.url = url
            return Answer()

    session = Session()
    probabilities = v2_call("http://h:1", lambda index: (b"{}", 2))(0, session)
    assert session.url == f"http://h:1/v2/models/{MODEL_NAME}/infer"
    np.testing.assert_array_equal(probabilities, [[0.25, 0.75], [1.0, 0.0]])
    with pytest.raises(RuntimeError, match="2 predictions for 3 images"):
        v2_call("http://h:1", lambda index: (b"{}", 3))(0, session)


def test_model_settings_name_mlflows_runtime_and_the_batching(tmp_path):
    write_model_settings(tmp_path, "/models/demo", {"max_batch_size": 16, "max_batch_time": 0.01})
    settings = json.loads((tmp_path / MODEL_NAME / "model-settings.json").read_text())
    assert settings == {
        "name": MODEL_NAME,
        "implementation": MLSERVER_RUNTIME,
        "parameters": {"uri": "/models/demo"},
        "max_batch_size": 16,
        "max_batch_time": 0.01,
    }


def test_the_environment_is_reused_while_its_packages_are_the_same_and_needs_uv(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mlserver, "find_uv", lambda: None)
    with pytest.raises(MLServerUnavailable, match="pip install uv"):
        ensure_mlserver_env(tmp_path / "env", ["pandas==3.1.1"])
    calls = []
    monkeypatch.setattr(bench_mlserver.subprocess, "run", lambda *a, **k: calls.append(a))
    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").touch()
    key = {"python": bench_mlserver.platform.python_version(), "packages": [*bench_mlserver.MLSERVER_PACKAGES, "x==1"]}
    (tmp_path / "env" / bench_mlserver.ENV_MARKER).write_text(json.dumps(key))
    assert ensure_mlserver_env(tmp_path / "env", ["x==1"]) == tmp_path / "env" / "bin" / "python"
    assert calls == []  # nothing installed again


@pytest.mark.slow
@requires_export
def test_a_quick_run_measures_mlserver_beside_row_d(tmp_path):
    options = quick_options(work_dir=tmp_path, rows=("mlserver",), batches=(1,), mlserver_clients=4)
    report = run_benchmark(options, progress=lambda message: print(message, file=sys.stderr))
    rows = {row.row: row for row in report.rows}
    assert set(rows) == {"server-4c", "mlserver-4c-batching", "mlserver-4c-nobatch"}
    if rows["mlserver-4c-batching"].status == "not runnable":
        pytest.skip(f"MLServer cannot be installed here: {rows['mlserver-4c-batching'].note}")
    for name in ("mlserver-4c-batching", "mlserver-4c-nobatch"):
        row = rows[name]
        assert row.status == "ok", row.note
        assert row.images_per_s > 0 and row.p95_ms >= row.p50_ms
        assert row.note.startswith(f"{row.images_per_s / rows['server-4c'].images_per_s:.2f}x (d) server 4 clients")
