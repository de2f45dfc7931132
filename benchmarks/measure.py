"""Measuring: memory and CPU of process trees from /proc (no psutil), requests timed from
client threads (warm-up excluded, then until both a request count and a duration are met),
and the machine a run is on."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlflow_clip.serving.preprocess import native_status

RSS_SAMPLE_SECONDS = 0.1
MIN_CPU_WALL_SECONDS = 1.0


# --------------------------------------------------------------------------------------------
# Processes, from /proc


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


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: /proc/self/stat's starttime, which exec
    resets, against /proc/uptime; 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def self_peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, which exec resets. (getrusage's ru_maxrss survives exec
    on Linux, so a child started from a large parent would report the parent's size.)"""
    peak_kb = _status_kb(os.getpid(), "VmHWM")
    return (peak_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


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
# Requests


@dataclass
class Timing:
    """Requests' latencies (seconds), wall time, errors, request 0's result and requests issued."""

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
) -> Timing:
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
    return Timing(latencies, time.perf_counter() - start, errors, first[0], issued[0])


def summarize(timing: Timing, batch: int) -> dict[str, Any]:
    """Counts, images/s and p50/p95 latency (ms) of timed requests of `batch` images each."""
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

    def __init__(
        self,
        call: Callable[[int, Any], Any],
        batch: int,
        clients: int = 1,
        make_state: Callable[[], Any] = lambda: None,
        cpu_seconds: Callable[[], float] = _self_cpu_seconds,
    ):
        self.call, self.batch, self.clients, self.make_state, self.cpu_seconds = (
            call,
            batch,
            clients,
            make_state,
            cpu_seconds,
        )
        self.total = Timing([], 0.0, [], None)
        self.cpu = 0.0

    def warm_up(self, requests: int) -> None:
        """Requests that are not counted (the first requests' images)."""
        if requests:
            run_requests(self.call, self.clients, requests, 0.0, requests, self.make_state)

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> None:
        offset = self.total.issued
        cpu_before = self.cpu_seconds()
        timing = run_requests(
            lambda i, state: self.call(offset + i, state),
            self.clients,
            min_requests,
            min_seconds,
            max_requests,
            self.make_state,
        )
        self.cpu += self.cpu_seconds() - cpu_before
        if offset == 0:
            self.total.first = timing.first
        self.total.latencies += timing.latencies
        self.total.errors += timing.errors
        self.total.seconds += timing.seconds
        self.total.issued += timing.issued

    def result(self) -> dict[str, Any]:
        result = summarize(self.total, self.batch)
        result["cores_busy"] = _cores_busy(self.cpu, self.total.seconds)
        first = self.total.first
        result["probabilities"] = None if first is None else np.asarray(first, dtype=float).tolist()
        return result


class InProcessRow:
    """A row measured inside its child process: warm-up at set-up, then rounds on command.

    `per_round`, when given, measures figures of its own after each round's requests (outside
    their timing and CPU seconds); the result gives each one's median over the rounds, so that
    one moment of contention does not decide it."""

    def __init__(
        self,
        call: Callable[[int, Any], Any],
        spec: dict[str, Any],
        extra: dict[str, Any] | None = None,
        per_round: Callable[[], dict[str, float]] | None = None,
    ):
        self.row = MeasuredRow(call, spec["batch"])
        self.extra = dict(extra or {})
        self.per_round = per_round
        self.rounds: list[dict[str, float]] = []
        warmup = spec["warmup"]
        if spec.get("time_first") and warmup:  # from process start (imports, load) to the first answer
            self.row.warm_up(1)
            self.extra["first_prediction_s"] = seconds_since_process_start()
            warmup -= 1
        self.row.warm_up(warmup)

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> None:
        self.row.run_round(min_requests, min_seconds, max_requests)
        if self.per_round is not None:
            self.rounds.append(self.per_round())

    def result(self) -> dict[str, Any]:
        medians = {key: float(np.median([r[key] for r in self.rounds])) for key in (self.rounds or [{}])[0]}
        return {**self.row.result(), **self.extra, **medians}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict[str, Any]:
    """The CPU, versions and resize in use, and the load average at the start."""
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
        "resampling": _without_directories(native_status().describe()),
        "cpu_bf16": cpu_has_native_bf16(),
        "cpu_flags": cpu_speed_flags(),
        "loadavg_start": loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _without_directories(text: str) -> str:
    """`text` with each absolute path cut to its file name: a report names no build directory."""
    import re

    return re.sub(r"(?<![\w.])/(?:[^/\s;:,)]+/)+([^/\s;:,)]+)", r"\1", text)


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU has bf16 instructions (AVX512_BF16 or AMX), from /proc/cpuinfo's flags;
    None where there is no /proc/cpuinfo. Without them OpenVINO emulates bf16, slowly."""
    flags = _cpuinfo("flags")
    return None if flags is None else bool(set(flags.split()) & {"avx512_bf16", "amx_bf16"})


# The CPU flags that decide which kernels run: vector width, int8 dot products, bf16, AMX.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_speed_flags() -> list[str] | None:
    """Which of SPEED_FLAGS the CPU has (a report states them next to its figures); None where
    there is no /proc/cpuinfo."""
    flags = _cpuinfo("flags")
    return None if flags is None else [flag for flag in SPEED_FLAGS if flag in set(flags.split())]


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor()


def _cpuinfo(key: str) -> str | None:
    """The first `key` field of /proc/cpuinfo, None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, summed over its CPUs (user, nice,
    system, irq, softirq and steal, from /proc/stat); None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def loadavg() -> float | None:
    """The 1-minute load average, None where /proc has none."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None
