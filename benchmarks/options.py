"""What a benchmark run measures: `BenchmarkOptions`, parsed from the command line's text.

Every parsing error is a `BenchmarkError` whose message names the option, the value and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from mlflow_clip.errors import MlflowClipError

ROW_KINDS: tuple[str, ...] = (
    "torch",
    "torch-strong",
    "onnxruntime",
    "pyfunc",
    "labels",
    "server",
    "precision",
    "draft",
    "load",
    "settings",
    "mlserver",
    "peers",
)
# Rows run only when asked for: `settings` (the pyfunc's session and sharding defaults switched
# back one at a time), `mlserver` (MLServer, which needs an environment of its own) and `peers`
# (open_clip and Hugging Face transformers on the same weights, optional dependencies).
ASKED_FOR_ROWS: tuple[str, ...] = ("settings", "mlserver", "peers")
DEFAULT_ROWS: tuple[str, ...] = tuple(kind for kind in ROW_KINDS if kind not in ASKED_FOR_ROWS)
DEFAULT_MODELS: tuple[str, ...] = ("RN50", "ViT-B/32", "demo")
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1920, 1080), (4000, 3000))
DEFAULT_BATCHES: tuple[int, ...] = (1, 8, 32)
VARIANT_PRECISIONS: tuple[str, ...] = ("int8", "fp16")
# bf16 runs on OpenVINO; on CPUs without AVX512_BF16 or AMX it is emulated, and slow: asked for.
PRECISION_CHOICES: tuple[str, ...] = (*VARIANT_PRECISIONS, "bf16")
SERVER_FORMS: tuple[str, ...] = ("dataframe_split", "inputs")
# The MLServer rows' runtimes: the project's own (`mlflow_clip.mlserver.ClipRuntime`, batching
# per parameter set) and MLServer's MLflow runtime (`mlserver_mlflow.MLflowRuntime`).
MLSERVER_RUNTIMES: tuple[str, ...] = ("clip", "mlflow")
DEFAULT_WORK_DIR = Path.home() / ".cache" / "mlflow-clip" / "benchmark"


class BenchmarkError(MlflowClipError, ValueError):
    """Bad benchmark options; the message names the option, the value and the fix."""


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
    # One uvicorn worker, one onnxruntime thread per request: the docs page's "Server settings"
    # says why; --server-configs compares others.
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
    # The hostile-traffic soak (on the first soak model, at the soak's image size and clients)
    hostile: bool = False
    hostile_requests: int = 300  # good requests alone, then as many beside the hostile ones
    hostile_clients: int = 2
    hostile_flood: int = 1000  # requests carrying 10 MB label sets, after the hostile phase
    # The MLServer rows (`--rows mlserver`): each runtime, measured with each of these numbers of
    # concurrent clients (and row (d) with the same clients beside them), adaptive batching on
    # and off, and MLServer's inference worker processes (0: inference in the server's own
    # process, which was faster and half the memory on 2 cores)
    mlserver_runtimes: tuple[str, ...] = MLSERVER_RUNTIMES
    mlserver_clients: tuple[int, ...] = (4, 16)
    mlserver_batching: tuple[bool, ...] = (True, False)
    mlserver_max_batch_size: int = 16
    mlserver_max_batch_time: float = 0.01
    mlserver_parallel_workers: int = 0
    work_dir: Path = DEFAULT_WORK_DIR
    rebuild: bool = False
    # The strongest torch row tries torch.compile (inductor) and keeps it where it is faster;
    # off, it runs eager (compiling RN50 takes minutes on 2 cores).
    torch_compile: bool = True
    quick: bool = False
    child_timeout: float = 4 * 3600.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["work_dir"] = str(self.work_dir)
        data["sizes"] = [size_name(s) for s in self.sizes]
        data["soak_size"] = size_name(self.soak_size)
        data["server_configs"] = [c.key for c in self.server_configs]
        return data


# Under a minute on 2 cores, the demo model's build included: the rows that compare the
# pipelines (torch, onnxruntime, the pyfunc with baked and per-request labels, the server) at
# one batch size. The other rows (precision builds, draft, load, soak, hostile) when asked for.
QUICK_ROWS: tuple[str, ...] = ("torch", "onnxruntime", "pyfunc", "labels", "server")
QUICK = dict(
    models=("demo",),
    sizes=((320, 240),),
    batches=(4,),
    rows=QUICK_ROWS,
    warmup=1,
    min_requests=3,
    min_seconds=0.0,
    rounds=2,
    pool_size=4,
    load_repeats=1,
    soak_requests=(100,),
    soak_size=(320, 240),
    hostile_requests=30,
    hostile_flood=20,
    quick=True,
)


def quick_options(**overrides: Any) -> BenchmarkOptions:
    """The tiny configuration (demo model, 320x240, batch 4, the pipeline rows, a few requests)."""
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


def command_line(options: BenchmarkOptions) -> str:
    """The `python -m benchmarks` arguments that select `options` (defaults left out)."""
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
        "--server-configs": (
            options.server_configs,
            base.server_configs,
            ",".join(f"{c.workers}x{c.threads}" for c in options.server_configs),
        ),
        "--server-form": (options.server_form, base.server_form, options.server_form),
        "--server-env": (options.server_env, base.server_env, ",".join(f"{k}={v}" for k, v in options.server_env)),
        "--mlserver-runtimes": (options.mlserver_runtimes, base.mlserver_runtimes, ",".join(options.mlserver_runtimes)),
        "--mlserver-clients": (
            options.mlserver_clients,
            base.mlserver_clients,
            ",".join(map(str, options.mlserver_clients)),
        ),
    }
    for flag, (value, default, text) in listed.items():
        if value != default:
            args += [flag, text]
    if not options.torch_compile:
        args.append("--no-torch-compile")
    if options.soak:
        args.append("--soak")
        for flag, value, default, text in (
            ("--soak-models", options.soak_models, base.soak_models, ",".join(options.soak_models)),
            ("--soak-size", options.soak_size, base.soak_size, size_name(options.soak_size)),
            ("--soak-requests", options.soak_requests, base.soak_requests, ",".join(map(str, options.soak_requests))),
            (
                "--soak-arena",
                options.soak_arena,
                base.soak_arena,
                {(False,): "off", (True,): "on"}.get(options.soak_arena, "both"),
            ),
        ):
            if value != default:
                args += [flag, text]
    if options.hostile:
        args.append("--hostile")
        for flag, value, default in (
            ("--hostile-requests", options.hostile_requests, base.hostile_requests),
            ("--hostile-flood", options.hostile_flood, base.hostile_flood),
        ):
            if value != default:
                args += [flag, str(value)]
    return " ".join(shlex.quote(a) for a in args)


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
    mlserver_runtimes: str | None = None,
    mlserver_clients: str | None = None,
    soak: bool = False,
    soak_requests: str | None = None,
    soak_models: str | None = None,
    soak_size: str | None = None,
    soak_arena: str = "both",
    rebuild: bool = False,
    hostile: bool = False,
    hostile_requests: int | None = None,
    hostile_flood: int | None = None,
    torch_compile: bool = True,
) -> BenchmarkOptions:
    """Options from command-line text; anything not given keeps the full (or --quick) default.

    Checked in the order of the arguments; the first bad one raises `BenchmarkError`."""
    base = quick_options() if quick else BenchmarkOptions()
    if threads < 1:
        raise BenchmarkError(f"Received --threads {threads}; expected 1 or more (the cores to use).")
    changes: dict[str, Any] = {"threads": threads}
    changes.update(_grid_changes(models, sizes, batches, rows, precisions))
    changes.update(_timing_changes(requests, seconds, warmup, rounds))
    changes.update(_server_changes(server_configs, server_form, server_env))
    if mlserver_runtimes is not None:
        changes["mlserver_runtimes"] = parse_choices(mlserver_runtimes, "--mlserver-runtimes", MLSERVER_RUNTIMES)
    if mlserver_clients is not None:
        changes["mlserver_clients"] = parse_ints(mlserver_clients, "--mlserver-clients")
    changes.update(_soak_changes(base, soak_requests, soak_models, soak_size))
    arena = _soak_arena(soak_arena)
    if hostile_requests is not None:
        changes["hostile_requests"] = max(1, hostile_requests)
    if hostile_flood is not None:
        changes["hostile_flood"] = max(0, hostile_flood)
    for name in ("models", "sizes", "batches", "rows", "mlserver_runtimes", "mlserver_clients"):
        if name in changes and not changes[name]:
            raise BenchmarkError(f"Received an empty --{name.replace('_', '-')}; expected at least one value.")
    return replace(
        base,
        **changes,
        server_form=server_form,
        soak=soak,
        soak_arena=arena,
        hostile=hostile,
        rebuild=rebuild,
        torch_compile=torch_compile,
        work_dir=Path(work_dir).expanduser() if work_dir else base.work_dir,
    )


def _grid_changes(
    models: str | None, sizes: str | None, batches: str | None, rows: str | None, precisions: str | None
) -> dict[str, Any]:
    """What is measured: models, image sizes, batch sizes, rows and precisions."""
    changes: dict[str, Any] = {}
    if models:
        changes["models"] = tuple(_split(models))
    if sizes:
        changes["sizes"] = parse_sizes(sizes)
    if batches:
        changes["batches"] = parse_ints(batches, "--batches")
    if rows:
        changes["rows"] = parse_choices(rows, "--rows", ROW_KINDS)
    if precisions is not None:
        changes["precisions"] = parse_choices(precisions, "--precisions", PRECISION_CHOICES)
    return changes


def _timing_changes(
    requests: int | None, seconds: float | None, warmup: int | None, rounds: int | None
) -> dict[str, Any]:
    """How long each row is measured; out-of-range values are clamped, not refused."""
    changes: dict[str, Any] = {}
    if requests is not None:
        changes.update(min_requests=max(1, requests))
    if seconds is not None:
        changes.update(min_seconds=max(0.0, seconds))
    if warmup is not None:
        changes.update(warmup=max(0, warmup))
    if rounds is not None:
        changes.update(rounds=max(1, rounds))
    return changes


def _server_changes(server_configs: str | None, server_form: str, server_env: str | None) -> dict[str, Any]:
    """The server rows' settings (`server_form` is checked here, set by the caller)."""
    changes: dict[str, Any] = {}
    if server_configs:
        changes["server_configs"] = parse_server_configs(server_configs)
    if server_env:
        changes["server_env"] = parse_env(server_env)
    if server_form not in SERVER_FORMS:
        raise BenchmarkError(f"Received --server-form {server_form!r}; expected one of {list(SERVER_FORMS)}.")
    return changes


def _soak_changes(
    base: BenchmarkOptions, soak_requests: str | None, soak_models: str | None, soak_size: str | None
) -> dict[str, Any]:
    """The soak's models, request counts (one for all models or one each) and image size."""
    changes: dict[str, Any] = {}
    if soak_requests:
        changes["soak_requests"] = parse_ints(soak_requests, "--soak-requests")
    if soak_models:
        changes["soak_models"] = tuple(_split(soak_models))
    counts, models = changes.get("soak_requests", base.soak_requests), changes.get("soak_models", base.soak_models)
    if len(counts) not in (1, len(models)):
        raise BenchmarkError(
            f"Received --soak-requests {','.join(map(str, counts))} for {len(models)} soak models; expected one "
            "count for all of them or one per model, in the same order."
        )
    if soak_size:
        (changes["soak_size"],) = parse_sizes(soak_size, "--soak-size")[:1]
    return changes


def _soak_arena(soak_arena: str) -> tuple[bool, ...]:
    """--soak-arena both/off/on: the CPU memory arena settings the soak runs with."""
    arena = {"both": (False, True), "off": (False,), "on": (True,)}
    if soak_arena not in arena:
        raise BenchmarkError(f"Received --soak-arena {soak_arena!r}; expected one of {list(arena)}.")
    return arena[soak_arena]
