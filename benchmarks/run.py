"""A benchmark run: build the models, run every group's rows (their measured rounds alternating),
compare them, then the load times, the soak and the targets; and what `python -m benchmarks` does."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.hostile import run_hostile
from benchmarks.images import ensure_images
from benchmarks.loads import run_loads
from benchmarks.measure import loadavg, machine_busy_seconds, machine_info, tree_cpu_seconds
from benchmarks.mlserver import MLServerUnavailable, note_mlserver_ratios
from benchmarks.models import ensure_models, pyfunc_config_keys
from benchmarks.options import BenchmarkOptions, command_line, size_name
from benchmarks.peers import PeerUnavailable, ensure_peers
from benchmarks.plan import Planned, plan_group
from benchmarks.report import load_report, log_report, render_markdown, write_docs
from benchmarks.results import REFERENCE_ROWS, BenchmarkReport, RoundLoad, RowResult, note_rounds
from benchmarks.soak import run_soaks
from benchmarks.targets import evaluate_targets
from benchmarks.worker import RowProcess

_PROGRESS_PREFIX = "[benchmark]"

FP16_NOTE = "CPU provider (no GPU here): fp16 weights, computed in float32 behind casts"


def _progress(message: str) -> None:
    print(f"{_PROGRESS_PREFIX} {message}", file=sys.stderr, flush=True)


def run_benchmark(options: BenchmarkOptions, progress: Callable[[str], None] = _progress) -> BenchmarkReport:
    """Measure every requested row; see the package docstring (`benchmarks`)."""
    started = time.perf_counter()
    options.work_dir.mkdir(parents=True, exist_ok=True)
    report = BenchmarkReport(options=options.to_dict(), machine=machine_info(), command=command_line(options))
    precisions = ["fp32", *(options.precisions if "precision" in options.rows else ())]
    builds = ensure_models(options, options.models, precisions, progress)
    soak_only = [m for m in options.soak_models if m not in options.models] if options.soak or options.hostile else []
    if soak_only:
        builds.update(ensure_models(options, soak_only, ["fp32"], progress))
    _note_builds(report, builds)
    if "peers" in options.rows:
        builds.update(ensure_peers(options, builds, progress))
    pools = {size: ensure_images(options.work_dir, size, options.pool_size) for size in options.sizes}
    state = _RunState(builds=builds)
    for model in options.models:
        for size in options.sizes:
            for batch in options.batches:
                report.rows += _run_group(options, model, size, batch, pools[size], state, progress)
    compare_rows(report.rows, state.probabilities)
    note_mlserver_ratios(report.rows)
    if "load" in options.rows:
        report.loads = run_loads(options, builds, pools[options.sizes[0]][0], progress)
    if options.soak:
        report.soaks = run_soaks(options, builds, progress)
    if options.hostile:
        report.hostile = [run_hostile(options, builds, progress)]
    report.targets = evaluate_targets(report)
    report.machine["loadavg_end"] = loadavg()
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
            report.notes.append(
                f"{model} {precision}: not built, {info.get('status', 'failed')}: "
                f"{info.get('note') or info.get('error', '')}"
            )
    drafts = [
        m
        for (m, p), info in builds.items()
        if p == "fp32" and info.get("status") == "ok" and "jpeg_draft" not in pyfunc_config_keys(info["model_dir"])
    ]
    if drafts:
        report.notes.append("draft rows skipped: the model offers no `jpeg_draft` option (" + ", ".join(drafts) + ")")


def _run_group(
    options: BenchmarkOptions,
    model: str,
    size: tuple[int, int],
    batch: int,
    pool: Sequence[Path],
    state: _RunState,
    progress: Callable[[str], None],
) -> list[RowResult]:
    """All rows of one model, size and batch: each row's process is set up in turn, then the
    measured rounds alternate between rows."""
    planned, rows = plan_group(options, model, size, batch, pool, state.builds, state.unrunnable)
    where = f"{model} {size_name(size)} batch {batch}"
    running: list[tuple[Planned, RowProcess]] = []
    try:
        for item in planned:
            process = RowProcess(item.task, item.spec, options.work_dir, item.name, options.child_timeout)
            process.wait_ready()
            running.append((item, process))
        per_round = _round_budget(options)
        loads: dict[str, list[RoundLoad]] = {item.name: [] for item, _ in running}
        for number in range(options.rounds):
            progress(f"{where}: round {number + 1} of {options.rounds}")
            for item, process in running:
                loads[item.name].append(_measured_round(process, per_round))
        for item, process in running:
            _fill_planned(item, process.finish(), state)
            for row, _ in item.rows:
                note_rounds(row, loads[item.name])
    except BaseException:
        for _, process in running:
            process.kill()
        raise
    for row in rows:
        progress(f"{where} {row.label}: {describe_row(row)}")
    return rows


def _measured_round(process: RowProcess, budget: tuple[int, float, int]) -> RoundLoad:
    """One round of a row's process, with its tree's CPU seconds and the whole machine's."""
    pid = process.proc.pid
    own, machine, began = tree_cpu_seconds(pid), machine_busy_seconds(), time.perf_counter()
    process.run_round(*budget)
    wall = time.perf_counter() - began
    machine_after = machine_busy_seconds()
    busy = None if machine is None or machine_after is None else machine_after - machine
    return RoundLoad(wall, tree_cpu_seconds(pid) - own, busy, loadavg())


def _round_budget(options: BenchmarkOptions) -> tuple[int, float, int]:
    rounds = max(1, options.rounds)
    return -(-options.min_requests // rounds), options.min_seconds / rounds, max(1, options.max_requests // rounds)


def _fill_planned(item: Planned, result: dict[str, Any], state: _RunState) -> None:
    for row, key in item.rows:
        per_client = result.get("clients", {}).get(key) if key else None
        _fill_row(row, {"status": "ok", **per_client} if per_client else result, state, item.precision)
        if row.status == "not runnable":
            state.unrunnable[(row.model, item.precision)] = row.note


def _fill_row(row: RowResult, result: dict[str, Any], state: _RunState, precision: str = "fp32") -> None:
    if result.get("status") != "ok":
        error = result.get("error", "failed")
        if error.startswith(PeerUnavailable.__name__ + ": "):  # the peer has no such model, or is not installed
            row.status, row.note = "not runnable", error.split(": ", 1)[1]
        elif precision == "fp16" or error.startswith(MLServerUnavailable.__name__):
            row.status, row.note = "not runnable", f"not runnable on this machine: {error}"
        else:
            row.status, row.note = "failed", error
        return
    for name in (
        "requests",
        "images",
        "seconds",
        "images_per_s",
        "p50_ms",
        "p95_ms",
        "peak_rss_mb",
        "cores_busy",
        "decode_ms",
        "draft_decode_ms",
    ):
        setattr(row, name, result.get(name))
    if result.get("errors"):
        row.status = "not runnable" if precision == "fp16" else "failed"
        row.note = f"{result['errors']} failed requests, e.g. {result['error_examples'][0]}"
    elif precision == "fp16":
        row.note = FP16_NOTE
    row.label = result.get("label") or row.label  # a row that says what ran (e.g. torch.compile)
    first = result.get("first_prediction_s")
    first_note = f"first prediction {first:.1f} s after start" if first is not None else ""
    row.note = "; ".join(filter(None, [row.note, result.get("engine"), first_note]))
    state.probabilities[(row.model, row.size, row.batch, row.row)] = result.get("probabilities")


def describe_row(row: RowResult) -> str:
    if not row.ok:
        return f"{row.status}: {row.note}"
    return (
        f"{row.images_per_s:.2f} images/s, p50 {row.p50_ms:.0f} ms, p95 {row.p95_ms:.0f} ms, "
        f"peak RSS {row.peak_rss_mb:.0f} MB ({row.requests} requests)"
    )


def compare_rows(rows: list[RowResult], probabilities: dict | None = None) -> None:
    """Fill the ratio columns (throughput / the reference row's, same model, size and batch)
    and the largest probability difference from row (a) on request 0."""
    probabilities = probabilities or {}
    groups: dict[tuple[str, str, int], dict[str, RowResult]] = {}
    for row in rows:
        groups.setdefault((row.model, row.size, row.batch), {})[row.row] = row
    for key, group in groups.items():
        references = {name: group.get(row) for name, row in REFERENCE_ROWS.items()}
        reference_p = probabilities.get((*key, "torch"))
        for row in group.values():
            if not row.ok or not row.images_per_s:
                continue
            for name, reference in references.items():
                ratio = (
                    row.images_per_s / reference.images_per_s
                    if reference and reference.ok and reference.images_per_s
                    else None
                )
                setattr(row, f"vs_{name}", ratio)
            own_p = probabilities.get((*key, row.row))
            if reference_p is not None and own_p is not None and row.row != "torch":
                row.max_prob_diff = float(np.abs(np.asarray(own_p) - np.asarray(reference_p)).max())


def run_from_cli(
    options: BenchmarkOptions,
    json_path: str | None,
    docs_path: str | None,
    log_to_mlflow: bool,
    echo: Callable[[str], None] = print,
    from_json: str | None = None,
) -> BenchmarkReport:
    """What `python -m benchmarks` does: run (or read a saved run), print the tables, then
    write/log what was asked."""
    report = load_report(from_json) if from_json else run_benchmark(options)
    echo(render_markdown(report))
    if json_path:
        Path(json_path).write_text(report.to_json(), encoding="utf-8")
        echo(f"wrote {json_path}")
    if docs_path:
        echo(f"wrote {write_docs(report, docs_path)}")
    if log_to_mlflow:
        echo(f"logged to MLflow run {log_report(report)}")
    return report
