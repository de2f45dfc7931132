"""The hostile-traffic soak: good requests from some clients while others send decompression
bombs, oversized labels, prompt floods and 10 MB label sets, against one `mlflow models serve`.

It reports the good requests' p50/p95 latency alone and beside the hostile traffic (the target:
within 2x), what the hostile requests were answered (each must be refused: 400 or 413), and the
server's RSS at the start, after each phase and after a flood of requests carrying 10 MB label
sets. The requests are made here (`hostile_requests`, `hostile_cases`), the same ones the tests send."""

from __future__ import annotations

import base64
import functools
import json
import random
import string
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from benchmarks.bombs import BOMBS, encode, lossless_webp_bomb
from benchmarks.images import ensure_images, read_pool
from benchmarks.measure import RssSampler, run_requests, summarize, tree_rss_mb
from benchmarks.options import BenchmarkOptions, size_name
from benchmarks.results import HostileResult, format_number
from benchmarks.server import JSON_HEADERS, ScoringServer, new_session, request_body, server_call
from benchmarks.worker import run_child

GOOD_BATCH = 4
REFUSED = (400, 413)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hostile_requests(good_image: str) -> dict[str, tuple[dict, str]]:
    """name -> (request body, a phrase its 400 must contain); each body is under 1 MB.
    `good_image` (base64) rides along where a request needs an image to classify."""
    return {name: (build(), phrase) for name, (build, phrase) in hostile_cases(good_image).items()}


def hostile_cases(good_image: str) -> dict[str, tuple[Callable[[], dict], str]]:
    """`hostile_requests` with each body still to build: the names cost nothing (the tests list
    them when they are collected), the bodies up to a second each."""
    from PIL import Image

    one = {"image": [good_image]}

    @functools.cache
    def flat() -> str:
        return _b64(encode(Image.new("RGB", (6000, 5000), (200, 20, 20)), "WEBP", quality=10))  # 30 MP in 70 KB

    def body(inputs: dict, **params) -> Callable[[], dict]:
        return lambda: {"inputs": inputs, "params": params} if params else {"inputs": inputs}

    cases = {
        name: ((lambda make=make: {"inputs": {"image": [good_image, _b64(make())]}}), "row 1")
        for name, make in BOMBS.items()
    }
    cases["lossless WebP of 5000x5000"] = (
        lambda: {"inputs": {"image": [_b64(lossless_webp_bomb())]}},
        "decompression ratio",
    )
    cases["six 30 MP images"] = (lambda: {"inputs": {"image": [flat()] * 6}}, "max_request_pixels")
    cases["a 100 KB label"] = (body(one, classes=["x" * 100_000]), "max_text_chars")
    cases["seven 40 KB labels"] = (body(one, classes=["y" * 40_000] * 7), "max_text_chars")
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(1000)) for _ in range(60)]
    cases["sixty 1,000-letter random words"] = (body(one, classes=words, templates="none"), "max_request_text_chars")
    template = "a photo of {} " + "z" * 10_000
    cases["a 10 KB template"] = (body(one, classes=["a cat"], templates=template), "max_text_chars")
    thousand = [f"class number {i}" for i in range(1000)]
    cases["1,000 classes x ensemble"] = (body(one, classes=thousand, templates="ensemble"), "max_prompts")
    cases["a label over the context"] = (
        body(one, classes=[" ".join(["red"] * 80) + " circle", "a square"]),
        "truncate",
    )
    long = "q" * 100_000
    # Serving reads no files: an "@path" template is a template like any other, refused for its size.
    cases["a 100 KB template named like an @file"] = (
        body(one, classes=["a cat", "a dog"], templates="@" + long),
        "max_text_chars",
    )
    for param in ("output", "on_error"):
        cases[f"a 100 KB {param}"] = (body(one, **{param: long}), "expected one of")
    cases["a 100 KB text to embed"] = (body({"text": ["w" * 100_000]}), "max_text_chars")
    cases["a null text"] = (
        lambda: {"dataframe_split": {"columns": ["text"], "data": [["a cat"], [None]]}},
        "row 1",
    )
    return cases


def label_flood_body(good_image: str) -> bytes:
    """One request carrying a 10 MB label set (10,000 labels of 1,000 characters), refused."""
    classes = [f"{i:06d}" + "v" * 994 for i in range(10_000)]
    return json.dumps({"inputs": {"image": [good_image]}, "params": {"classes": classes}}).encode()


# --------------------------------------------------------------------------------------------
# Child side


def task_hostile(spec: dict[str, Any]) -> dict[str, Any]:
    pool = [_b64(data) for data in read_pool(spec)]
    good_bodies = [request_body([pool[(i + j) % len(pool)] for j in range(GOOD_BATCH)], "inputs") for i in range(8)]
    hostile = [json.dumps(body).encode() for body, _ in hostile_requests(pool[0]).values()]
    server = ScoringServer(spec["model_dir"], spec["workers"], spec["model_config"], Path(spec["log"]), spec.get("env"))
    try:
        server.wait_ready()
        return _phases(server, good_bodies, hostile, label_flood_body(pool[0]), spec)
    finally:
        server.stop()


def _phases(server: ScoringServer, good: list[bytes], hostile: list[bytes], flood: bytes, spec: dict) -> dict:
    pid, n, clients = server.proc.pid, spec["requests"], spec["clients"]
    sampler = RssSampler(pid, period=0.25)
    sampler.start()
    call = server_call(server.url, lambda i: (good[i % len(good)], GOOD_BATCH))
    out: dict[str, Any] = {"rss_start_mb": tree_rss_mb(pid)}
    run_requests(call, clients, 2 * clients, 0.0, 2 * clients, new_session)  # warm-up
    alone = summarize(run_requests(call, clients, n, 0.0, n, new_session), GOOD_BATCH)
    out["rss_after_alone_mb"] = _idle_rss(pid)
    attack = _Attack(server.url, hostile, spec["hostile_clients"])
    attack.start()
    beside = summarize(run_requests(call, clients, n, 0.0, n, new_session), GOOD_BATCH)
    attack.stop()
    out["rss_after_hostile_mb"] = _idle_rss(pid)
    flood_started = time.perf_counter()
    flooded = _Attack(server.url, [flood], spec["hostile_clients"], limit=spec["flood"])
    flooded.run_to_limit()
    out["flood_seconds"] = time.perf_counter() - flood_started
    out["rss_end_mb"] = _idle_rss(pid)
    sampler.stop()
    out.update(
        good_requests=alone["requests"] + beside["requests"],
        good_errors=alone["errors"] + beside["errors"],
        error_examples=alone["error_examples"] + beside["error_examples"],
        alone_p50_ms=alone.get("p50_ms"),
        alone_p95_ms=alone.get("p95_ms"),
        beside_p50_ms=beside.get("p50_ms"),
        beside_p95_ms=beside.get("p95_ms"),
        hostile_sent=attack.sent,
        hostile_refused=attack.refused,
        hostile_unexpected=attack.unexpected[:3],
        hostile_max_ms=attack.slowest * 1000,
        flood_requests=flooded.sent,
        flood_refused=flooded.refused,
        rss_peak_mb=sampler.peak,
    )
    if alone.get("p95_ms") and beside.get("p95_ms"):
        out["p95_ratio"] = beside["p95_ms"] / alone["p95_ms"]
    return out


def _idle_rss(pid: int, settle: float = 1.0) -> float:
    time.sleep(settle)
    return tree_rss_mb(pid)


class _Attack:
    """Clients that send hostile bodies in turn, until stopped or `limit` requests are sent."""

    def __init__(self, url: str, bodies: list[bytes], clients: int, limit: int | None = None):
        self.url, self.bodies, self.limit = url, bodies, limit
        self.sent = self.refused = 0
        self.slowest = 0.0
        self.unexpected: list[str] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.limit is not None and self.sent >= self.limit):
                return None
            self.sent += 1
            return self.sent - 1

    def _client(self) -> None:
        session = new_session()
        while (index := self._next()) is not None:
            started = time.perf_counter()
            try:
                response = session.post(
                    self.url + "/invocations", data=self.bodies[index % len(self.bodies)], headers=JSON_HEADERS
                )
                status, text = response.status_code, response.text[:200]
            except Exception as e:  # counted: a hostile request must never break the connection
                status, text = 0, f"{type(e).__name__}: {str(e)[:150]}"
            with self._lock:
                self.slowest = max(self.slowest, time.perf_counter() - started)
                if status in REFUSED:
                    self.refused += 1
                else:
                    self.unexpected.append(f"request {index}: HTTP {status}: {text}")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def run_to_limit(self) -> None:
        self.start()
        for thread in self._threads:
            thread.join()


# --------------------------------------------------------------------------------------------
# Parent side


def run_hostile(options: BenchmarkOptions, builds: dict, progress: Callable[[str], None]) -> HostileResult:
    model, config, size = options.soak_models[0], options.server_configs[0], size_name(options.soak_size)
    result = HostileResult(model, size, config.key, options.soak_clients, options.hostile_clients)
    info = builds.get((model, "fp32"), {})
    if info.get("status") != "ok":
        result.status, result.note = "failed", f"{model} was not built: {info.get('note') or info.get('error', '')}"
        return result
    progress(
        f"hostile traffic on {model}: {options.hostile_requests} good requests alone and beside "
        f"{options.hostile_clients} hostile clients, then {options.hostile_flood} 10 MB label sets"
    )
    spec = {
        "model_dir": info["model_dir"],
        "workers": config.workers,
        "clients": options.soak_clients,
        "hostile_clients": options.hostile_clients,
        "requests": options.hostile_requests,
        "flood": options.hostile_flood,
        "images": [str(p) for p in ensure_images(options.work_dir, options.soak_size, options.pool_size)],
        "log": str(options.work_dir / "logs" / "hostile.server.log"),
        "model_config": {"intra_op_num_threads": config.threads},
        "env": dict(options.server_env),
    }
    _fill(result, run_child("hostile", spec, options.work_dir, "hostile", options.child_timeout))
    progress(f"hostile traffic: {describe_hostile(result)}")
    return result


def _fill(result: HostileResult, data: dict[str, Any]) -> None:
    if data.get("status") != "ok":
        result.status, result.note = "failed", data.get("error", "failed")
        return
    for f in fields(HostileResult):
        if f.name in data and f.name not in ("model", "size", "server", "status", "note"):
            setattr(result, f.name, data[f.name])
    problems = []
    if data.get("good_errors"):
        problems.append(f"{data['good_errors']} good requests failed, e.g. {data['error_examples'][0]}")
    if data.get("hostile_unexpected") or data.get("flood_refused", 0) < data.get("flood_requests", 0):
        problems.append(f"hostile requests not refused, e.g. {(data.get('hostile_unexpected') or ['a flood'])[0]}")
    if problems:
        result.status, result.note = "failed", "; ".join(problems)


def describe_hostile(h: HostileResult) -> str:
    if h.status != "ok":
        return f"{h.status}: {h.note}"
    return (
        f"good p95 {format_number(h.alone_p95_ms, 0)} ms alone, {format_number(h.beside_p95_ms, 0)} ms beside "
        f"{h.hostile_sent} hostile requests ({format_number(h.p95_ratio, 2)}x), all refused; RSS "
        f"{format_number(h.rss_start_mb, 0)} MB at the start, {format_number(h.rss_end_mb, 0)} MB after "
        f"{h.flood_requests} 10 MB label sets"
    )
