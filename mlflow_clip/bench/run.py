"""Side by side: CLIP's PyTorch pipeline, raw onnxruntime, the pyfunc and the scoring server.

One run measures every row on the same JPEGs, with the same thread count, each row in a fresh
process of its own (so its peak RSS is its own), and reports images/s, p50 and p95 latency per
request, peak RSS and the ratios between rows:

    $ mlflow-clip benchmark --quick                                   # demo model, small images
    $ mlflow-clip benchmark --models RN50 --sizes 1920x1080 --batches 8 --write-docs docs/benchmark.md

Rows, per model x image size x batch size:

- `torch` (a): CLIP's own `preprocess` + the PyTorch model + the same baked zero-shot head,
  from the encoded JPEG bytes (decoded with PIL), `torch.set_num_threads(threads)`.
- `onnxruntime` (b): the exported graph on already-preprocessed float32 tensors, the same
  session settings as the pyfunc: the ceiling for our graph.
- `pyfunc` (c): `mlflow.pyfunc.load_model(dir).predict(DataFrame({"image": [bytes, ...]}))`.
- `server` (d): `mlflow models serve --env-manager local` over HTTP, 1 and 4 concurrent clients.
- `precision` (e): the pyfunc on the int8 and fp16 variants of the model.
- `draft`: the pyfunc with the `jpeg_draft` decode option, when the model offers it.
- `load`: a registered model's load-to-first-prediction time, in a fresh interpreter.
- `settings` (only when asked for): the pyfunc and (b) with one default switched back at a
  time (one shard per request; onnxruntime's thread spinning on; Pillow doing the resize), to
  show what each buys.

`--soak` adds a sustained run of the server (mixed batch sizes, several clients) that samples
the server's RSS, with onnxruntime's CPU memory arena off and on.

This module needs only the serving install; torch and clip are imported by the child processes
that build models or run row (a).
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlflow_clip.serving import resample
from mlflow_clip.serving.preprocess import native_status

ROW_KINDS: tuple[str, ...] = (
    "torch", "onnxruntime", "pyfunc", "labels", "server", "precision", "draft", "load", "settings",
)
# `settings` (the pyfunc's session and sharding defaults switched back one at a time) is asked for.
DEFAULT_ROWS: tuple[str, ...] = tuple(kind for kind in ROW_KINDS if kind != "settings")
DEFAULT_MODELS: tuple[str, ...] = ("RN50", "ViT-B/32", "demo")
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1920, 1080), (4000, 3000))
DEFAULT_BATCHES: tuple[int, ...] = (1, 8, 32)
VARIANT_PRECISIONS: tuple[str, ...] = ("int8", "fp16")
SERVER_FORMS: tuple[str, ...] = ("dataframe_split", "inputs")
DEFAULT_WORK_DIR = Path.home() / ".cache" / "mlflow-clip" / "benchmark"
# Full-size architectures get random weights and these classes; the demo model gets its own.
BENCHMARK_CLASSES: tuple[str, ...] = (
    "a person", "a car", "a dog", "a cat", "a bird", "a tree", "a house", "a boat", "a bicycle", "a flower",
)
TEMPLATES = "photo"
JPEG_QUALITY = 90
JSON_HEADERS = {"Content-Type": "application/json"}
SERVER_START_SECONDS = 300
SERVER_REQUEST_TIMEOUT_SECONDS = 900
RSS_SAMPLE_SECONDS = 0.1
MIN_CPU_WALL_SECONDS = 1.0
MIN_TREND_REQUESTS = 500  # soak requests after the warm-up needed to show an RSS trend
# The configuration the targets are stated for.
TARGET_MODEL, TARGET_SIZE, TARGET_BATCH = "RN50", "1920x1080", 8
LOAD_TARGET_SECONDS = 3.0
_PROGRESS_PREFIX = "[benchmark]"
FP16_NOTE = "CPU provider (no GPU here): fp16 weights, computed in float32 behind casts"


class BenchmarkError(ValueError):
    """Bad benchmark options; the message names the option, the value and the fix."""


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class ServerSettings:
    """How `mlflow models serve` runs: uvicorn workers x onnxruntime intra-op threads each."""

    workers: int = 1
    threads: int = 1

    @property
    def key(self) -> str:
        return f"w{self.workers}t{self.threads}"

    def describe(self) -> str:
        return f"--workers {self.workers}, intra_op_num_threads={self.threads} per worker"


@dataclass(frozen=True)
class BenchmarkOptions:
    """What to measure; `quick_options()` gives the tiny configuration tests and examples run."""

    models: tuple[str, ...] = DEFAULT_MODELS
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    batches: tuple[int, ...] = DEFAULT_BATCHES
    rows: tuple[str, ...] = DEFAULT_ROWS
    precisions: tuple[str, ...] = VARIANT_PRECISIONS
    threads: int = 2
    clients: tuple[int, ...] = (1, 4)
    warmup: int = 2
    min_requests: int = 5
    min_seconds: float = 10.0
    max_requests: int = 1000
    # Measured requests are split into rounds that alternate between the rows of a group.
    rounds: int = 3
    pool_size: int = 8
    load_repeats: int = 3
    # Measured best on 2 cores under concurrent load: one worker, one onnxruntime thread per request.
    server_configs: tuple[ServerSettings, ...] = (ServerSettings(1, 1),)
    server_form: str = "dataframe_split"
    # Extra environment variables for every server (e.g. MALLOC_ARENA_MAX=2)
    server_env: tuple[tuple[str, str], ...] = ()
    soak: bool = False
    soak_models: tuple[str, ...] = ("demo",)
    soak_size: tuple[int, int] = (640, 480)
    soak_requests: tuple[int, ...] = (2000,)  # per soak model, or one count for all
    soak_clients: int = 4
    soak_max_batch: int = 32
    soak_arena: tuple[bool, ...] = (False, True)
    work_dir: Path = DEFAULT_WORK_DIR
    rebuild: bool = False
    quick: bool = False
    child_timeout: float = 4 * 3600.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["work_dir"] = str(self.work_dir)
        data["sizes"] = [size_name(s) for s in self.sizes]
        data["soak_size"] = size_name(self.soak_size)
        data["server_configs"] = [c.key for c in self.server_configs]
        return data


QUICK = dict(
    models=("demo",), sizes=((320, 240),), batches=(1, 4), warmup=1, min_requests=3, min_seconds=0.0, rounds=2,
    pool_size=4, load_repeats=1, soak_requests=(100,), soak_size=(320, 240), quick=True,
)


def quick_options(**overrides: Any) -> BenchmarkOptions:
    """The tiny configuration (demo model, 320x240, batches 1 and 4, a few requests)."""
    return replace(BenchmarkOptions(**QUICK), **overrides)


def size_name(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_sizes(text: str, option: str = "--sizes") -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in _split(text):
        try:
            width, height = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise BenchmarkError(f"Received {option} item {item!r}; expected WIDTHxHEIGHT, e.g. 1920x1080.") from None
        if not (16 <= width <= 20000 and 16 <= height <= 20000):
            raise BenchmarkError(f"Received {option} item {item!r}; expected each side from 16 to 20000 pixels.")
        sizes.append((width, height))
    return tuple(sizes)


def parse_ints(text: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    values = []
    for item in _split(text):
        try:
            value = int(item)
        except ValueError:
            raise BenchmarkError(f"Received {option} item {item!r}; expected whole numbers, e.g. 1,8,32.") from None
        if value < minimum:
            raise BenchmarkError(f"Received {option} item {value}; expected {minimum} or more.")
        values.append(value)
    return tuple(values)


def parse_choices(text: str, option: str, choices: Sequence[str]) -> tuple[str, ...]:
    values = tuple(_split(text))
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise BenchmarkError(f"Received {option} {unknown}; expected any of {list(choices)}.")
    return values


def parse_server_configs(text: str) -> tuple[ServerSettings, ...]:
    configs = []
    for item in _split(text):
        try:
            workers, threads = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise BenchmarkError(
                f"Received --server-configs item {item!r}; expected WORKERSxTHREADS (uvicorn workers x "
                "onnxruntime threads per worker), e.g. 1x2,2x1."
            ) from None
        if workers < 1 or threads < 1:
            raise BenchmarkError(f"Received --server-configs item {item!r}; expected 1 or more of each.")
        configs.append(ServerSettings(workers, threads))
    return tuple(configs)


def command_line(options: BenchmarkOptions) -> str:
    """The `mlflow-clip benchmark` arguments that select `options` (defaults left out)."""
    import shlex

    base = quick_options() if options.quick else BenchmarkOptions()
    args = ["--quick"] if options.quick else []
    listed = {
        "--models": (options.models, base.models, ",".join(options.models)),
        "--sizes": (options.sizes, base.sizes, ",".join(size_name(s) for s in options.sizes)),
        "--batches": (options.batches, base.batches, ",".join(map(str, options.batches))),
        "--rows": (options.rows, base.rows, ",".join(options.rows)),
        "--precisions": (options.precisions, base.precisions, ",".join(options.precisions)),
        "--threads": (options.threads, base.threads, str(options.threads)),
        "--requests": (options.min_requests, base.min_requests, str(options.min_requests)),
        "--seconds": (options.min_seconds, base.min_seconds, f"{options.min_seconds:g}"),
        "--warmup": (options.warmup, base.warmup, str(options.warmup)),
        "--rounds": (options.rounds, base.rounds, str(options.rounds)),
        "--server-configs": (options.server_configs, base.server_configs,
                             ",".join(f"{c.workers}x{c.threads}" for c in options.server_configs)),
        "--server-form": (options.server_form, base.server_form, options.server_form),
        "--server-env": (options.server_env, base.server_env, ",".join(f"{k}={v}" for k, v in options.server_env)),
    }
    for flag, (value, default, text) in listed.items():
        if value != default:
            args += [flag, text]
    if options.soak:
        args.append("--soak")
        for flag, value, default, text in (
            ("--soak-models", options.soak_models, base.soak_models, ",".join(options.soak_models)),
            ("--soak-size", options.soak_size, base.soak_size, size_name(options.soak_size)),
            ("--soak-requests", options.soak_requests, base.soak_requests, ",".join(map(str, options.soak_requests))),
            ("--soak-arena", options.soak_arena, base.soak_arena, {(False,): "off", (True,): "on"}.get(options.soak_arena, "both")),
        ):
            if value != default:
                args += [flag, text]
    return " ".join(shlex.quote(a) for a in args)


def parse_env(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _split(text):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not name.strip().replace("_", "").isalnum():
            raise BenchmarkError(f"Received --server-env item {item!r}; expected NAME=VALUE, e.g. MALLOC_ARENA_MAX=2.")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def make_options(
    models: str | None = None,
    sizes: str | None = None,
    batches: str | None = None,
    rows: str | None = None,
    precisions: str | None = None,
    threads: int = 2,
    quick: bool = False,
    work_dir: str | None = None,
    requests: int | None = None,
    seconds: float | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    server_configs: str | None = None,
    server_form: str = "dataframe_split",
    server_env: str | None = None,
    soak: bool = False,
    soak_requests: str | None = None,
    soak_models: str | None = None,
    soak_size: str | None = None,
    soak_arena: str = "both",
    rebuild: bool = False,
) -> BenchmarkOptions:
    """Options from command-line text; anything not given keeps the full (or --quick) default."""
    base = quick_options() if quick else BenchmarkOptions()
    if threads < 1:
        raise BenchmarkError(f"Received --threads {threads}; expected 1 or more (the cores to use).")
    changes: dict[str, Any] = {"threads": threads}
    if models:
        changes["models"] = tuple(_split(models))
    if sizes:
        changes["sizes"] = parse_sizes(sizes)
    if batches:
        changes["batches"] = parse_ints(batches, "--batches")
    if rows:
        changes["rows"] = parse_choices(rows, "--rows", ROW_KINDS)
    if precisions is not None:
        changes["precisions"] = parse_choices(precisions, "--precisions", VARIANT_PRECISIONS)
    if requests is not None:
        changes.update(min_requests=max(1, requests))
    if seconds is not None:
        changes.update(min_seconds=max(0.0, seconds))
    if warmup is not None:
        changes.update(warmup=max(0, warmup))
    if rounds is not None:
        changes.update(rounds=max(1, rounds))
    if server_configs:
        changes["server_configs"] = parse_server_configs(server_configs)
    if server_env:
        changes["server_env"] = parse_env(server_env)
    if server_form not in SERVER_FORMS:
        raise BenchmarkError(f"Received --server-form {server_form!r}; expected one of {list(SERVER_FORMS)}.")
    if soak_requests:
        changes["soak_requests"] = parse_ints(soak_requests, "--soak-requests")
    if soak_models:
        changes["soak_models"] = tuple(_split(soak_models))
    counts, models_ = changes.get("soak_requests", base.soak_requests), changes.get("soak_models", base.soak_models)
    if len(counts) not in (1, len(models_)):
        raise BenchmarkError(
            f"Received --soak-requests {','.join(map(str, counts))} for {len(models_)} soak models; expected one "
            "count for all of them or one per model, in the same order."
        )
    if soak_size:
        (changes["soak_size"],) = parse_sizes(soak_size, "--soak-size")[:1]
    arena = {"both": (False, True), "off": (False,), "on": (True,)}
    if soak_arena not in arena:
        raise BenchmarkError(f"Received --soak-arena {soak_arena!r}; expected one of {list(arena)}.")
    for name in ("models", "sizes", "batches", "rows"):
        if name in changes and not changes[name]:
            raise BenchmarkError(f"Received an empty --{name}; expected at least one value.")
    return replace(
        base, **changes, server_form=server_form, soak=soak, soak_arena=arena[soak_arena], rebuild=rebuild,
        work_dir=Path(work_dir).expanduser() if work_dir else base.work_dir,
    )


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class RowResult:
    """One row of the table: a pipeline on one model, image size and batch size."""

    model: str
    size: str
    batch: int
    row: str
    label: str
    status: str = "ok"  # ok, failed, not runnable
    note: str = ""
    requests: int = 0
    images: int = 0
    seconds: float = 0.0
    images_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    peak_rss_mb: float | None = None
    cores_busy: float | None = None
    vs_torch: float | None = None
    vs_onnxruntime: float | None = None
    vs_pyfunc: float | None = None
    max_prob_diff: float | None = None
    # Row (b) only: exact decode + preprocess of one image on one thread, in milliseconds.
    decode_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class LoadResult:
    """A registered model's load-to-first-prediction time in a fresh interpreter."""

    model: str
    precision: str
    model_uri: str
    status: str = "ok"
    note: str = ""
    seconds: float | None = None  # median over runs: process start to first prediction
    runs: list[float] = field(default_factory=list)
    imports_s: float | None = None
    load_s: float | None = None
    predict_s: float | None = None
    peak_rss_mb: float | None = None


@dataclass
class SoakResult:
    """A sustained run of the server: errors, throughput and the server's RSS over time."""

    model: str
    size: str
    arena: bool
    server: str
    clients: int
    status: str = "ok"
    note: str = ""
    requests: int = 0
    errors: int = 0
    images: int = 0
    seconds: float = 0.0
    images_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    warmup_requests: int = 0
    rss_start_mb: float | None = None
    rss_warm_mb: float | None = None
    rss_end_mb: float | None = None
    rss_peak_mb: float | None = None
    growth_mb: float | None = None
    growth_mb_per_1000: float | None = None
    samples: list[list[float]] = field(default_factory=list)  # [seconds, rss MB, requests done]


@dataclass
class TargetResult:
    key: str
    name: str
    threshold: str
    measured: str
    result: str  # PASS, FAIL, n/a


@dataclass
class BenchmarkReport:
    options: dict[str, Any]
    machine: dict[str, Any]
    rows: list[RowResult] = field(default_factory=list)
    loads: list[LoadResult] = field(default_factory=list)
    soaks: list[SoakResult] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str = ""  # the `mlflow-clip benchmark` arguments that reproduce the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        return render_markdown(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchmarkReport":
        """A report read back from `to_json` (to render its tables again)."""
        kinds = {"rows": RowResult, "loads": LoadResult, "soaks": SoakResult, "targets": TargetResult}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name, kind in kinds.items():
            names = {f.name for f in fields(kind)}
            values[name] = [kind(**{k: v for k, v in item.items() if k in names}) for item in data.get(name, [])]
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Images: deterministic, photo-like JPEGs (so decoding costs what real photos cost)


def make_photo_jpeg(width: int, height: int, seed: int, quality: int = JPEG_QUALITY) -> bytes:
    """A photo-like JPEG: smooth colour gradients, blurred shapes, texture and sensor noise.

    About 2 bits per pixel at quality 90, like a camera photo; the same seed gives the same bytes.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    grid = rng.integers(20, 236, (int(rng.integers(3, 7)), int(rng.integers(4, 8)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    _draw_shapes(ImageDraw.Draw(image), rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(0.8, min(width, height) / 900)))
    pixels = np.asarray(image, dtype=np.float32)
    coarse = rng.standard_normal((max(2, height // 6), max(2, width // 6)), dtype=np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))
    pixels += 10.0 * texture[:, :, None]
    pixels += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    pixels += 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _draw_shapes(draw, rng: np.random.Generator, width: int, height: int) -> None:
    scale = min(width, height)
    for _ in range(int(rng.integers(12, 30))):
        x, y = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.03, 0.4) * scale, rng.uniform(0.03, 0.4) * scale
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            points = [(x + rng.uniform(0, w), y + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=colour)


def ensure_images(work_dir: Path, size: tuple[int, int], count: int) -> list[Path]:
    """The image pool for one size, written once: `count` JPEGs, seeds 0..count-1."""
    folder = work_dir / "images" / size_name(size)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"{seed:03d}.jpg"
        if not path.exists():
            partial = path.with_suffix(".part")
            partial.write_bytes(make_photo_jpeg(size[0], size[1], seed))
            partial.replace(path)
        paths.append(path)
    return paths


def request_images(pool: Sequence[Any], batch: int, index: int) -> list[Any]:
    """The images of request `index`: the pool, cyclically, `batch` at a time (same for every row)."""
    return [pool[(index * batch + j) % len(pool)] for j in range(batch)]


# --------------------------------------------------------------------------------------------
# Memory and CPU of processes, from /proc (no psutil)


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children, tree, stack = _proc_children(), [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process tree now, in MB (sum of VmRSS)."""
    return sum(_status_kb(pid, "VmRSS") for pid in process_tree(root)) / 1024


def tree_peak_rss_mb(root: int) -> float:
    """Sum of each live process's peak RSS (VmHWM, what ru_maxrss reports for one process), in MB."""
    return sum(_status_kb(pid, "VmHWM") for pid in process_tree(root)) / 1024


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time used so far by the live processes of a tree."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_tree(root):
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(parts[11]) + int(parts[12])
    return total / ticks


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler(threading.Thread):
    """Samples a process tree's RSS every `period` seconds; `peak` since the last `reset`."""

    def __init__(self, root: int, period: float = RSS_SAMPLE_SECONDS, progress: Callable[[], int] | None = None):
        super().__init__(daemon=True)
        self.root, self.period, self.progress = root, period, progress
        self.started = time.perf_counter()
        self.latest = self.peak = tree_rss_mb(root)
        self.samples: list[list[float]] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            rss = tree_rss_mb(self.root)
            with self._lock:
                self.latest, self.peak = rss, max(self.peak, rss)
                done = self.progress() if self.progress else 0
                self.samples.append([round(time.perf_counter() - self.started, 2), round(rss, 1), done])

    def reset(self) -> None:
        with self._lock:
            self.latest = self.peak = tree_rss_mb(self.root)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------------
# Measuring: warm-up excluded, then requests until both min_requests and min_seconds are met


@dataclass
class _Timing:
    latencies: list[float]
    seconds: float
    errors: list[str]
    first: Any
    issued: int = 0


def run_requests(
    call: Callable[[int, Any], Any],
    clients: int,
    min_requests: int,
    min_seconds: float,
    max_requests: int,
    make_state: Callable[[], Any] = lambda: None,
    on_done: Callable[[int], None] | None = None,
) -> _Timing:
    """Issue requests 0, 1, 2, ... from `clients` threads; returns per-request latencies.

    Request 0's result is kept (`first`) so rows can be checked against each other.
    """
    lock = threading.Lock()
    issued, done = [0], [0]
    latencies: list[float] = []
    errors: list[str] = []
    first: list[Any] = [None]
    start = time.perf_counter()

    def next_index() -> int | None:
        with lock:
            n = issued[0]
            if n >= max_requests or (n >= min_requests and time.perf_counter() - start >= min_seconds):
                return None
            issued[0] += 1
            return n

    def client() -> None:
        state = make_state()
        while (index := next_index()) is not None:
            began = time.perf_counter()
            try:
                out = call(index, state)
            except Exception as e:  # counted and reported, the run goes on
                with lock:
                    errors.append(f"request {index}: {type(e).__name__}: {str(e)[:300]}")
                continue
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                done[0] += 1
                if index == 0:
                    first[0] = out
                finished = done[0]
            if on_done:
                on_done(finished)

    if clients == 1:
        client()
    else:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return _Timing(latencies, time.perf_counter() - start, errors, first[0], issued[0])


def _summary(timing: _Timing, batch: int) -> dict[str, Any]:
    n = len(timing.latencies)
    result: dict[str, Any] = {
        "requests": n,
        "images": n * batch,
        "seconds": timing.seconds,
        "errors": len(timing.errors),
        "error_examples": timing.errors[:3],
    }
    if n:
        latencies_ms = np.asarray(timing.latencies) * 1000.0
        result.update(
            images_per_s=n * batch / timing.seconds,
            p50_ms=float(np.percentile(latencies_ms, 50)),
            p95_ms=float(np.percentile(latencies_ms, 95)),
        )
    return result


def _cores_busy(cpu_seconds: float, wall_seconds: float) -> float | None:
    """CPU seconds per wall second; None for runs too short for the clock-tick resolution."""
    return cpu_seconds / wall_seconds if wall_seconds >= MIN_CPU_WALL_SECONDS else None


class MeasuredRow:
    """One row's measured requests, gathered over rounds: request indices continue from round
    to round, so every round sends new images of the same pool, in the same order in every row."""

    def __init__(self, call: Callable[[int, Any], Any], batch: int, clients: int = 1,
                 make_state: Callable[[], Any] = lambda: None, cpu_seconds: Callable[[], float] = _self_cpu_seconds):
        self.call, self.batch, self.clients, self.make_state, self.cpu_seconds = call, batch, clients, make_state, cpu_seconds
        self.total = _Timing([], 0.0, [], None)
        self.cpu = 0.0

    def warm_up(self, requests: int) -> None:
        """Requests that are not counted (the first requests' images)."""
        if requests:
            run_requests(self.call, self.clients, requests, 0.0, requests, self.make_state)

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> None:
        offset = self.total.issued
        cpu_before = self.cpu_seconds()
        timing = run_requests(lambda i, state: self.call(offset + i, state), self.clients, min_requests, min_seconds,
                              max_requests, self.make_state)
        self.cpu += self.cpu_seconds() - cpu_before
        if offset == 0:
            self.total.first = timing.first
        self.total.latencies += timing.latencies
        self.total.errors += timing.errors
        self.total.seconds += timing.seconds
        self.total.issued += timing.issued

    def result(self) -> dict[str, Any]:
        result = _summary(self.total, self.batch)
        result["cores_busy"] = _cores_busy(self.cpu, self.total.seconds)
        first = self.total.first
        result["probabilities"] = None if first is None else np.asarray(first, dtype=float).tolist()
        return result


class _InProcessRow:
    """A row measured inside its child process: warm-up at set-up, then rounds on command."""

    def __init__(self, call: Callable[[int, Any], Any], spec: dict[str, Any], extra: dict[str, Any] | None = None):
        self.row = MeasuredRow(call, spec["batch"])
        self.row.warm_up(spec["warmup"])
        self.extra = dict(extra or {})

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> None:
        self.row.run_round(min_requests, min_seconds, max_requests)

    def result(self) -> dict[str, Any]:
        return {**self.row.result(), **self.extra}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Child processes: every row runs in a fresh interpreter


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.pop("MLFLOW_PYFUNC_INFERENCE_CONFIG", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants (found in /proc)."""
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    members = process_tree(proc.pid)
    kill_tree(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for member in members:
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_child(task: str, spec: dict[str, Any], work_dir: Path, name: str, timeout: float) -> dict:
    """Run `task` in a fresh `python -m mlflow_clip.bench.child`; its JSON result, or a failure."""
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    spec_path, result_path, log_path = (logs / f"{stem}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow_clip.bench.child", task, str(spec_path), str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=work_dir, preexec_fn=_die_with_parent,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_tree(proc, grace=5)
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s (log: {log_path})"}
        except BaseException:  # e.g. Ctrl-C: take the row and its server down too
            _stop_tree(proc, grace=5)
            raise
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {"status": "failed", "error": f"exit code {proc.returncode}: {' | '.join(tail)[-600:]} (log: {log_path})"}


class RowProcess:
    """A row's own child process: set up once (load, warm up), then measured in rounds that the
    parent interleaves with the other rows' rounds, so a change in background load hits every
    row alike."""

    def __init__(self, task: str, spec: dict[str, Any], work_dir: Path, name: str, timeout: float):
        logs = work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        spec_path, self.result_path, self.log_path = (logs / f"{stem}.{ext}" for ext in ("spec.json", "result.json", "log"))
        spec_path.write_text(json.dumps(spec))
        self.result_path.unlink(missing_ok=True)
        self.timeout = timeout
        self.failure: dict[str, Any] | None = None
        read_fd, write_fd = os.pipe()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow_clip.bench.child", task, str(spec_path), str(self.result_path), str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=(write_fd,),
                env=_child_env(spec.get("env")), cwd=work_dir, preexec_fn=_die_with_parent,
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")

    def wait_ready(self) -> bool:
        return self._expect("ready")

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> bool:
        if self.failure:
            return False
        try:
            self.proc.stdin.write(f"round {min_requests} {min_seconds} {max_requests}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reply (end of file) tells what happened
        return self._expect("done")

    def finish(self) -> dict[str, Any]:
        if not self.failure:
            try:
                self.proc.stdin.write("finish\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=self.timeout)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                _stop_tree(self.proc, grace=5)
        self.replies.close()
        return self.failure or self._result()

    def kill(self) -> None:
        _stop_tree(self.proc, grace=5)
        self.replies.close()

    def _expect(self, word: str) -> bool:
        import select

        readable, _, _ = select.select([self.replies], [], [], self.timeout)
        line = self.replies.readline() if readable else None
        if line is not None and line.strip() == word:
            return True
        if line is None:
            _stop_tree(self.proc, grace=5)
            self.failure = {"status": "failed", "error": f"no answer within {self.timeout:.0f} s (log: {self.log_path})"}
            return False
        self.proc.wait()  # end of file: the child has finished, most likely with an error
        self.failure = self._result()
        return False

    def _result(self) -> dict[str, Any]:
        if self.result_path.exists():
            result = json.loads(self.result_path.read_text())
            if result.get("status") == "ok" or result.get("error"):
                return result
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return {"status": "failed", "error": f"exit code {self.proc.returncode}: {' | '.join(tail)[-600:]} (log: {self.log_path})"}


def _child_main(argv: Sequence[str]) -> int:
    task, spec_path, result_path, *reply_fd = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        if task in _ROW_TASKS:
            result = {"status": "ok", **_serve_rounds(_ROW_TASKS[task], spec, int(reply_fd[0]))}
        else:
            result = {"status": "ok", **_CHILD_TASKS[task](spec)}
        code = 0
    except Exception as e:
        import traceback

        traceback.print_exc()
        result, code = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}"}, 1
    result["peak_rss_mb"] = result.get("peak_rss_mb", self_peak_rss_mb())
    Path(result_path).write_text(json.dumps(result))
    return code


def _serve_rounds(setup: Callable[[dict], Any], spec: dict[str, Any], reply_fd: int) -> dict[str, Any]:
    """Child side of `RowProcess`: set up, say "ready", run each "round" asked for, "done"."""
    with os.fdopen(reply_fd, "w", buffering=1) as replies:
        runner = setup(spec)
        try:
            replies.write("ready\n")
            for line in sys.stdin:
                command, *args = line.split()
                if command != "round":
                    break
                runner.run_round(int(args[0]), float(args[1]), int(args[2]))
                replies.write("done\n")
            return runner.result()
        finally:
            runner.close()


# --------------------------------------------------------------------------------------------
# Building models (in a child: torch, clip)


def model_slug(model: str) -> str:
    """A file-name-safe name: ViT-B/32 -> ViT-B-32; a checkpoint path -> its file stem."""
    name = Path(model).stem if Path(model).is_file() else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _model_dir(work_dir: Path, model: str, precision: str) -> Path:
    return work_dir / "models" / model_slug(model) / precision


def _build_key(model: str, precision: str) -> dict[str, Any]:
    return {"model": model, "precision": precision, "templates": TEMPLATES, "classes": list(_classes_for(model)),
            "text_encoder": precision == "fp32"}


def _classes_for(model: str) -> tuple[str, ...]:
    if model == "demo":
        from mlflow_clip.demo_data import DEMO_CLASSES

        return DEMO_CLASSES
    return BENCHMARK_CLASSES


def read_build(work_dir: Path, model: str, precision: str) -> dict[str, Any] | None:
    """The cached build of `model` at `precision` if it is complete and current."""
    path = _model_dir(work_dir, model, precision) / "build.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    current = info.get("key") == _build_key(model, precision) and info.get("status") == "ok"
    return info if current and (Path(info["model_dir"]) / "MLmodel").exists() else None


def ensure_models(options: BenchmarkOptions, models: Sequence[str], precisions: Sequence[str], progress) -> dict:
    """Build each (model, precision) once into the work dir; returns {(model, precision): build info}."""
    builds: dict[tuple[str, str], dict] = {}
    for model in models:
        missing = [p for p in precisions if options.rebuild or read_build(options.work_dir, model, p) is None]
        if missing:
            progress(f"building {model} ({', '.join(missing)}) in {options.work_dir / 'models'}")
            spec = {"model": model, "precisions": missing, "work_dir": str(options.work_dir)}
            result = run_child("build", spec, options.work_dir, f"build-{model_slug(model)}", options.child_timeout)
            for precision in missing:
                info = result.get("builds", {}).get(precision) or {"status": "failed", "note": result.get("error", "")}
                builds[(model, precision)] = info
        for precision in precisions:
            builds.setdefault((model, precision), read_build(options.work_dir, model, precision) or {})
    return builds


def _task_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: export the model at each precision, save it, register it, keep the torch head."""
    from mlflow_clip.export.checkpoints import ARCHITECTURES, save_random_checkpoint

    work_dir, model = Path(spec["work_dir"]), spec["model"]
    clip_spec = model
    if model in ARCHITECTURES:
        checkpoint = work_dir / "checkpoints" / f"{model_slug(model)}.pt"
        if not checkpoint.exists():
            save_random_checkpoint(model, checkpoint.with_suffix(".part"))
            checkpoint.with_suffix(".part").replace(checkpoint)
        clip_spec = str(checkpoint)
    return {"builds": {p: _build_one(work_dir, model, clip_spec, p) for p in spec["precisions"]}}


def _build_one(work_dir: Path, model: str, clip_spec: str, precision: str) -> dict[str, Any]:
    import shutil

    from mlflow_clip import flavor
    from mlflow_clip.export.graph import DEFAULT_OPSET
    from mlflow_clip.export.job import build_classifier

    out = _model_dir(work_dir, model, precision)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Only the fp32 model ships the text encoder: it feeds the per-request labels row.
    kwargs = {"text_encoder": True} if precision == "fp32" else {"precision": precision, "text_encoder": False}
    try:
        built = build_classifier(_classes_for(model), clip_spec, TEMPLATES, DEFAULT_OPSET, out / "export", **kwargs)
    except TypeError as e:
        return {"status": "skipped", "note": f"build_classifier does not build precision={precision!r} yet ({e})"}
    except Exception as e:
        return {"status": "failed", "note": f"{type(e).__name__}: {str(e)[:400]}"}
    flavor.save_model(built.onnx_path, out / "model", text_encoder=built.text_encoder_path)
    np.savez(out / "head.npz", text_features=built.head.text_features.t().numpy(), logit_scale=float(built.head.logit_scale))
    info = {
        "status": "ok",
        "key": _build_key(model, precision),
        "model_dir": str(out / "model"),
        "head": str(out / "head.npz"),
        "clip_spec": clip_spec,
        "export_seconds": built.export_seconds,
        "onnx_mb": (out / "model" / "model.onnx").stat().st_size / 1e6,
        "model_uri": _register(work_dir, built.onnx_path, f"benchmark-{model_slug(model)}-{precision}"),
    }
    shutil.rmtree(out / "export", ignore_errors=True)
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def registry_uri(work_dir: Path) -> str:
    return f"sqlite:///{work_dir / 'registry' / 'mlflow.db'}"


def _register(work_dir: Path, onnx_path: Path, name: str) -> str:
    import mlflow

    import mlflow_clip

    (work_dir / "registry").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(registry_uri(work_dir))
    mlflow.set_registry_uri(registry_uri(work_dir))
    experiment = mlflow.get_experiment_by_name("benchmark")
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        "benchmark", artifact_location=(work_dir / "registry" / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow_clip.log_model(onnx_path, name="model", registered_model_name=name)
    return f"models:/{name}/{info.registered_model_version}"


# --------------------------------------------------------------------------------------------
# Row tasks (each in a child)


def _read_pool(spec: dict[str, Any]) -> list[bytes]:
    return [Path(p).read_bytes() for p in spec["images"]]


def _task_torch(spec: dict[str, Any]) -> _InProcessRow:
    """Row (a): CLIP's preprocess (PIL decode), the PyTorch model and the same baked head."""
    import torch
    from PIL import Image

    from mlflow_clip.export.checkpoints import load_clip
    from mlflow_clip.export.graph import ZeroShotHead

    torch.set_num_threads(spec["threads"])
    loaded = load_clip(spec["clip_spec"])
    head_data = np.load(spec["head"])
    head = ZeroShotHead(loaded.model.visual, torch.from_numpy(head_data["text_features"]), float(head_data["logit_scale"]))
    head = head.eval()
    pool = _read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [loaded.preprocess(Image.open(io.BytesIO(data))) for data in request_images(pool, spec["batch"], index)]
        with torch.inference_mode():
            return head(torch.stack(images)).numpy()

    return _InProcessRow(call, spec)


def _task_onnxruntime(spec: dict[str, Any]) -> _InProcessRow:
    """Row (b): the graph alone on float32 tensors preprocessed beforehand, same session settings."""
    from mlflow_clip.serving.contract import ClassifierConfig
    from mlflow_clip.serving.images import decode_image
    from mlflow_clip.serving.preprocess import Preprocessor
    from mlflow_clip.serving.runtime import OrtSession, RuntimeSettings

    model_dir = Path(spec["model_dir"])
    settings = RuntimeSettings.from_dict(_flavor_conf(model_dir).get("runtime")).with_overrides(spec["model_config"])
    session = OrtSession(model_dir / "model.onnx", settings)
    config = ClassifierConfig.read(model_dir)
    preprocessor = Preprocessor(config.input_resolution, tuple(config.mean), tuple(config.std))
    encoded = _read_pool(spec)
    began = time.perf_counter()
    tensors = [preprocessor(decode_image(data)) for data in encoded]
    decode_ms = (time.perf_counter() - began) * 1000.0 / len(encoded)  # the work row (c) adds
    probabilities = session.output_names[:1]  # what the pyfunc asks for
    batches: dict[int, np.ndarray] = {}

    def call(index: int, _state: Any) -> np.ndarray:
        offset = (index * spec["batch"]) % len(tensors)
        if offset not in batches:
            batches[offset] = np.ascontiguousarray(np.stack(request_images(tensors, spec["batch"], index)))
        return session.run(batches[offset], probabilities)[0]

    for index in range(len(tensors)):  # every distinct batch is built before timing
        call(index, None)
    return _InProcessRow(call, spec, {"decode_ms": decode_ms})


def _task_pyfunc(spec: dict[str, Any]) -> _InProcessRow:
    """Rows (c), (e) and draft: the pyfunc end to end from encoded bytes."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(spec["model_dir"], model_config=spec["model_config"])
    pool = _read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        frame = pd.DataFrame({"image": request_images(pool, spec["batch"], index)})
        return np.stack(model.predict(frame, params=spec.get("params"))["probabilities"].to_numpy())

    return _InProcessRow(call, spec)


def _flavor_conf(model_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(model_dir) / "MLmodel").read_text())["flavors"]["mlflow_clip"]


def pyfunc_config_keys(model_dir: str | Path) -> set[str]:
    """The keys a model accepts as `model_config` at load time (MLflow ignores any others)."""
    import yaml

    mlmodel = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return set((mlmodel["flavors"].get("python_function", {}).get("config") or {}))


# --------------------------------------------------------------------------------------------
# The scoring server


class ScoringServer:
    """`mlflow models serve --env-manager local`, stopped with all its processes."""

    def __init__(self, model_dir: str, workers: int, model_config: dict[str, Any], log_path: Path,
                 env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = _child_env({
            "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(model_config),
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(SERVER_REQUEST_TIMEOUT_SECONDS),
            **(env or {}),
        })
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(self.port), "--workers", str(workers)],
                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = SERVER_START_SECONDS) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not answer /ping within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])[-600:]

    def stop(self) -> None:
        _stop_tree(self.proc)


def _free_port() -> int:
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


def _server_call(url: str, bodies: Callable[[int], tuple[bytes, int]]) -> Callable[[int, Any], np.ndarray]:
    def call(index: int, session: Any) -> np.ndarray:
        body, batch = bodies(index)
        response = session.post(url + "/invocations", data=body, headers=JSON_HEADERS, timeout=SERVER_REQUEST_TIMEOUT_SECONDS)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        predictions = response.json()["predictions"]
        if len(predictions) != batch:
            raise RuntimeError(f"{len(predictions)} predictions for {batch} images")
        return np.asarray([p["probabilities"] for p in predictions], dtype=float)

    return call


def _new_session():
    import requests

    return requests.Session()


class _ServerRows:
    """Row (d): one server, measured with each number of concurrent clients in turn, every round."""

    def __init__(self, spec: dict[str, Any]):
        b64 = [base64.b64encode(data).decode("ascii") for data in _read_pool(spec)]
        batch = spec["batch"]
        self.bodies = {}
        for index in range(len(b64)):  # every distinct body is built before timing
            self.bodies.setdefault((index * batch) % len(b64), request_body(request_images(b64, batch, index), spec["form"]))
        self.server = ScoringServer(spec["model_dir"], spec["workers"], spec["model_config"], Path(spec["log"]), spec.get("env"))
        try:
            self.server.wait_ready()
        except BaseException:
            self.server.stop()
            raise
        pid = self.server.proc.pid
        call = _server_call(self.server.url, lambda index: (self.bodies[(index * batch) % len(b64)], batch))
        self.rows = {c: MeasuredRow(call, batch, c, _new_session, lambda: tree_cpu_seconds(pid)) for c in spec["clients"]}
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
        return {"clients": {
            str(c): {**row.result(), "peak_rss_mb": peak, "sampled_peak_rss_mb": self.sampled[c]}
            for c, row in self.rows.items()
        }}

    def close(self) -> None:
        self.sampler.stop()
        self.server.stop()


def _task_soak(spec: dict[str, Any]) -> dict[str, Any]:
    """Soak: `requests` requests of random batch sizes 1..max_batch from several clients."""
    b64 = [base64.b64encode(data).decode("ascii") for data in _read_pool(spec)]
    sizes = np.random.default_rng(spec.get("seed", 0)).integers(1, spec["max_batch"] + 1, spec["requests"])

    def bodies(index: int) -> tuple[bytes, int]:
        rows = [b64[(index * 7 + j) % len(b64)] for j in range(int(sizes[index]))]
        return request_body(rows, spec["form"]), len(rows)

    server = ScoringServer(spec["model_dir"], spec["workers"], spec["model_config"], Path(spec["log"]), spec.get("env"))
    try:
        server.wait_ready()
        return _soak(server, bodies, sizes, spec)
    finally:
        server.stop()


def _soak(server: ScoringServer, bodies, sizes: np.ndarray, spec: dict) -> dict[str, Any]:
    """Warm-up requests, then the rest; the server's RSS is read idle after each phase (so the
    two figures compare like with like) and sampled throughout."""
    pid, clients = server.proc.pid, spec["clients"]
    warm_n = min(len(sizes), max(clients, len(sizes) // 10))
    done = [0]
    sampler = RssSampler(pid, period=0.25, progress=lambda: done[0])
    rss_start = sampler.latest
    sampler.start()
    call = _server_call(server.url, bodies)

    def on_done(finished: int) -> None:
        done[0] = finished

    warm = run_requests(call, clients, warm_n, 0.0, warm_n, _new_session, on_done)
    rss_warm = _idle_rss_mb(pid)
    rest = run_requests(lambda i, state: call(warm_n + i, state), clients, len(sizes) - warm_n, 0.0,
                        len(sizes) - warm_n, _new_session, lambda finished: on_done(warm_n + finished))
    rss_end = _idle_rss_mb(pid)
    sampler.stop()
    timing = _Timing(warm.latencies + rest.latencies, warm.seconds + rest.seconds, warm.errors + rest.errors, None,
                     warm.issued + rest.issued)
    result = _summary(timing, 1)
    result["images"] = int(sizes.sum())
    result["images_per_s"] = int(sizes.sum()) / timing.seconds
    return {
        **result,
        "warmup_requests": warm_n,
        "rss_start_mb": rss_start,
        "rss_warm_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_peak_mb": max([s[1] for s in sampler.samples] + [rss_warm, rss_end]),
        "growth_mb": rss_end - rss_warm,
        "growth_mb_per_1000": _growth_per_1000(sampler.samples, warm_n),
        "samples": sampler.samples,
    }


def _idle_rss_mb(pid: int, settle: float = 1.0) -> float:
    time.sleep(settle)
    return tree_rss_mb(pid)


def _growth_per_1000(samples: list[list[float]], after: int) -> float | None:
    """Least-squares slope of RSS against requests done, after the warm-up, in MB per 1000."""
    points = [(s[2], s[1]) for s in samples if s[2] > after]
    if len(points) < 3 or points[-1][0] == points[0][0]:
        return None
    done, rss = zip(*points)
    return float(np.polyfit(done, rss, 1)[0]) * 1000


# One-shot tasks: run, write the result, exit.
_CHILD_TASKS: dict[str, Callable[[dict], dict]] = {"build": _task_build, "soak": _task_soak}
# Row tasks: set up and warm up, answer "ready", then run measured rounds until told to finish.
_ROW_TASKS: dict[str, Callable[[dict], Any]] = {
    "torch": _task_torch,
    "onnxruntime": _task_onnxruntime,
    "pyfunc": _task_pyfunc,
    "server": _ServerRows,
}

# A registered model from scratch in a fresh interpreter, as a user would: the clock starts
# before the interpreter does (the parent's time.time()), so imports count.
_LOAD_SCRIPT = """
import json, resource, sys, time
began = time.time()
import mlflow, pandas as pd
imported = time.time()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.time()
model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}))
predicted = time.time()
json.dump({"began": began, "imported": imported, "loaded": loaded, "predicted": predicted,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(sys.argv[3], "w"))
"""


# --------------------------------------------------------------------------------------------
# The run


def _progress(message: str) -> None:
    print(f"{_PROGRESS_PREFIX} {message}", file=sys.stderr, flush=True)


ROW_LABELS = {
    "torch": "(a) torch",
    "onnxruntime": "(b) onnxruntime",
    "pyfunc": "(c) pyfunc fp32",
    "pyfunc-draft": "pyfunc fp32 jpeg_draft",
    "onnxruntime-spin": "(b) onnxruntime, spinning on",
    "pyfunc-1shard": "pyfunc fp32, 1 shard",
    "pyfunc-spin": "pyfunc fp32, spinning on",
    "pyfunc-pillow": "pyfunc fp32, Pillow resampling",
    "pyfunc-labels": "(c) pyfunc fp32, labels per request (cached)",
    "pyfunc-int8": "(e) pyfunc int8",
    "pyfunc-int8-draft": "(e) pyfunc int8 jpeg_draft",
    "pyfunc-fp16": "(e) pyfunc fp16",
}


def server_row(clients: int, config: ServerSettings, several: bool) -> tuple[str, str]:
    suffix = f"-{config.key}" if several else ""
    label = f"(d) server {clients} client{'s' if clients > 1 else ''}" + (f" {config.key}" if several else "")
    return f"server-{clients}c{suffix}", label


def run_benchmark(options: BenchmarkOptions, progress: Callable[[str], None] = _progress) -> BenchmarkReport:
    """Measure every requested row; see the module docstring."""
    started = time.perf_counter()
    options.work_dir.mkdir(parents=True, exist_ok=True)
    report = BenchmarkReport(options=options.to_dict(), machine=machine_info(), command=command_line(options))
    precisions = ["fp32", *(options.precisions if "precision" in options.rows else ())]
    builds = ensure_models(options, options.models, precisions, progress)
    soak_only = [m for m in options.soak_models if m not in options.models] if options.soak else []
    if soak_only:
        builds.update(ensure_models(options, soak_only, ["fp32"], progress))
    _note_builds(report, builds)
    pools = {size: ensure_images(options.work_dir, size, options.pool_size) for size in options.sizes}
    state = _RunState(builds=builds)
    for model in options.models:
        for size in options.sizes:
            for batch in options.batches:
                report.rows += _run_group(options, model, size, batch, pools[size], state, progress)
    compare_rows(report.rows, state.probabilities)
    if "load" in options.rows:
        report.loads = _run_loads(options, builds, pools[options.sizes[0]][0], progress)
    if options.soak:
        report.soaks = _run_soaks(options, builds, progress)
    report.targets = evaluate_targets(report)
    report.machine["loadavg_end"] = _loadavg()
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _RunState:
    builds: dict[tuple[str, str], dict]
    # Request 0's probabilities per row (kept out of the report: they only feed max_prob_diff).
    probabilities: dict[tuple[str, str, int, str], Any] = field(default_factory=dict)
    # (model, precision) that failed to load: not retried for every size and batch
    unrunnable: dict[tuple[str, str], str] = field(default_factory=dict)


def _note_builds(report: BenchmarkReport, builds: dict) -> None:
    for (model, precision), info in builds.items():
        if info.get("status") != "ok":
            report.notes.append(f"{model} {precision}: not built, {info.get('status', 'failed')}: {info.get('note') or info.get('error', '')}")
    drafts = [m for (m, p), info in builds.items() if p == "fp32" and info.get("status") == "ok"
              and "jpeg_draft" not in pyfunc_config_keys(info["model_dir"])]
    if drafts:
        report.notes.append("draft rows skipped: the model offers no `jpeg_draft` option (" + ", ".join(drafts) + ")")


def _row_plan(options: BenchmarkOptions, model: str, builds: dict) -> list[tuple[str, str, str, dict]]:
    """(row id, label, task, spec extras) for the in-process rows of one model."""
    fp32 = builds.get((model, "fp32"), {})
    if fp32.get("status") != "ok":
        return []
    threads = {"intra_op_num_threads": options.threads}
    has_draft = "jpeg_draft" in pyfunc_config_keys(fp32["model_dir"])
    exact = {**threads, **({"jpeg_draft": False} if has_draft else {})}
    plan = []
    if "torch" in options.rows:
        plan.append(("torch", ROW_LABELS["torch"], "torch", {"clip_spec": fp32["clip_spec"], "head": fp32["head"]}))
    if "onnxruntime" in options.rows:
        plan.append(("onnxruntime", ROW_LABELS["onnxruntime"], "onnxruntime", {"model_dir": fp32["model_dir"], "model_config": threads}))
    if "pyfunc" in options.rows:
        plan.append(("pyfunc", ROW_LABELS["pyfunc"], "pyfunc", {"model_dir": fp32["model_dir"], "model_config": exact}))
    if "labels" in options.rows and (Path(fp32["model_dir"]) / "text_encoder.onnx").exists():
        # The same classes and templates as the baked graph, sent per request: after the first
        # (warm-up) request the label set is cached, so this is the per-request labels path's cost.
        params = {"classes": list(_classes_for(model)), "templates": TEMPLATES}
        plan.append(("pyfunc-labels", ROW_LABELS["pyfunc-labels"], "pyfunc",
                     {"model_dir": fp32["model_dir"], "model_config": exact, "params": params}))
    if "draft" in options.rows and has_draft:
        plan.append(("pyfunc-draft", ROW_LABELS["pyfunc-draft"], "pyfunc",
                     {"model_dir": fp32["model_dir"], "model_config": {**threads, "jpeg_draft": True}}))
    keys = pyfunc_config_keys(fp32["model_dir"])
    if "settings" in options.rows and {"shards", "allow_spinning"} <= keys:
        plan += [
            ("onnxruntime-spin", ROW_LABELS["onnxruntime-spin"], "onnxruntime",
             {"model_dir": fp32["model_dir"], "model_config": {**threads, "allow_spinning": True}}),
            ("pyfunc-1shard", ROW_LABELS["pyfunc-1shard"], "pyfunc",
             {"model_dir": fp32["model_dir"], "model_config": {**exact, "shards": 1}}),
            ("pyfunc-spin", ROW_LABELS["pyfunc-spin"], "pyfunc",
             {"model_dir": fp32["model_dir"], "model_config": {**exact, "allow_spinning": True}}),
        ]
    if "settings" in options.rows and native_status().available:  # the same pixels, by Pillow
        plan.append(("pyfunc-pillow", ROW_LABELS["pyfunc-pillow"], "pyfunc",
                     {"model_dir": fp32["model_dir"], "model_config": exact, "env": {resample.ENV_VAR: "0"}}))
    if "precision" in options.rows:
        for precision in options.precisions:
            info = builds.get((model, precision), {})
            if info.get("status") == "ok":
                plan.append((f"pyfunc-{precision}", ROW_LABELS[f"pyfunc-{precision}"], "pyfunc",
                             {"model_dir": info["model_dir"], "model_config": exact, "precision": precision}))
                if "draft" in options.rows and precision == "int8" and "jpeg_draft" in pyfunc_config_keys(info["model_dir"]):
                    plan.append(("pyfunc-int8-draft", ROW_LABELS["pyfunc-int8-draft"], "pyfunc",
                                 {"model_dir": info["model_dir"], "model_config": {**threads, "jpeg_draft": True},
                                  "precision": precision}))
    return plan


def _timing_spec(options: BenchmarkOptions, batch: int, pool: Sequence[Path]) -> dict[str, Any]:
    return {
        "batch": batch, "threads": options.threads, "warmup": options.warmup, "min_requests": options.min_requests,
        "min_seconds": options.min_seconds, "max_requests": options.max_requests, "images": [str(p) for p in pool],
    }


@dataclass
class _Planned:
    """A child process to start for one group, and the rows its result fills."""

    task: str
    name: str
    spec: dict[str, Any]
    rows: list[tuple[RowResult, str]]  # (row, key of its result: "" or the client count)
    precision: str = "fp32"


def _run_group(options, model, size, batch, pool, state: _RunState, progress) -> list[RowResult]:
    """All rows of one model, size and batch: each row's process is set up in turn, then the
    measured rounds alternate between rows."""
    planned, rows = _plan_group(options, model, size, batch, pool, state)
    where = f"{model} {size_name(size)} batch {batch}"
    running: list[tuple[_Planned, RowProcess]] = []
    try:
        for item in planned:
            process = RowProcess(item.task, item.spec, options.work_dir, item.name, options.child_timeout)
            process.wait_ready()
            running.append((item, process))
        per_round = _round_budget(options)
        for number in range(options.rounds):
            progress(f"{where}: round {number + 1} of {options.rounds}")
            for item, process in running:
                process.run_round(*per_round)
        for item, process in running:
            _fill_planned(item, process.finish(), state)
    except BaseException:
        for _, process in running:
            process.kill()
        raise
    for row in rows:
        progress(f"{where} {row.label}: {describe_row(row)}")
    return rows


def _round_budget(options: BenchmarkOptions) -> tuple[int, float, int]:
    rounds = max(1, options.rounds)
    return -(-options.min_requests // rounds), options.min_seconds / rounds, max(1, options.max_requests // rounds)


def _plan_group(options, model, size, batch, pool, state: _RunState) -> tuple[list[_Planned], list[RowResult]]:
    planned, rows = [], []
    prefix = f"{model_slug(model)}-{size_name(size)}-b{batch}"
    for row_id, label, task, extra in _row_plan(options, model, state.builds):
        row = RowResult(model, size_name(size), batch, row_id, label)
        rows.append(row)
        precision = extra.pop("precision", "fp32")
        if (model, precision) in state.unrunnable:
            row.status, row.note = "not runnable", state.unrunnable[(model, precision)]
            continue
        spec = {**_timing_spec(options, batch, pool), **extra}
        planned.append(_Planned(task, f"{prefix}-{row_id}", spec, [(row, "")], precision))
    fp32 = state.builds.get((model, "fp32"), {})
    if "server" not in options.rows or fp32.get("status") != "ok":
        return planned, rows
    several = len(options.server_configs) > 1
    for config in options.server_configs:
        name = f"{prefix}-server-{config.key}"
        spec = {
            **_timing_spec(options, batch, pool), "model_dir": fp32["model_dir"], "workers": config.workers,
            "model_config": {"intra_op_num_threads": config.threads}, "clients": list(options.clients),
            "form": options.server_form, "log": str(options.work_dir / "logs" / f"{name}.server.log"),
            "env": dict(options.server_env),
        }
        server_rows = [(RowResult(model, size_name(size), batch, *server_row(c, config, several)), str(c)) for c in options.clients]
        rows += [row for row, _ in server_rows]
        planned.append(_Planned("server", name, spec, server_rows))
    return planned, rows


def _fill_planned(item: _Planned, result: dict[str, Any], state: _RunState) -> None:
    for row, key in item.rows:
        per_client = result.get("clients", {}).get(key) if key else None
        _fill_row(row, {"status": "ok", **per_client} if per_client else result, state, item.precision)
        if row.status == "not runnable":
            state.unrunnable[(row.model, item.precision)] = row.note


def _fill_row(row: RowResult, result: dict[str, Any], state: _RunState, precision: str = "fp32") -> None:
    if result.get("status") != "ok":
        error = result.get("error", "failed")
        row.status, row.note = ("not runnable", f"not runnable on this machine: {error}") if precision == "fp16" else ("failed", error)
        return
    for name in ("requests", "images", "seconds", "images_per_s", "p50_ms", "p95_ms", "peak_rss_mb", "cores_busy", "decode_ms"):
        setattr(row, name, result.get(name))
    if result.get("errors"):
        row.status = "not runnable" if precision == "fp16" else "failed"
        row.note = f"{result['errors']} failed requests, e.g. {result['error_examples'][0]}"
    elif precision == "fp16":
        row.note = FP16_NOTE
    state.probabilities[(row.model, row.size, row.batch, row.row)] = result.get("probabilities")


def describe_row(row: RowResult) -> str:
    if not row.ok:
        return f"{row.status}: {row.note}"
    return (f"{row.images_per_s:.2f} images/s, p50 {row.p50_ms:.0f} ms, p95 {row.p95_ms:.0f} ms, "
            f"peak RSS {row.peak_rss_mb:.0f} MB ({row.requests} requests)")


def compare_rows(rows: list[RowResult], probabilities: dict | None = None) -> None:
    """Fill the ratio columns (throughput / the reference row's, same model, size and batch)
    and the largest probability difference from row (a) on request 0."""
    probabilities = probabilities or {}
    groups: dict[tuple[str, str, int], dict[str, RowResult]] = {}
    for row in rows:
        groups.setdefault((row.model, row.size, row.batch), {})[row.row] = row
    for key, group in groups.items():
        references = {name: group.get(name) for name in ("torch", "onnxruntime", "pyfunc")}
        reference_p = probabilities.get((*key, "torch"))
        for row in group.values():
            if not row.ok or not row.images_per_s:
                continue
            for name, reference in references.items():
                ratio = row.images_per_s / reference.images_per_s if reference and reference.ok and reference.images_per_s else None
                setattr(row, f"vs_{name}", ratio)
            own_p = probabilities.get((*key, row.row))
            if reference_p is not None and own_p is not None and row.row != "torch":
                row.max_prob_diff = float(np.abs(np.asarray(own_p) - np.asarray(reference_p)).max())


def _run_loads(options: BenchmarkOptions, builds: dict, image: Path, progress) -> list[LoadResult]:
    results = []
    for model in options.models:
        for precision in ["fp32", *(options.precisions if "precision" in options.rows else ())]:
            info = builds.get((model, precision), {})
            if info.get("status") != "ok":
                continue
            result = measure_load(options, info["model_uri"], image, model, precision)
            results.append(result)
            progress(f"{model} {precision} load to first prediction: "
                     + (f"{result.seconds:.2f} s" if result.status == "ok" else f"{result.status}: {result.note}"))
    return results


def measure_load(options: BenchmarkOptions, model_uri: str, image: Path, model: str, precision: str) -> LoadResult:
    """Process start to first prediction for a registered model, in fresh interpreters."""
    result = LoadResult(model, precision, model_uri)
    env = _child_env({"MLFLOW_TRACKING_URI": registry_uri(options.work_dir), "MLFLOW_REGISTRY_URI": registry_uri(options.work_dir)})
    out = options.work_dir / "logs" / f"load-{model_slug(model)}-{precision}.json"
    parts = []
    for _ in range(max(1, options.load_repeats)):
        out.unlink(missing_ok=True)
        spawned = time.time()
        proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, model_uri, str(image), str(out)], env=env,
                              cwd=options.work_dir, capture_output=True, text=True, timeout=options.child_timeout)
        if proc.returncode != 0 or not out.exists():
            result.status = "not runnable" if precision == "fp16" else "failed"
            result.note = " | ".join(proc.stderr.strip().splitlines()[-2:])[-600:]
            return result
        times = json.loads(out.read_text())
        result.runs.append(times["predicted"] - spawned)
        parts.append(times)
    result.seconds = statistics.median(result.runs)
    middle = parts[result.runs.index(sorted(result.runs)[len(result.runs) // 2])]
    result.imports_s = middle["imported"] - middle["began"]
    result.load_s = middle["loaded"] - middle["imported"]
    result.predict_s = middle["predicted"] - middle["loaded"]
    result.peak_rss_mb = max(p["peak_rss_mb"] for p in parts)
    return result


def _run_soaks(options: BenchmarkOptions, builds: dict, progress) -> list[SoakResult]:
    pool = ensure_images(options.work_dir, options.soak_size, options.pool_size)
    counts = options.soak_requests * len(options.soak_models) if len(options.soak_requests) == 1 else options.soak_requests
    return [
        _run_soak(options, builds.get((model, "fp32"), {}), model, requests, arena, pool, progress)
        for model, requests in zip(options.soak_models, counts)
        for arena in options.soak_arena
    ]


def _run_soak(options: BenchmarkOptions, info: dict, model: str, requests: int, arena: bool, pool, progress) -> SoakResult:
    config = options.server_configs[0]
    result = SoakResult(model, size_name(options.soak_size), arena, config.key, options.soak_clients)
    if info.get("status") != "ok":
        result.status, result.note = "failed", f"{model} was not built: {info.get('note') or info.get('error', '')}"
        return result
    setting = f"arena {'on' if arena else 'off'}"
    progress(f"soak {model}: {requests} requests, {options.soak_clients} clients, {setting}")
    name = f"soak-{model_slug(model)}-{result.size}-arena-{'on' if arena else 'off'}"
    spec = {
        "model_dir": info["model_dir"], "workers": config.workers, "clients": options.soak_clients,
        "requests": requests, "max_batch": options.soak_max_batch, "form": options.server_form,
        "images": [str(p) for p in pool], "log": str(options.work_dir / "logs" / f"{name}.server.log"),
        "model_config": {"intra_op_num_threads": config.threads, "enable_cpu_mem_arena": arena},
        "env": dict(options.server_env),
    }
    _fill_soak(result, run_child("soak", spec, options.work_dir, name, options.child_timeout))
    progress(f"soak {model} {setting}: {describe_soak(result)}")
    return result


def _fill_soak(result: SoakResult, data: dict[str, Any]) -> None:
    if data.get("status") != "ok":
        result.status, result.note = "failed", data.get("error", "failed")
        return
    names = {f.name for f in fields(SoakResult)} - {"model", "size", "arena", "server", "clients", "status", "note"}
    for name in names:
        if name in data:
            setattr(result, name, data[name])
    if data.get("errors"):
        result.status = "failed"
        result.note = f"{data['errors']} failed requests, e.g. {data['error_examples'][0]}"


def describe_soak(soak: SoakResult) -> str:
    if soak.status != "ok":
        return f"{soak.status}: {soak.note}"
    growth = "n/a" if soak.growth_mb is None else f"{soak.growth_mb:+.1f} MB"
    return (f"{soak.requests} requests, {soak.errors} errors, {soak.images_per_s:.1f} images/s, RSS "
            f"{_num(soak.rss_warm_mb, 0)} MB after warm-up -> {soak.rss_end_mb:.0f} MB at the end ({growth})")


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("mlflow", "onnxruntime", "torch", "pillow", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "resampling": native_status().describe(),
        "loadavg_start": _loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Targets (RN50, 1920x1080, batch 8)


def evaluate_targets(report: BenchmarkReport) -> list[TargetResult]:
    """The issue's targets on the exact (default) path; `jpeg_draft` figures and the
    decode-bound ceiling are shown next to them, never counted for them."""
    group = {r.row: r for r in report.rows if (r.model, r.size, r.batch) == (TARGET_MODEL, TARGET_SIZE, TARGET_BATCH)}
    server_4 = [r for r in group.values() if r.row.startswith("server-4c")]
    best_server = max((r for r in server_4 if r.ok), key=lambda r: r.vs_pyfunc or 0, default=None)
    # The ceiling for the graph is the faster of the raw onnxruntime rows (with and without
    # thread spinning, when both ran): the pyfunc's own session settings are not assumed best.
    graph = max((r for r in (group.get("onnxruntime"), group.get("onnxruntime-spin")) if r is not None and r.ok),
                key=lambda r: r.images_per_s or 0, default=None)
    ceiling = decode_bound(graph, int(report.options.get("threads") or 0))
    torch_ceiling = None
    if ceiling is not None and _ratio(graph, "vs_torch") is not None:
        torch_ceiling = ceiling * graph.vs_torch
    pyfunc_vs_graph = _relative(group.get("pyfunc"), graph)
    checks = [
        ("pyfunc_fp32_vs_torch", "pyfunc fp32 vs (a) torch", 2.0, _ratio(group.get("pyfunc"), "vs_torch"),
         _extras(_ratio(group.get("pyfunc-draft"), "vs_torch"), torch_ceiling)),
        ("pyfunc_int8_vs_torch", "pyfunc int8 vs (a) torch", 3.5, _ratio(group.get("pyfunc-int8"), "vs_torch"),
         _extras(_ratio(group.get("pyfunc-int8-draft"), "vs_torch"), None)),
        ("pyfunc_fp32_vs_onnxruntime", "pyfunc fp32 vs (b) onnxruntime (the faster (b) row)", 0.85, pyfunc_vs_graph,
         _extras(_relative(group.get("pyfunc-draft"), graph), ceiling)),
        ("server_4_clients_vs_pyfunc", "server 4 clients vs in-process pyfunc", 0.8, _ratio(best_server, "vs_pyfunc"), ""),
        # Cached per-request labels cost at most 5% more than the baked classes.
        ("labels_per_request_vs_pyfunc", "pyfunc labels per request vs baked", 1 / 1.05,
         _ratio(group.get("pyfunc-labels"), "vs_pyfunc"), ""),
    ]
    where = f"{TARGET_MODEL}, {TARGET_SIZE}, batch {TARGET_BATCH}"
    targets = [
        TargetResult(key, f"{name} ({where})", f">= {threshold:.2f}x",
                     "not measured" if value is None else f"{value:.2f}x{extra}",
                     "n/a" if value is None else ("PASS" if value >= threshold else "FAIL"))
        for key, name, threshold, value, extra in checks
    ]
    load = next((l for l in report.loads if (l.model, l.precision) == (TARGET_MODEL, "fp32") and l.status == "ok"), None)
    seconds = load_seconds(load)
    targets.append(TargetResult(
        "load_to_first_prediction", f"load to first prediction ({TARGET_MODEL} fp32, registered; after `import mlflow`)",
        f"<= {LOAD_TARGET_SECONDS:.1f} s",
        "not measured" if seconds is None else
        f"{seconds:.2f} s (from process start {load.seconds:.2f} s, of which interpreter and imports {load.seconds - seconds:.2f} s)",
        "n/a" if seconds is None else ("PASS" if seconds <= LOAD_TARGET_SECONDS else "FAIL"),
    ))
    return targets


def load_seconds(load: LoadResult | None) -> float | None:
    """`mlflow.pyfunc.load_model(models:/...)` to the first prediction: the registry lookup, the
    artifact download, the session and one predict. Starting the interpreter and `import
    mlflow` (1.5 to 2 s here, the same for every MLflow model) are reported beside it."""
    if load is None or load.load_s is None or load.predict_s is None:
        return None
    return load.load_s + load.predict_s


def decode_bound(onnxruntime_row: RowResult | None, threads: int) -> float | None:
    """The highest (c) / (b) ratio the exact decode allows on `threads` cores.

    Row (b) spends cores_busy / images_per_s core-seconds per image; the pyfunc must also decode
    and preprocess each image (decode_ms, on one core), on the same cores:
    (c) <= threads / (cores_busy / (b) + decode), so (c) / (b) <= threads / (cores_busy + decode x (b)).
    """
    row = onnxruntime_row
    if row is None or not row.ok or not threads or None in (row.decode_ms, row.cores_busy, row.images_per_s):
        return None
    return min(1.0, threads / (row.cores_busy + row.decode_ms / 1000.0 * row.images_per_s))


def _relative(row: RowResult | None, reference: RowResult | None) -> float | None:
    if row is None or reference is None or not row.ok or not reference.ok or not row.images_per_s or not reference.images_per_s:
        return None
    return row.images_per_s / reference.images_per_s


def _extras(draft: float | None, ceiling: float | None) -> str:
    parts = []
    if ceiling is not None:
        parts.append(f"decode-bound ceiling {ceiling:.2f}x")
    if draft is not None:
        parts.append(f"with jpeg_draft {draft:.2f}x")
    return f" ({'; '.join(parts)})" if parts else ""


def _ratio(row: RowResult | None, name: str) -> float | None:
    return getattr(row, name) if row is not None and row.ok else None


# --------------------------------------------------------------------------------------------
# Output: markdown, JSON, docs, MLflow


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def rows_table(rows: Sequence[RowResult]) -> str:
    lines = [
        "| model | image | batch | row | requests | images/s | p50 ms | p95 ms | peak RSS MB | cores busy "
        "| × (a) torch | × (b) onnxruntime | × (c) pyfunc | max abs Δp vs (a) | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r.ok
        lines.append(
            f"| {r.model} | {r.size} | {r.batch} | {r.label} | {r.requests if ok else '—'} | "
            f"{_num(r.images_per_s, 2) if ok else '—'} | {_num(r.p50_ms, 0) if ok else '—'} | "
            f"{_num(r.p95_ms, 0) if ok else '—'} | {_num(r.peak_rss_mb, 0) if ok else '—'} | "
            f"{_num(r.cores_busy, 2) if ok else '—'} | {_num(r.vs_torch, 2, 'x')} | {_num(r.vs_onnxruntime, 2, 'x')} | "
            f"{_num(r.vs_pyfunc, 2, 'x')} | {'—' if r.max_prob_diff is None else f'{r.max_prob_diff:.1e}'} | "
            f"{'' if ok else r.status + ': '}{_cell(r.note)} |"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def targets_table(targets: Sequence[TargetResult]) -> str:
    lines = ["| target | threshold | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.threshold} | {t.measured} | **{t.result}** |" for t in targets]
    return "\n".join(lines)


def loads_table(loads: Sequence[LoadResult]) -> str:
    lines = [
        "| model | precision | load to first prediction s (median) | runs | imports s | load s | predict s | peak RSS MB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for l in loads:
        lines.append(
            f"| {l.model} | {l.precision} | {_num(l.seconds, 2)} | {len(l.runs)} | {_num(l.imports_s, 2)} | "
            f"{_num(l.load_s, 2)} | {_num(l.predict_s, 2)} | {_num(l.peak_rss_mb, 0)} | "
            f"{'' if l.status == 'ok' else l.status + ': '}{_cell(l.note)} |"
        )
    return "\n".join(lines)


def _trend(soak: SoakResult) -> float | None:
    """The RSS trend, shown only when enough requests follow the warm-up to carry one."""
    return soak.growth_mb_per_1000 if soak.requests - soak.warmup_requests >= MIN_TREND_REQUESTS else None


def soaks_table(soaks: Sequence[SoakResult]) -> str:
    lines = [
        "| model | image | CPU arena | clients | requests | errors | images/s | p50 ms | p95 ms | RSS idle at start MB "
        "| RSS idle after warm-up MB | RSS idle at end MB | growth MB | trend MB per 1000 requests | peak MB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in soaks:
        lines.append(
            f"| {s.model} | {s.size} | {'on' if s.arena else 'off'} | {s.clients} | {s.requests} | {s.errors} | "
            f"{_num(s.images_per_s, 1)} | {_num(s.p50_ms, 0)} | {_num(s.p95_ms, 0)} | {_num(s.rss_start_mb, 0)} | "
            f"{_num(s.rss_warm_mb, 0)} | {_num(s.rss_end_mb, 0)} | {_num(s.growth_mb, 1)} | "
            f"{_num(_trend(s), 1)} | {_num(s.rss_peak_mb, 0)} | "
            f"{'' if s.status == 'ok' else s.status + ': '}{_cell(s.note)} |"
        )
    return "\n".join(lines)


def render_markdown(report: BenchmarkReport) -> str:
    """The run's tables: rows, targets, load time, soak, notes."""
    options, machine = report.options, report.machine
    parts = [
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores; threads {options['threads']}; "
        f"load average {_num(machine.get('loadavg_start'), 2)} at the start, {_num(machine.get('loadavg_end'), 2)} at the end; "
        f"onnxruntime {machine['versions'].get('onnxruntime')}, torch {machine['versions'].get('torch')}, "
        f"mlflow {machine['versions'].get('mlflow')}; run took {report.seconds / 60:.1f} min."
        + (f" Resize and crop: {machine['resampling']}." if machine.get("resampling") else ""),
        f"Server: {', '.join(options['server_configs'])} (w = uvicorn workers, t = onnxruntime threads per worker), "
        f"`{options['server_form']}` requests{_env_text(options.get('server_env'))}. Warm-up: {options['warmup']} requests per row, excluded; then at "
        f"least {options['min_requests']} requests and {options['min_seconds']:g} s per row, in {options['rounds']} "
        "rounds that alternate between the rows of a group; a request is one batch.",
    ]
    if report.rows:
        parts += ["### Throughput and latency", rows_table(report.rows)]
    parts += [f"### Targets ({TARGET_MODEL}, {TARGET_SIZE}, batch {TARGET_BATCH}, {options['threads']} threads)",
              targets_table(report.targets)]
    decode = [r for r in report.rows if r.row == "onnxruntime" and r.ok and r.decode_ms is not None]
    if decode:
        parts.append(
            "The targets count the default, exact path only. Exact decode and preprocess of one image on one "
            "thread (timed while row (b) prepares its tensors): "
            + ", ".join(f"{r.model} {r.size} {r.decode_ms:.1f} ms" for r in decode)
            + ". The decode-bound ceiling is the highest (c) / (b) ratio that work allows on the same cores, "
            "threads / ((b)'s cores busy + decode seconds x (b)'s images/s), times (b) / (a) against row (a)."
        )
    if report.loads:
        parts += ["### Load to first prediction (registered model, fresh interpreter)", loads_table(report.loads)]
    if report.soaks:
        parts += ["### Memory under load (soak)", soaks_table(report.soaks), soak_verdict(report.soaks)]
    if report.notes:
        parts += ["### Notes", "\n".join(f"- {_cell(n)}" for n in report.notes)]
    return "\n\n".join(parts) + "\n"


def _env_text(pairs) -> str:
    return ", environment " + ", ".join(f"`{k}={v}`" for k, v in pairs) if pairs else ""


def soak_verdict(soaks: Sequence[SoakResult]) -> str:
    """Per soak model: which arena setting the numbers support."""
    lines = []
    for model in dict.fromkeys(s.model for s in soaks):
        by_arena = {s.arena: s for s in soaks if s.model == model and s.status == "ok"}
        if len(by_arena) < 2:
            continue
        off, on = by_arena[False], by_arena[True]
        lower = "off" if off.rss_end_mb <= on.rss_end_mb else "on"
        lines.append(
            f"- {model}: arena off {off.rss_end_mb:.0f} MB idle at the end ({off.growth_mb:+.1f} MB since the warm-up), "
            f"{off.images_per_s:.1f} images/s; arena on {on.rss_end_mb:.0f} MB ({on.growth_mb:+.1f} MB), "
            f"{on.images_per_s:.1f} images/s: the smaller footprint is with the arena {lower}."
        )
    if not lines:
        return "Run both arena settings (`--soak-arena both`) to compare them."
    return "\n".join(lines) + (
        "\n\nThe soaks run one after the other, so a throughput difference between them also contains any "
        "change in the machine's background load; the memory figures are the server's own."
    )


DOCS_INTRO = """# Benchmark: CLIP's PyTorch pipeline, onnxruntime, the pyfunc and the server

Generated by `python examples/benchmark.py {args}--write-docs docs/benchmark.md`
(the same as `mlflow-clip benchmark ...`); do not edit by hand.

Every row runs in a fresh process on the same photo-like JPEGs (smooth gradients, shapes,
texture and sensor noise, quality 90, about 2 bits per pixel: decoding costs what real photos
cost) with the same number of threads, starting from the encoded bytes unless it says otherwise:

| row | what runs |
|---|---|
| (a) torch | CLIP's own `preprocess` (PIL decode, torchvision resize and crop) + the PyTorch model + the same zero-shot head that was exported, `torch.set_num_threads(threads)`, `torch.inference_mode()` |
| (b) onnxruntime | the exported graph alone on float32 tensors preprocessed beforehand, the pyfunc's session settings: the ceiling for the graph |
| (c) pyfunc fp32 | `mlflow.pyfunc.load_model(dir).predict(DataFrame({{"image": [bytes, ...]}}))`, `intra_op_num_threads=threads` |
| (c) labels per request | (c) with the model's own classes and templates sent as request `params` (`classes`, `templates`): scored through the model's text encoder, the label set cached after the first (warm-up) request |
| (d) server | `mlflow models serve --env-manager local` over HTTP, JSON `dataframe_split` bodies of base64 images, 1 and 4 concurrent clients (client threads run on the same machine) |
| (e) pyfunc int8 / fp16 | (c) on the quantized / half-precision export |
| jpeg_draft | (c) with the model's `jpeg_draft` decode option, when the model offers it |
| settings (`--rows settings`) | (b) with onnxruntime's thread spinning on, and (c) with one shard per request, with spinning on, or with Pillow doing the resampling (`MLFLOW_CLIP_NATIVE_RESAMPLE=0`, the same pixels): each of the pyfunc's defaults switched back alone |

A request is one batch; latency is per request; images/s counts images. Ratios divide a row's
images/s by the reference row's, for the same model, image size and batch. "max abs Δp vs (a)"
compares the class probabilities of the first request with row (a)'s. Peak RSS is the row's own
process (`ru_maxrss`; for (a) it includes torch and CLIP's text tower, which CLIP users load
too); for the server it is the sum of the peak RSS (`VmHWM` in `/proc`) of every process of the
serving tree (the `mlflow models serve` launcher and the uvicorn workers). "cores busy" is CPU
seconds per wall second (the server tree's for (d)).
Full-size architectures have random weights (speed does not depend on the weights); the demo
model is the embedded 64-pixel one.

"""

DOCS_SETTINGS = """
## Server settings

```bash
MLFLOW_PYFUNC_INFERENCE_CONFIG='{"intra_op_num_threads": 1}' \\
  mlflow models serve -m models:/clip-zero-shot@production --env-manager local --workers 1 -p 5001
```

The server rows use this setting (`w1t1`) unless `--server-configs` says otherwise; rerun with
`--server-configs 1x1,1x2,2x1` (uvicorn workers x onnxruntime threads per worker) to compare
on your machine, the rows then carry the setting in their label.

- **One worker.** `mlflow models serve` runs each prediction in a thread pool
  (`asyncio.to_thread`), so one worker already serves concurrent requests from one copy of the
  model. Every extra uvicorn worker loads its own copy: on RN50, `2x1` held about 0.8 GB more
  than `1x1`. In four runs on a busy 2-core machine (RN50, 1920x1080, batch 8) the two were
  level: the faster of them changed from run to run, by up to 20%.
- **One onnxruntime thread per request.** With 4 clients, 4 predictions run at once and keep
  the cores busy without intra-op threads; `1x2` was never the fastest setting with 4 clients
  in those runs, and with 1 client it was level with `1x1` (decoding already runs on its own
  threads). On an otherwise idle machine that serves one request at a time, giving each request
  all the cores (`intra_op_num_threads` = cores) can lower latency: measure with
  `--server-configs`.
- **Settings reach the model through `MLFLOW_PYFUNC_INFERENCE_CONFIG`**: any key the model's
  MLmodel lists under `python_function.config` (`intra_op_num_threads`, `enable_cpu_mem_arena`,
  `jpeg_draft`, `decode_workers`, `shards`, `allow_spinning`, `max_rows`, ...).
- **Shards, spinning and the native resize** (`--rows settings` switches each back alone). The
  pyfunc splits a request into one shard per onnxruntime thread, each decoding its images and
  then running the graph, and turns off onnxruntime's busy-waiting. With Pillow resizing, both
  helped on a quiet machine (RN50, 1080p, batch 8: 4 to 7% each); with the native resize,
  decoding is cheaper and sharding went either way between runs (-9% to +17%), while spinning on
  lowered the pyfunc in three runs of four. Raw onnxruntime was faster with spinning on in those
  runs, so the target divides by the faster of the two raw onnxruntime rows. The pyfunc with
  Pillow resizing (the same pixels) was 5% to 18% slower than with the native pass.
- **onnxruntime's CPU memory arena stays off** (the model's default). The soak sends batches of
  1 to 32 images from 4 clients: with the arena on, the server keeps the largest buffers of every
  shape it has seen, and on RN50 its idle RSS climbed through the whole run; with it off, memory
  goes back after each request, and throughput was no lower. On the 64-pixel demo model the arena's
  buffers are too small to matter. `--soak-arena both` measures both; `--soak-models RN50,demo
  --soak-requests 120,2000` soaks each model.
- The server's RSS counts the `mlflow models serve` launcher (it stays resident, about 250 MB)
  as well as the uvicorn worker that holds the model.
- The soak's RSS trend (least squares over the run, MB per 1000 requests) is shown for soaks with
  at least 500 requests after the warm-up.

## Reproduce

```bash
python examples/benchmark.py --quick                                   # demo model, in about a minute
python examples/benchmark.py --models RN50 --sizes 1920x1080 --batches 8   # the targets: about 15 minutes
python examples/benchmark.py --models RN50 --sizes 1920x1080 --batches 8 \\
    --soak --soak-models RN50,demo --soak-requests 120,2000           # + memory under load: about 50 minutes
python examples/benchmark.py                                           # the full sweep: about 2 hours on 2 cores
```

Models, images and checkpoints are cached in `--work-dir` (default `~/.cache/mlflow-clip/benchmark`);
`--rebuild` exports again. `--json run.json` saves every figure; `--from-json run.json
--write-docs docs/benchmark.md` writes this page again from a saved run without measuring.
`--mlflow` logs the tables, as metrics and as `benchmark.md` and `benchmark.json` artifacts, to
an MLflow run.
"""


def render_docs(report: BenchmarkReport) -> str:
    """The docs page: what each row is, the run's tables, and how to reproduce them."""
    args = report.command + " " if report.command else ""
    return DOCS_INTRO.format(args=args) + "## Results\n\n" + render_markdown(report) + DOCS_SETTINGS


def write_docs(report: BenchmarkReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_docs(report), encoding="utf-8")
    return path


def metric_key(*parts: Any) -> str:
    return ".".join(model_slug(str(p)) if i == 0 else str(p) for i, p in enumerate(parts))


def report_metrics(report: BenchmarkReport) -> dict[str, float]:
    """Flat MLflow metrics: `<model>.<size>.b<batch>.<row>.<figure>` and the load/soak figures."""
    metrics: dict[str, float] = {}
    for r in report.rows:
        if r.ok:
            for name in ("images_per_s", "p50_ms", "p95_ms", "peak_rss_mb", "vs_torch", "vs_onnxruntime", "vs_pyfunc"):
                if getattr(r, name) is not None:
                    metrics[metric_key(r.model, r.size, f"b{r.batch}", r.row, name)] = float(getattr(r, name))
    for l in report.loads:
        if l.status == "ok":
            metrics[metric_key(l.model, l.precision, "load_to_first_prediction_s")] = float(l.seconds)
    for s in report.soaks:
        for name in ("images_per_s", "rss_warm_mb", "rss_end_mb", "growth_mb", "errors"):
            if getattr(s, name) is not None:
                metrics[metric_key(s.model, s.size, f"soak_arena_{'on' if s.arena else 'off'}", name)] = float(getattr(s, name))
    return metrics


def log_report(report: BenchmarkReport, run_name: str = "benchmark") -> str:
    """Log the report to a new MLflow run (current tracking URI); returns the run id."""
    import mlflow

    with mlflow.start_run(run_name=run_name) as run:
        params = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in report.options.items()}
        params.update({"cpu": report.machine["cpu"], "cpu_count": str(report.machine["cpu_count"])})
        mlflow.log_params({k: v[:6000] for k, v in params.items()})
        mlflow.log_metrics(report_metrics(report))
        for target in report.targets:
            mlflow.set_tag(f"target.{target.key}", f"{target.result} ({target.measured})")
        mlflow.log_text(report.to_markdown(), "benchmark.md")
        mlflow.log_dict(report.to_dict(), "benchmark.json")
    return run.info.run_id


def load_report(path: str | os.PathLike) -> BenchmarkReport:
    """A report saved with `--json`; its targets are evaluated again from its rows."""
    report = BenchmarkReport.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    report.targets = evaluate_targets(report)
    return report


def run_from_cli(options: BenchmarkOptions, json_path: str | None, docs_path: str | None, log_to_mlflow: bool,
                 echo: Callable[[str], None] = print, from_json: str | None = None) -> BenchmarkReport:
    """What `mlflow-clip benchmark` does: run (or read a saved run), print the tables, then
    write/log what was asked."""
    report = load_report(from_json) if from_json else run_benchmark(options)
    echo(report.to_markdown())
    if json_path:
        Path(json_path).write_text(report.to_json(), encoding="utf-8")
        echo(f"wrote {json_path}")
    if docs_path:
        echo(f"wrote {write_docs(report, docs_path)}")
    if log_to_mlflow:
        echo(f"logged to MLflow run {log_report(report)}")
    return report

