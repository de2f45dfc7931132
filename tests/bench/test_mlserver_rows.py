"""The benchmark's MLServer rows: planning, V2 bodies and answers, the environment and the ratio
note (no MLServer), then one real quick run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import requires_export

from benchmarks import RowResult, make_options, quick_options, run_benchmark
from benchmarks import mlserver as bench_mlserver
from benchmarks.mlserver import (
    CLIP_RUNTIME,
    MLSERVER_RUNTIME,
    MODEL_NAME,
    MLServerUnavailable,
    ensure_mlserver_env,
    note_mlserver_ratios,
    v2_body,
    v2_call,
    write_model_settings,
)
from benchmarks.options import DEFAULT_ROWS, BenchmarkError, command_line
from benchmarks.plan import plan_group

# The benchmark's real runs (the slow tests) run alone (tests/bench/conftest.py); the pieces time
# nothing and run beside any test.


def _plan(model_dir, **options):
    options = make_options(models="demo", sizes="640x480", batches="1", **options)
    builds = {("demo", "fp32"): {"status": "ok", "model_dir": str(model_dir)}}
    planned, rows = plan_group(options, "demo", (640, 480), 1, [], builds, {})
    return options, planned, rows


def test_mlserver_rows_run_only_when_asked_for():
    assert "mlserver" not in DEFAULT_ROWS and "mlserver" in make_options(rows="mlserver").rows


def test_the_mlserver_rows_are_each_runtime_batching_on_and_off_beside_row_d_with_the_same_clients(
    colour_model_dir, tmp_path
):
    options, planned, rows = _plan(colour_model_dir, rows="mlserver", work_dir=str(tmp_path))
    assert [row.row for row in rows] == [
        "server-4c",
        "server-16c",
        *(
            f"mlserver-{c}c-{runtime}-{b}"
            for runtime in ("clip", "mlflow")
            for b in ("batching", "nobatch")
            for c in (4, 16)
        ),
    ]
    server, *mlservers = planned
    assert server.task == "server" and server.spec["clients"] == [4, 16]
    assert [(item.task, item.spec["runtime"]) for item in mlservers] == [
        ("mlserver", "clip"),
        ("mlserver", "clip"),
        ("mlserver", "mlflow"),
        ("mlserver", "mlflow"),
    ]
    batching = {"max_batch_size": 16, "max_batch_time": 0.01}
    assert [item.spec["batching"] for item in mlservers] == [batching, {}, batching, {}]
    for item in mlservers:
        assert item.spec["clients"] == [4, 16] and item.spec["parallel_workers"] == 0
        assert item.spec["model_config"] == server.spec["model_config"]  # the same onnxruntime threads as (d)
        assert item.spec["env_dir"] == str(tmp_path / f"mlserver-env-{item.spec['runtime']}")
        assert [clients for _, clients in item.rows] == ["4", "16"]
    assert len({item.spec["repository"] for item in mlservers}) == 4
    labels = {row.row: row.label for row in rows}
    assert labels["mlserver-16c-clip-batching"] == "MLServer ClipRuntime 16 clients, batching per parameter set"
    assert labels["mlserver-4c-mlflow-batching"] == "MLServer MLflow runtime 4 clients, MLServer's adaptive batching"


def test_the_mlserver_runtimes_and_clients_come_from_the_command_line(colour_model_dir, tmp_path):
    options, planned, rows = _plan(
        colour_model_dir, rows="mlserver", mlserver_runtimes="clip", mlserver_clients="8", work_dir=str(tmp_path)
    )
    assert [row.row for row in rows] == ["server-8c", "mlserver-8c-clip-batching", "mlserver-8c-clip-nobatch"]
    assert "--mlserver-runtimes clip --mlserver-clients 8" in command_line(options)
    with pytest.raises(BenchmarkError, match=r"--mlserver-runtimes \['torchserve'\]; expected any of"):
        make_options(mlserver_runtimes="torchserve")
    with pytest.raises(BenchmarkError, match="empty --mlserver-clients"):
        make_options(mlserver_clients=",")


def test_row_d_keeps_its_own_clients_and_adds_mlservers(colour_model_dir, tmp_path):
    options, planned, rows = _plan(
        colour_model_dir, rows="server,mlserver", mlserver_clients="16", work_dir=str(tmp_path)
    )
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
        _row("mlserver-16c-clip-batching", 120.0, note="spoke V2"),
        _row("mlserver-16c-mlflow-nobatch", 40.0),
        _row("mlserver-16c-clip-nobatch", 0.0, status="failed", note="HTTP 500"),
        _row("mlserver-4c-clip-batching", 30.0, batch=8),  # no row (d) at batch 8
    ]
    note_mlserver_ratios(rows)
    assert rows[2].note == "1.50x server-16c; spoke V2"
    assert rows[3].note == "0.50x server-16c"
    assert rows[4].note == "HTTP 500" and rows[5].note == ""


def test_v2_bodies_carry_base64_rows_and_answers_give_the_probabilities():
    body = json.loads(v2_body(["aGk=", "aG8="]))
    assert body == {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": ["aGk=", "aG8="]}]}
    as_json = {"name": "probabilities", "datatype": "BYTES", "shape": [2, 1], "data": ["[0.25,0.75]", "[1.0,0.0]"]}
    as_tensor = {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 1.0, 0.0]}

    for probabilities in (as_json, as_tensor):  # MLServer's MLflow runtime, ClipRuntime

        class Answer:
            status_code, text = 200, ""
            outputs = [{"name": "label", "datatype": "BYTES", "data": ["a", "b"]}, probabilities]

            def json(self):
                return {"outputs": self.outputs}

        class Session:
            def post(self, url, **kwargs):
                self.url = url
                return Answer()

        session = Session()
        got = v2_call("http://h:1", lambda index: (b"{}", 2))(0, session)
        assert session.url == f"http://h:1/v2/models/{MODEL_NAME}/infer"
        np.testing.assert_array_equal(got, [[0.25, 0.75], [1.0, 0.0]])
        with pytest.raises(RuntimeError, match="2 predictions for 3 images"):
            v2_call("http://h:1", lambda index: (b"{}", 3))(0, session)


def test_model_settings_put_the_batching_where_each_runtime_reads_it(tmp_path):
    batching = {"max_batch_size": 16, "max_batch_time": 0.01}
    write_model_settings(tmp_path / "mlflow", "/models/demo", batching)
    settings = json.loads((tmp_path / "mlflow" / MODEL_NAME / "model-settings.json").read_text())
    assert settings == {
        "name": MODEL_NAME,
        "implementation": MLSERVER_RUNTIME,
        "parameters": {"uri": "/models/demo"},
        "max_batch_size": 16,
        "max_batch_time": 0.01,
    }
    write_model_settings(tmp_path / "clip", "/models/demo", batching, "clip", {"intra_op_num_threads": 1})
    settings = json.loads((tmp_path / "clip" / MODEL_NAME / "model-settings.json").read_text())
    assert settings == {
        "name": MODEL_NAME,
        "implementation": CLIP_RUNTIME,
        "parameters": {"uri": "/models/demo", "extra": {**batching, "model_config": {"intra_op_num_threads": 1}}},
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
    options = quick_options(
        work_dir=tmp_path, rows=("mlserver",), batches=(1,), mlserver_clients=(4,), mlserver_runtimes=("clip",)
    )
    report = run_benchmark(options, progress=lambda message: print(message, file=sys.stderr))
    rows = {row.row: row for row in report.rows}
    assert set(rows) == {"server-4c", "mlserver-4c-clip-batching", "mlserver-4c-clip-nobatch"}
    if rows["mlserver-4c-clip-batching"].status == "not runnable":
        pytest.skip(f"MLServer cannot be installed here: {rows['mlserver-4c-clip-batching'].note}")
    for name in ("mlserver-4c-clip-batching", "mlserver-4c-clip-nobatch"):
        row = rows[name]
        assert row.status == "ok", row.note
        assert row.images_per_s > 0 and row.p95_ms >= row.p50_ms
        assert row.note.startswith(f"{row.images_per_s / rows['server-4c'].images_per_s:.2f}x (d) server 4 clients")


def test_the_wheel_digest_ignores_build_noise_and_sees_the_sources(tmp_path):
    import zipfile

    def wheel(name: str, module: bytes, binary: bytes, when: tuple) -> Path:
        path = tmp_path / name / "mlflow_clip-0-py3-none-any.whl"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as archive:
            for entry, data in (
                ("mlflow_clip/a.py", module),
                ("mlflow_clip/r.so", binary),
                ("x.dist-info/RECORD", binary),
            ):
                archive.writestr(zipfile.ZipInfo(entry, date_time=when), data)
        return path

    first = wheel("1", b"x = 1", b"\x7fELF one", (2026, 1, 1, 0, 0, 0))
    rebuilt = wheel("2", b"x = 1", b"\x7fELF two", (2026, 12, 6, 0, 0, 0))
    changed = wheel("3", b"x = 2", b"\x7fELF one", (2026, 1, 1, 0, 0, 0))
    assert bench_mlserver._wheel_digest(first) == bench_mlserver._wheel_digest(rebuilt)
    assert bench_mlserver._wheel_digest(first) != bench_mlserver._wheel_digest(changed)
