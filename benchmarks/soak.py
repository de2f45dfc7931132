"""The soak: a sustained run of the server (random batch sizes, several clients) that samples
the server's RSS, with onnxruntime's CPU memory arena off and on. The child side runs the
requests; the parent side plans one soak per model and arena setting and fills `SoakResult`s."""

from __future__ import annotations

import base64
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.images import ensure_images, read_pool
from benchmarks.measure import RssSampler, Timing, run_requests, summarize, tree_rss_mb
from benchmarks.models import model_slug
from benchmarks.options import BenchmarkOptions, size_name
from benchmarks.results import SoakResult, format_number
from benchmarks.server import ScoringServer, new_session, request_body, server_call
from benchmarks.worker import run_child

# --------------------------------------------------------------------------------------------
# Child side


def task_soak(spec: dict[str, Any]) -> dict[str, Any]:
    """Soak: `requests` requests of random batch sizes 1..max_batch from several clients."""
    b64 = [base64.b64encode(data).decode("ascii") for data in read_pool(spec)]
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


def _soak(
    server: ScoringServer, bodies: Callable[[int], tuple[bytes, int]], sizes: np.ndarray, spec: dict
) -> dict[str, Any]:
    """Warm-up requests, then the rest; the server's RSS is read idle after each phase (so the
    two figures compare like with like) and sampled throughout."""
    pid, clients = server.proc.pid, spec["clients"]
    warm_n = min(len(sizes), max(clients, len(sizes) // 10))
    done = [0]
    sampler = RssSampler(pid, period=0.25, progress=lambda: done[0])
    rss_start = sampler.latest
    sampler.start()
    call = server_call(server.url, bodies)

    def on_done(finished: int) -> None:
        done[0] = finished

    warm = run_requests(call, clients, warm_n, 0.0, warm_n, new_session, on_done)
    rss_warm = _idle_rss_mb(pid)
    rest = run_requests(
        lambda i, state: call(warm_n + i, state),
        clients,
        len(sizes) - warm_n,
        0.0,
        len(sizes) - warm_n,
        new_session,
        lambda finished: on_done(warm_n + finished),
    )
    rss_end = _idle_rss_mb(pid)
    sampler.stop()
    timing = Timing(
        warm.latencies + rest.latencies,
        warm.seconds + rest.seconds,
        warm.errors + rest.errors,
        None,
        warm.issued + rest.issued,
    )
    result = summarize(timing, 1)
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


# --------------------------------------------------------------------------------------------
# Parent side


def run_soaks(options: BenchmarkOptions, builds: dict, progress: Callable[[str], None]) -> list[SoakResult]:
    """One soak per soak model and arena setting, one after the other."""
    pool = ensure_images(options.work_dir, options.soak_size, options.pool_size)
    counts = (
        options.soak_requests * len(options.soak_models) if len(options.soak_requests) == 1 else options.soak_requests
    )
    return [
        _run_soak(options, builds.get((model, "fp32"), {}), model, requests, arena, pool, progress)
        for model, requests in zip(options.soak_models, counts)
        for arena in options.soak_arena
    ]


def _run_soak(
    options: BenchmarkOptions,
    info: dict,
    model: str,
    requests: int,
    arena: bool,
    pool: Sequence[Path],
    progress: Callable[[str], None],
) -> SoakResult:
    config = options.server_configs[0]
    result = SoakResult(model, size_name(options.soak_size), arena, config.key, options.soak_clients)
    if info.get("status") != "ok":
        result.status, result.note = "failed", f"{model} was not built: {info.get('note') or info.get('error', '')}"
        return result
    setting = f"arena {'on' if arena else 'off'}"
    progress(f"soak {model}: {requests} requests, {options.soak_clients} clients, {setting}")
    name = f"soak-{model_slug(model)}-{result.size}-arena-{'on' if arena else 'off'}"
    spec = {
        "model_dir": info["model_dir"],
        "workers": config.workers,
        "clients": options.soak_clients,
        "requests": requests,
        "max_batch": options.soak_max_batch,
        "form": options.server_form,
        "images": [str(p) for p in pool],
        "log": str(options.work_dir / "logs" / f"{name}.server.log"),
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
    return (
        f"{soak.requests} requests, {soak.errors} errors, {soak.images_per_s:.1f} images/s, RSS "
        f"{format_number(soak.rss_warm_mb, 0)} MB after warm-up -> {soak.rss_end_mb:.0f} MB at the end ({growth})"
    )
