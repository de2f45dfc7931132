"""`mlflow-clip benchmark`: how fast a given model runs on this machine, and how to run it so.

Measures one model (a model URI or a local model directory) the way it is served: the pyfunc
end to end, from encoded images, each configuration in a fresh process of its own (so its peak
RSS is its own). A configuration is the model's precision on one runtime that can run it here
(onnxruntime; OpenVINO when installed); for each: images/s, p50 and p95 latency per request,
peak RSS, the time to load, the graph alone on ready tensors, and the decode's share of the CPU
time an image costs, with the exact settings it ran and the commands that run the model so.
The images are photo-like JPEGs made here (decoding costs what real photos cost) or a folder
of yours.

    $ mlflow-clip benchmark -m models:/clip-zero-shot@production
    $ mlflow-clip benchmark -m ./model --images photos/ --batch 1 --json

Serving world: no torch. (The comparative benchmark against CLIP's PyTorch pipeline, peers,
servers and hostile traffic is a development harness in a checkout's `benchmarks/` folder.)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlflow_clip.demo_data import PHOTO_JPEG_QUALITY, make_photo_jpeg
from mlflow_clip.errors import BenchmarkInputError

DEFAULT_SIZE = (1920, 1080)
DEFAULT_BATCH = 8
DEFAULT_SECONDS = 10.0
GENERATED_IMAGES = 16
MAX_FOLDER_IMAGES = 200
MIN_REQUESTS = 5
WARMUP_REQUESTS = 2
CHILD_TIMEOUT_SECONDS = 1800
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RUNTIMES = ("onnxruntime", "openvino")
# The CPU flags that decide which precision is fast here (bf16 is native with AVX512_BF16 or AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class Measurement:
    """The model at its precision on one runtime, measured in a process of its own."""

    precision: str
    runtime: str
    model_config: dict[str, Any]
    status: str = "ok"  # ok, failed, not runnable
    note: str = ""
    engine: str = ""  # the session's own description: library, version, providers or precision
    settings: dict[str, Any] = field(default_factory=dict)  # every runtime setting in effect
    load_s: float | None = None  # mlflow.pyfunc.load_model from local files
    requests: int = 0
    images: int = 0
    images_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    peak_rss_mb: float | None = None  # the process's VmHWM: interpreter, MLflow, the model
    cpu_ms_per_image: float | None = None  # end to end, every thread
    decode_ms_per_image: float | None = None  # decode and preprocess alone, on one thread
    decode_share: float | None = None  # decode_ms_per_image / cpu_ms_per_image
    graph_images_per_s: float | None = None  # the graph alone, on ready tensors
    python: str = ""
    serve: str = ""


@dataclass
class ModelBenchmark:
    """A run: what was measured, on what, and one `Measurement` per configuration."""

    model_uri: str
    images: str
    batch: int
    threads: int
    seconds: float
    machine: dict[str, Any]
    command: str
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Images


def parse_size(text: str) -> tuple[int, int]:
    """`1920x1080` -> (1920, 1080); each side from 16 to 20000 pixels."""
    try:
        width, height = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise BenchmarkInputError(f"Received --size {text!r}; expected WIDTHxHEIGHT, e.g. 1920x1080.") from None
    if not (16 <= width <= 20000 and 16 <= height <= 20000):
        raise BenchmarkInputError(f"Received --size {text!r}; expected each side from 16 to 20000 pixels.")
    return width, height


def collect_images(folder: str | os.PathLike) -> list[Path]:
    """The images of a folder and its subfolders, by name: the first `MAX_FOLDER_IMAGES`."""
    root = Path(folder)
    if not root.is_dir():
        raise BenchmarkInputError(f"Received --images {str(folder)!r}; expected a folder of images.")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise BenchmarkInputError(
            f"Received --images {str(folder)!r}, which holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "expected a folder of images, or leave --images out to score generated JPEGs."
        )
    return found[:MAX_FOLDER_IMAGES]


def _generate_images(folder: Path, size: tuple[int, int]) -> list[Path]:
    paths = []
    for seed in range(GENERATED_IMAGES):
        path = folder / f"{seed:03d}.jpg"
        path.write_bytes(make_photo_jpeg(size[0], size[1], seed))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Configurations: the model's precision on each runtime that can run it here


def configurations(
    model_uri: str, model_dir: str | os.PathLike, threads: int, runtimes: Sequence[str] | None = None
) -> list[Measurement]:
    """A `Measurement` to fill for each runtime asked for (default: each installed); a bf16
    model's onnxruntime configuration computes in fp32, and says so."""
    from mlflow_clip.flavor import flavor_configuration
    from mlflow_clip.serving.openvino_runtime import OPENVINO_INSTALL_HINT, openvino_available

    precision = flavor_configuration(model_dir).get("precision", "fp32")
    asked = list(runtimes or RUNTIMES)
    if not asked or set(asked) - set(RUNTIMES):
        raise BenchmarkInputError(f"Received --runtimes {','.join(asked)!r}; expected any of {list(RUNTIMES)}.")
    if runtimes and "openvino" in asked and not openvino_available():
        raise BenchmarkInputError(f"Received --runtimes openvino, not installed here: {OPENVINO_INSTALL_HINT}.")
    found = []
    for runtime in asked:
        measurement = Measurement(precision, runtime, {"runtime": runtime, "intra_op_num_threads": threads})
        if runtime == "openvino" and not openvino_available():
            if precision != "bf16":
                continue  # noted in the report; nothing to measure
            measurement.status = "not runnable"
            measurement.note = f"a bf16 model needs OpenVINO, which is not installed here: {OPENVINO_INSTALL_HINT}"
        elif runtime == "onnxruntime" and precision == "bf16":
            measurement.note = "on onnxruntime this bf16 model's graph computes in fp32 (only OpenVINO runs bf16)"
        measurement.python, measurement.serve = reproduce_commands(model_uri, measurement.model_config)
        found.append(measurement)
    return found


def reproduce_commands(model_uri: str, model_config: dict[str, Any]) -> tuple[str, str]:
    """The Python call and the serve command that load the model with `model_config`."""
    config = json.dumps(model_config)
    python = f"mlflow.pyfunc.load_model({model_uri!r}, model_config={config})"
    serve = f"MLFLOW_PYFUNC_INFERENCE_CONFIG={shlex.quote(config)} mlflow models serve -m {shlex.quote(model_uri)}"
    return python, serve + " --env-manager local"


# --------------------------------------------------------------------------------------------
# A run


def benchmark_model(
    model_uri: str,
    images: str | os.PathLike | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    batch: int = DEFAULT_BATCH,
    threads: int = 0,
    seconds: float = DEFAULT_SECONDS,
    runtimes: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> ModelBenchmark:
    """Measure `model_uri` on this machine, each configuration in a fresh process.

    Args:
        model_uri: a model URI (``models:/name@alias``, ``runs:/...``) or a local model directory.
        images: a folder of images to score; by default photo-like JPEGs of `size`, made here.
        size: the generated JPEGs' (width, height).
        batch: images per request.
        threads: ``intra_op_num_threads`` of every configuration; 0: every core this process may use.
        seconds: measured seconds per configuration, at least (and at least 5 requests).
        runtimes: the runtimes to measure (``onnxruntime``, ``openvino``); by default each installed.
        progress: called with a line of text as each configuration starts and ends.

    >>> run = benchmark_model("models:/clip-zero-shot@production", seconds=5)  # doctest: +SKIP
    >>> [(m.runtime, round(m.images_per_s, 1)) for m in run.measurements]  # doctest: +SKIP
    [('onnxruntime', 15.2), ('openvino', 14.8)]
    """
    if batch < 1 or seconds < 0 or threads < 0:
        raise BenchmarkInputError(
            f"Received batch={batch}, seconds={seconds}, threads={threads}; expected a batch of 1 or more, "
            "seconds of 0 or more and threads of 0 (every core) or more."
        )
    threads = threads or _usable_cores()
    model_dir = _local_model(model_uri)
    run = ModelBenchmark(model_uri, "", batch, threads, seconds, machine_info(), "")
    run.command = _command_line(model_uri, images, size, batch, threads, seconds, runtimes)
    run.measurements = configurations(model_uri, model_dir, threads, runtimes)
    with tempfile.TemporaryDirectory(prefix="mlflow-clip-benchmark-") as work:
        paths = collect_images(images) if images else _generate_images(Path(work), size)
        made = f"photo-like JPEGs of {size[0]}x{size[1]} (quality {PHOTO_JPEG_QUALITY}), made here"
        run.images = f"{len(paths)} " + (f"images from {images}" if images else made)
        for measurement in run.measurements:
            progress(f"measuring {measurement.precision} on {measurement.runtime} ...")
            if measurement.status == "ok":
                _measure_in_child(measurement, model_dir, paths, run, Path(work))
            progress(f"  {_summary_line(measurement)}")
    run.machine["loadavg_end"] = _loadavg()
    run.notes = _notes(run)
    return run


def _local_model(model_uri: str) -> str:
    import mlflow

    from mlflow_clip.flavor import flavor_configuration

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    except Exception as e:  # MLflow's own errors: a missing model, version, alias or path
        raise BenchmarkInputError(
            f"Received --model-uri {model_uri!r}, which could not be read ({type(e).__name__}: {str(e)[:300]}); "
            "expected a model URI (models:/name/1, models:/name@alias, runs:/...) or a local model directory."
        ) from None
    flavor_configuration(local)  # an mlflow-clip model, or a clear error
    return local


def _measure_in_child(measurement: Measurement, model_dir: str, paths, run: ModelBenchmark, work: Path) -> None:
    spec = {"model_dir": model_dir, "model_config": measurement.model_config, "batch": run.batch}
    spec.update(images=[str(p) for p in paths], seconds=run.seconds)
    spec_path, result_path = (work / f"{measurement.runtime}.{part}.json" for part in ("spec", "result"))
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_PYFUNC_INFERENCE_CONFIG"}
    argv = [sys.executable, "-m", __name__, str(spec_path), str(result_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_SECONDS)
    if done.returncode != 0 or not result_path.exists():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])[-600:]
        measurement.status, measurement.note = "failed", f"exit code {done.returncode}: {tail}"
        return
    for name, value in json.loads(result_path.read_text()).items():
        setattr(measurement, name, value)


def _command_line(model_uri, images, size, batch, threads, seconds, runtimes) -> str:
    args = ["mlflow-clip", "benchmark", "-m", model_uri]
    args += ["--images", str(images)] if images else ["--size", f"{size[0]}x{size[1]}"]
    args += ["--batch", str(batch), "--threads", str(threads), "--seconds", f"{seconds:g}"]
    args += ["--runtimes", ",".join(runtimes)] if runtimes else []
    return " ".join(shlex.quote(a) for a in args)


def _notes(run: ModelBenchmark) -> list[str]:
    from mlflow_clip.serving.openvino_runtime import OPENVINO_INSTALL_HINT, openvino_available

    notes = []
    if not openvino_available() and all(m.runtime != "openvino" for m in run.measurements):
        notes.append(f"OpenVINO is not installed here, so it was not measured: {OPENVINO_INSTALL_HINT}.")
    cores, load = run.machine.get("cpu_count") or 1, run.machine.get("loadavg_start")
    if load is not None and load > cores / 2:
        notes.append(
            f"The machine was busy when the run started (load average {load:.2f} on {cores} cores): other "
            "processes took CPU time, so these figures are lower than a quiet machine gives."
        )
    return notes


# --------------------------------------------------------------------------------------------
# Inside a configuration's process


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, then time the pyfunc end to end, decoding alone and the graph alone."""
    import mlflow
    import pandas as pd

    began = time.perf_counter()
    model = mlflow.pyfunc.load_model(spec["model_dir"], model_config=spec["model_config"])
    load_s = time.perf_counter() - began
    pool = [Path(p).read_bytes() for p in spec["images"]]
    batch = spec["batch"]
    # Request i: `batch` images of the pool from image i * batch on, cyclically.
    requests = [[(i * batch + j) % len(pool) for j in range(batch)] for i in range(len(pool))]
    frames = [pd.DataFrame({"image": [pool[k] for k in request]}) for request in requests]
    end_to_end = _timed(lambda i: model.predict(frames[i % len(frames)]), spec["seconds"])
    result = {"load_s": load_s, **_summary(end_to_end, batch)}
    classifier = model.get_raw_model()
    session = classifier.session
    settings = {k: v for k, v in session.settings.to_dict().items() if k != "extra"}
    result.update(engine=session.description, settings=settings)
    result.update(_decode_and_graph(classifier, pool, requests, spec["seconds"]))
    result["decode_share"] = min(1.0, result["decode_ms_per_image"] / result["cpu_ms_per_image"])
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _decode_and_graph(classifier: Any, pool: list[bytes], requests: list, seconds: float) -> dict[str, Any]:
    """Decode + preprocess each image on one thread (its CPU time), then the graph alone on
    those tensors, in the same requests."""
    from mlflow_clip.serving.images import decode_image

    draft = classifier.config.input_resolution if classifier.session.settings.jpeg_draft else None
    tensors, cpu = [], 0.0
    for data in pool:
        began = time.thread_time()
        tensors.append(classifier.preprocessor(decode_image(data, classifier.limits, draft)))
        cpu += time.thread_time() - began
    batches = [np.stack([tensors[k] for k in request]) for request in requests]
    graph = _timed(lambda i: classifier.predict_tensors(batches[i % len(batches)]), seconds / 2)
    images = len(graph["latencies"]) * len(requests[0])
    return {"decode_ms_per_image": cpu * 1000 / len(pool), "graph_images_per_s": images / graph["wall"]}


def _timed(call: Callable[[int], Any], seconds: float) -> dict[str, Any]:
    """Warm-up requests, then requests until `MIN_REQUESTS` and `seconds` are both reached."""
    for index in range(WARMUP_REQUESTS):
        call(index)
    latencies: list[float] = []
    cpu_before, began = _cpu_seconds(), time.perf_counter()
    while len(latencies) < MIN_REQUESTS or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        call(WARMUP_REQUESTS + len(latencies))
        latencies.append(time.perf_counter() - start)
    return {"latencies": latencies, "wall": time.perf_counter() - began, "cpu": _cpu_seconds() - cpu_before}


def _summary(timed: dict[str, Any], batch: int) -> dict[str, Any]:
    latencies_ms = np.asarray(timed["latencies"]) * 1000.0
    images = len(latencies_ms) * batch
    return {
        "requests": len(latencies_ms),
        "images": images,
        "images_per_s": images / timed["wall"],
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p95_ms": float(np.percentile(latencies_ms, 95)),
        "cpu_ms_per_image": timed["cpu"] * 1000 / images,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_main(argv: Sequence[str]) -> int:
    spec_path, result_path = argv
    result = measure(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# The machine and the report


def machine_info() -> dict[str, Any]:
    """The CPU, its flags that matter for precision, the cores and the load average."""
    from importlib.metadata import PackageNotFoundError, version

    info = _cpuinfo()
    versions = {}
    for name in ("mlflow", "onnxruntime", "openvino", "pillow", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor(),
        "cpu_count": _usable_cores(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None,
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": _loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in found:
                found[key.strip()] = value.strip()
    except OSError:
        pass
    return found


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def _number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _summary_line(m: Measurement) -> str:
    if m.status != "ok":
        return f"{m.status}: {m.note}"
    return (
        f"{m.images_per_s:.1f} images/s, p50 {m.p50_ms:.0f} ms, p95 {m.p95_ms:.0f} ms, peak RSS {m.peak_rss_mb:.0f} MB"
    )


def render_report(run: ModelBenchmark) -> str:
    """The run as Markdown: what and where, one table row per configuration, then each one's
    settings and commands, the notes, and the command that repeats the run."""
    machine, versions = run.machine, run.machine["versions"]
    load = (
        f"{_number(machine.get('loadavg_start'), 2)} at the start, {_number(machine.get('loadavg_end'), 2)} at the end"
    )
    lines = [
        f"Model: {run.model_uri}",
        f"Images: {run.images}; {run.batch} per request; {run.threads} threads; at least {run.seconds:g} s "
        f"and {MIN_REQUESTS} requests per configuration, after {WARMUP_REQUESTS} warm-up requests.",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, flags {' '.join(machine['cpu_flags']) or 'none'} "
        f"(native bf16: {'yes' if machine['native_bf16'] else 'no'}); load average {load}; onnxruntime "
        f"{versions['onnxruntime']}, OpenVINO {versions['openvino'] or 'not installed'}, Pillow {versions['pillow']}.",
        "",
        "| precision | runtime | images/s | p50 ms | p95 ms | peak RSS MB | decode ms/image (1 thread) "
        "| decode share of CPU | graph alone images/s | load s | engine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in run.measurements:
        engine = m.engine if m.status == "ok" else f"{m.status}: {m.note}"
        lines.append(
            f"| {m.precision} | {m.runtime} | {_number(m.images_per_s)} | {_number(m.p50_ms, 0)} | "
            f"{_number(m.p95_ms, 0)} | {_number(m.peak_rss_mb, 0)} | {_number(m.decode_ms_per_image)} | "
            f"{_number(None if m.decode_share is None else 100 * m.decode_share, 0, '%')} | "
            f"{_number(m.graph_images_per_s)} | {_number(m.load_s, 2)} | {engine} |"
        )
    lines += ["", "Settings and commands:"]
    for m in run.measurements:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in m.settings.items())
        lines += [
            f"- {m.precision} on {m.runtime}: model_config {json.dumps(m.model_config)}"
            + (f"; {m.note}" if m.note and m.status == "ok" else ""),
            *([f"  - settings in effect: {settings}"] if settings else []),
            f"  - Python: `{m.python}`",
            f"  - serve: `{m.serve}`",
        ]
    lines += ["", "Notes:", *(f"- {note}" for note in run.notes)] if run.notes else []
    lines += ["", f"Repeat: `{run.command}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
