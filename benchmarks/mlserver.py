"""MLServer as a row: `mlserver start` with the project's runtime (`mlflow_clip.mlserver.ClipRuntime`,
typed tensors, its own batching per parameter set) or MLServer's MLflow runtime
(`mlserver_mlflow.MLflowRuntime`, what KServe and Seldon run for MLflow models), measured with
V2 inference requests from concurrent clients, with adaptive batching on or off, next to row (d)
with the same clients.

MLServer downgrades FastAPI and Starlette, so it never goes into the benchmark's own
environment: `ensure_mlserver_env` builds one per runtime with uv under the work dir (MLServer,
its MLflow runtime and the model's own `requirements.txt`; for ClipRuntime also a wheel of this
checkout, built by `project_wheel`), once, and reuses it while its packages are the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.images import read_pool
from benchmarks.results import RowResult
from benchmarks.server import (
    JSON_HEADERS,
    SERVER_REQUEST_TIMEOUT_SECONDS,
    MeasuredServer,
    ServerProcess,
    distinct_bodies,
    free_port,
)
from benchmarks.worker import child_env

# With inference workers (`parallel_workers` > 0) MLServer needs an event loop that uvloop 0.22
# and later no longer makes ("There is no current event loop"), hence the pin.
MLSERVER_PACKAGES: tuple[str, ...] = ("mlserver", "mlserver-mlflow", "uvloop<0.22")
MLSERVER_RUNTIME = "mlserver_mlflow.MLflowRuntime"
# mlflow-clip's own runtime (mlflow_clip/mlserver.py): typed tensors, batching per parameter set.
CLIP_RUNTIME = "mlflow_clip.mlserver.ClipRuntime"
MODEL_NAME = "clip"
CHECKOUT = Path(__file__).resolve().parents[1]
ENV_MARKER = "mlflow-clip-env.json"
INSTALL_TIMEOUT_SECONDS = 1800


class MLServerUnavailable(RuntimeError):
    """MLServer's environment could not be built here (no uv, no package index)."""


def find_uv() -> str | None:
    """uv next to this interpreter (a venv's bin/), else on PATH."""
    return shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")


def model_requirements(model_dir: str | Path) -> list[str]:
    """The requirements a saved model lists (its `requirements.txt`), one per line."""
    lines = (Path(model_dir) / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ensure_mlserver_env(env_dir: Path, packages: Sequence[str]) -> Path:
    """The Python of an environment at `env_dir` with MLServer and `packages`, built with uv
    unless one with the same packages is already there."""
    key = {"python": platform.python_version(), "packages": [*MLSERVER_PACKAGES, *packages]}
    python, marker = env_dir / "bin" / "python", env_dir / ENV_MARKER
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == key:
        return python
    uv = find_uv()
    if uv is None:
        raise MLServerUnavailable("MLServer's environment is built with uv, which is not installed: pip install uv")
    shutil.rmtree(env_dir, ignore_errors=True)
    for command in (
        [uv, "venv", "-q", "--python", sys.executable, str(env_dir)],
        [uv, "pip", "install", "-q", "--python", str(python), *key["packages"]],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS)
        if done.returncode != 0:
            raise MLServerUnavailable(f"`{' '.join(command[:3])}` failed: {done.stderr.strip()[-600:]}")
    marker.write_text(json.dumps(key))
    return python


# What a wheel is not built from: version control, environments, build outputs, local stores.
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "mlruns", "mlflow.db", "__pycache__", "*.so")


def build_wheel(out_dir: Path, checkout: Path = CHECKOUT) -> Path:
    """A wheel of `checkout`, built from a copy of its sources in `out_dir`: pip builds in the
    source tree, so two builds of the checkout at once (two test workers, say) would share its
    build/ folder, and the checkout would keep what the build leaves there."""
    sources = out_dir / "sources"
    shutil.rmtree(sources, ignore_errors=True)
    shutil.copytree(checkout, sources, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(sources)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS)
    shutil.rmtree(sources, ignore_errors=True)
    if done.returncode != 0:
        raise MLServerUnavailable(f"building this checkout's wheel failed: {done.stderr.strip()[-600:]}")
    (built,) = out_dir.glob("mlflow_clip-*.whl")
    return built


def project_wheel(wheel_dir: Path) -> Path:
    """A wheel of this checkout (what ClipRuntime's environment installs), in a folder named by
    its content's hash, so that an environment built from an older wheel is never reused."""
    build = wheel_dir / "build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    built = build_wheel(build)
    final = wheel_dir / _wheel_digest(built) / built.name
    if final.exists():  # the same sources: the environment built from it is reused
        shutil.rmtree(build, ignore_errors=True)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    built.replace(final)
    return final


def _wheel_digest(wheel: Path) -> str:
    """A digest of what a wheel carries, blind to what differs between two builds of the same
    sources (zip timestamps, the compiled binary and the RECORD that hashes it); the binary's C
    source is in the wheel, so a change to it still changes the digest."""
    import zipfile

    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith(".so") or name.endswith(".dist-info/RECORD"):
                continue
            digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return digest.hexdigest()[:16]


def write_model_settings(
    root: Path, model_dir: str, batching: dict[str, Any], runtime: str = "mlflow", model_config: dict | None = None
) -> None:
    """The model of a repository for `mlserver start root`: `<MODEL_NAME>/model-settings.json`,
    with its adaptive batching settings (`max_batch_size`, `max_batch_time`), if any: at the top
    level for MLServer's MLflow runtime, in `parameters.extra` for ClipRuntime, which batches per
    parameter set itself and takes the model's `model_config` there too (docs/mlserver.md); the
    MLflow runtime gets it from `MLFLOW_PYFUNC_INFERENCE_CONFIG`."""
    (root / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    if runtime == "clip":
        extra = {**batching, **({"model_config": model_config} if model_config else {})}
        parameters = {"uri": model_dir, **({"extra": extra} if extra else {})}
        model = {"name": MODEL_NAME, "implementation": CLIP_RUNTIME, "parameters": parameters}
    else:
        model = {"name": MODEL_NAME, "implementation": MLSERVER_RUNTIME, "parameters": {"uri": model_dir}, **batching}
    (root / MODEL_NAME / "model-settings.json").write_text(json.dumps(model, indent=2))


class MLServerProcess(ServerProcess):
    """`mlserver start` on a model repository (its `settings.json` written here: free local
    ports, no stack traces in answers), stopped with all its processes."""

    name = "mlserver"
    ready_path = f"/v2/models/{MODEL_NAME}/ready"

    def __init__(self, python: Path, root: Path, parallel_workers: int, log_path: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": parallel_workers,
            "debug": False,
        }
        (root / "settings.json").write_text(json.dumps(settings, indent=2))
        env = child_env(env)
        env["PATH"] = str(python.parent) + ":" + env["PATH"]
        self._start([str(python.parent / "mlserver"), "start", str(root)], log_path, env, cwd=root)


def v2_body(b64_rows: Sequence[str]) -> bytes:
    """A V2 inference request: one BYTES input `image` of base64 images, one per row."""
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(b64_rows), 1], "data": list(b64_rows)}
    return json.dumps({"inputs": [tensor]}).encode("utf-8")


def v2_call(url: str, bodies: Callable[[int], tuple[bytes, int]]) -> Callable[[int, Any], np.ndarray]:
    """A request function for `run_requests`: POST a V2 request, check it, return its probabilities."""

    def call(index: int, session: Any) -> np.ndarray:
        body, batch = bodies(index)
        response = session.post(
            f"{url}/v2/models/{MODEL_NAME}/infer",
            data=body,
            headers=JSON_HEADERS,
            timeout=SERVER_REQUEST_TIMEOUT_SECONDS,
        )
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        outputs = {output["name"]: output for output in response.json()["outputs"]}
        return _probabilities(outputs["probabilities"], batch)

    return call


def _probabilities(output: dict[str, Any], batch: int) -> np.ndarray:
    """The `[batch, C]` probabilities of a V2 output: an FP32/FP64 tensor (ClipRuntime) or one
    JSON list per row (MLServer's MLflow runtime, pd_json)."""
    if output.get("datatype") == "BYTES":
        probabilities = np.asarray([json.loads(row) for row in output["data"]], dtype=float)
    else:
        probabilities = np.asarray(output["data"], dtype=float).reshape(output["shape"])
    if len(probabilities) != batch:
        raise RuntimeError(f"{len(probabilities)} predictions for {batch} images")
    return probabilities


class MLServerRows(MeasuredServer):
    """The MLServer row: one `mlserver start` serving the model, measured with each number of
    concurrent clients in turn, every round, like row (d)."""

    def __init__(self, spec: dict[str, Any]):
        runtime = spec.get("runtime", "mlflow")
        packages = model_requirements(spec["model_dir"])
        if runtime == "clip":
            packages.append(str(project_wheel(Path(spec["wheel_dir"]))))
        python = ensure_mlserver_env(Path(spec["env_dir"]), packages)
        b64 = [base64.b64encode(data).decode("ascii") for data in read_pool(spec)]
        batch = spec["batch"]
        bodies = distinct_bodies(b64, batch, v2_body)
        root = Path(spec["repository"])
        write_model_settings(root, spec["model_dir"], spec["batching"], runtime, spec["model_config"])
        env = {"MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(spec["model_config"]), **(spec.get("env") or {})}
        server = MLServerProcess(python, root, spec["parallel_workers"], Path(spec["log"]), env)
        try:
            server.wait_ready()
            call = v2_call(server.url, lambda index: (bodies[(index * batch) % len(b64)], batch))
            super().__init__(server, call, spec)
        except BaseException:
            server.stop()
            raise


def note_mlserver_ratios(rows: list[RowResult]) -> None:
    """Each MLServer row's throughput over row (d)'s with the same clients (same model, size,
    batch; the first server setting), in its note."""

    def key(r: RowResult) -> tuple[str, str, int]:
        return r.model, r.size, r.batch

    servers = {(*key(r), r.row): r for r in rows if r.row.startswith("server-") and r.ok}
    for row in rows:
        if not (row.row.startswith("mlserver-") and row.ok and row.images_per_s):
            continue
        clients = row.row.split("-")[1]  # "16c"
        same = [s for (m, z, b, name), s in servers.items() if (m, z, b, name.split("-")[1]) == (*key(row), clients)]
        server = same[0] if same else None
        if server is not None and server.images_per_s:
            ratio = f"{row.images_per_s / server.images_per_s:.2f}x {server.label}"
            row.note = f"{ratio}; {row.note}" if row.note else ratio
