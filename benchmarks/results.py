"""What a run found: one dataclass per table row, and the report that holds them (to and from JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Rounds shorter than this are recorded, but too short (CPU time counts in 10 ms ticks) to say
# how busy the machine was: they set neither `others_cores` nor `cpu_share`.
MIN_LOAD_ROUND_SECONDS = 1.0
# The ratio columns: `vs_<name>` divides a row's images/s by this row's (same model, size, batch).
REFERENCE_ROWS = {"torch": "torch", "torch_strong": "torch-strong", "onnxruntime": "onnxruntime", "pyfunc": "pyfunc"}


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
    vs_torch_strong: float | None = None  # against (a+), the strongest torch
    vs_onnxruntime: float | None = None
    vs_pyfunc: float | None = None
    max_prob_diff: float | None = None
    # Row (b) only: exact decode + preprocess of one image on one thread, in milliseconds.
    decode_ms: float | None = None
    # Row (b) of a model that decodes JPEGs in draft mode by default: that decode, likewise.
    draft_decode_ms: float | None = None
    # The machine while the row's measured rounds ran (`RoundLoad`, one per round): the row's own
    # CPU seconds (its process tree), other processes' cores, the load average after each round.
    cpu_seconds: float | None = None
    others_cores: float | None = None  # the most cores other processes kept busy in one round
    cpu_share: float | None = None  # the row's CPU seconds / the machine's busy CPU seconds
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RoundLoad:
    """One measured round of one row's process, and what else the machine did meanwhile."""

    wall_s: float
    cpu_s: float  # the row's process tree
    machine_s: float | None  # every process: /proc/stat's busy time over all CPUs
    loadavg: float | None  # 1-minute load average after the round (it counts the row itself too)

    @property
    def others_cores(self) -> float | None:
        """Cores other processes kept busy, on average, during the round."""
        if self.machine_s is None or self.wall_s <= 0:
            return None
        return max(0.0, self.machine_s - self.cpu_s) / self.wall_s


def note_rounds(row: RowResult, rounds: list[RoundLoad]) -> None:
    """Fill a row's machine-load fields from its measured rounds (the load from those of at
    least `MIN_LOAD_ROUND_SECONDS`)."""
    row.rounds = [{**asdict(r), "others_cores": r.others_cores} for r in rounds]
    row.cpu_seconds = sum(r.cpu_s for r in rounds)
    long = [r for r in rounds if r.wall_s >= MIN_LOAD_ROUND_SECONDS and r.others_cores is not None]
    row.others_cores = max((r.others_cores for r in long), default=None)
    own, machine = sum(r.cpu_s for r in long), sum(r.machine_s for r in long)
    row.cpu_share = min(1.0, own / machine) if own > 0 and machine > 0 else None


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
class HostileResult:
    """Good requests alone and beside hostile ones; what the hostile ones got; the server's RSS."""

    model: str
    size: str
    server: str
    clients: int
    hostile_clients: int
    status: str = "ok"
    note: str = ""
    good_requests: int = 0
    good_errors: int = 0
    alone_p50_ms: float | None = None
    alone_p95_ms: float | None = None
    beside_p50_ms: float | None = None
    beside_p95_ms: float | None = None
    p95_ratio: float | None = None
    hostile_sent: int = 0
    hostile_refused: int = 0
    hostile_max_ms: float | None = None
    flood_requests: int = 0
    flood_refused: int = 0
    flood_seconds: float | None = None
    rss_start_mb: float | None = None
    rss_after_alone_mb: float | None = None
    rss_after_hostile_mb: float | None = None
    rss_end_mb: float | None = None
    rss_peak_mb: float | None = None


@dataclass
class TargetResult:
    """One target's verdict: PASS, FAIL, or n/a when its rows were not measured."""

    key: str
    name: str
    threshold: str
    measured: str
    result: str  # PASS, FAIL, n/a


@dataclass
class BenchmarkReport:
    """A whole run: options, machine, every table's results, and the arguments that reproduce it."""

    options: dict[str, Any]
    machine: dict[str, Any]
    rows: list[RowResult] = field(default_factory=list)
    loads: list[LoadResult] = field(default_factory=list)
    soaks: list[SoakResult] = field(default_factory=list)
    hostile: list[HostileResult] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str = ""  # the `python -m benchmarks` arguments that reproduce the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchmarkReport":
        """A report read back from `to_json` (to render its tables again)."""
        kinds = {
            "rows": RowResult,
            "loads": LoadResult,
            "soaks": SoakResult,
            "hostile": HostileResult,
            "targets": TargetResult,
        }
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name, kind in kinds.items():
            names = {f.name for f in fields(kind)}
            values[name] = [kind(**{k: v for k, v in item.items() if k in names}) for item in data.get(name, [])]
        return cls(**values)


def format_number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A figure for a table or a progress line; "—" for one that was not measured."""
    return "—" if value is None else f"{value:.{digits}f}{suffix}"
