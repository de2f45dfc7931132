"""The scoring server: `mlflow models serve --env-manager local` started and stopped with all
its processes, request bodies, and row (d) (one server, measured with each number of clients).
`MeasuredServer` is the measuring part, shared with the MLServer rows (`mlserver`)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.images import read_pool, request_images
from benchmarks.measure import MeasuredRow, RssSampler, tree_cpu_seconds, tree_peak_rss_mb
from benchmarks.worker import child_env, die_with_parent, stop_tree

JSON_HEADERS = {"Content-Type": "application/json"}
SERVER_START_SECONDS = 300
SERVER_REQUEST_TIMEOUT_SECONDS = 900


class ServerProcess:
    """A server process with its output in a log file: ready once `ready_path` answers 200,
    stopped with all its processes. Subclasses set `url`, `name` and `ready_path`."""

    name = "the server"
    ready_path = "/ping"

    def _start(self, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            )

    def wait_ready(self, timeout: float = SERVER_START_SECONDS) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer {self.ready_path} within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])[-600:]

    def stop(self) -> None:
        stop_tree(self.proc)


class ScoringServer(ServerProcess):
    """`mlflow models serve --env-manager local`, stopped with all its processes."""

    def __init__(
        self,
        model_dir: str,
        workers: int,
        model_config: dict[str, Any],
        log_path: Path,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = child_env(
            {
                "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(model_config),
                "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(SERVER_REQUEST_TIMEOUT_SECONDS),
                **(env or {}),
            }
        )
        argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
        self._start([*argv, "-h", "127.0.0.1", "-p", str(self.port), "--workers", str(workers)], log_path, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(b64_rows: Sequence[str], form: str) -> bytes:
    """A JSON body for POST /invocations (see `mlflow_clip.client.request_body`)."""
    if form == "dataframe_split":
        body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in b64_rows]}}
    else:
        body = {"inputs": {"image": list(b64_rows)}}
    return json.dumps(body).encode("utf-8")


def server_call(url: str, bodies: Callable[[int], tuple[bytes, int]]) -> Callable[[int, Any], np.ndarray]:
    """A request function for `run_requests`: POST `bodies(index)`, check the answer, return its probabilities."""

    def call(index: int, session: Any) -> np.ndarray:
        body, batch = bodies(index)
        response = session.post(
            url + "/invocations", data=body, headers=JSON_HEADERS, timeout=SERVER_REQUEST_TIMEOUT_SECONDS
        )
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        predictions = response.json()["predictions"]
        if len(predictions) != batch:
            raise RuntimeError(f"{len(predictions)} predictions for {batch} images")
        return np.asarray([p["probabilities"] for p in predictions], dtype=float)

    return call


def new_session():
    """A client thread's own HTTP session (the `make_state` of server requests)."""
    import requests

    return requests.Session()


def distinct_bodies(b64_rows: Sequence[str], batch: int, make_body: Callable[[list[str]], bytes]) -> dict[int, bytes]:
    """Every distinct request body of a row, built before timing, keyed by its first image's
    index in the pool (`(index * batch) % len(pool)` for request `index`)."""
    bodies: dict[int, bytes] = {}
    for index in range(len(b64_rows)):
        bodies.setdefault((index * batch) % len(b64_rows), make_body(request_images(b64_rows, batch, index)))
    return bodies


class MeasuredServer:
    """A started server (`.proc`, `.stop()`), measured with each number of concurrent clients in
    turn, every round, and its process tree's CPU and memory."""

    def __init__(self, server: Any, call: Callable[[int, Any], np.ndarray], spec: dict[str, Any]):
        self.server = server
        pid = server.proc.pid
        self.rows = {
            c: MeasuredRow(call, spec["batch"], c, new_session, lambda: tree_cpu_seconds(pid)) for c in spec["clients"]
        }
        for clients, row in self.rows.items():
            row.warm_up(max(spec["warmup"], clients))
        self.sampled = {c: 0.0 for c in self.rows}
        self.sampler = RssSampler(pid)
        self.sampler.start()

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> None:
        for clients, row in self.rows.items():
            self.sampler.reset()
            row.run_round(min_requests, min_seconds, max_requests)
            self.sampled[clients] = max(self.sampled[clients], self.sampler.peak)

    def result(self) -> dict[str, Any]:
        peak = tree_peak_rss_mb(self.server.proc.pid)
        return {
            "clients": {
                str(c): {**row.result(), "peak_rss_mb": peak, "sampled_peak_rss_mb": self.sampled[c]}
                for c, row in self.rows.items()
            }
        }

    def close(self) -> None:
        self.sampler.stop()
        self.server.stop()


class ServerRows(MeasuredServer):
    """Row (d): one server, measured with each number of concurrent clients in turn, every round."""

    def __init__(self, spec: dict[str, Any]):
        b64 = [base64.b64encode(data).decode("ascii") for data in read_pool(spec)]
        batch = spec["batch"]
        bodies = distinct_bodies(b64, batch, lambda rows: request_body(rows, spec["form"]))
        server = ScoringServer(
            spec["model_dir"], spec["workers"], spec["model_config"], Path(spec["log"]), spec.get("env")
        )
        try:
            server.wait_ready()
            call = server_call(server.url, lambda index: (bodies[(index * batch) % len(b64)], batch))
            super().__init__(server, call, spec)
        except BaseException:
            server.stop()
            raise
