"""The report's outputs: Markdown tables, the docs page (its prose is `docs_template.md`, next to
this module), MLflow metrics and artifacts, and a saved run read back from JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from benchmarks.models import model_slug
from benchmarks.results import (
    BenchmarkReport,
    HostileResult,
    LoadResult,
    RowResult,
    SoakResult,
    TargetResult,
    format_number,
)
from benchmarks.targets import BUSY, TARGET_BATCH, TARGET_MODEL, TARGET_SIZE, evaluate_targets

MIN_TREND_REQUESTS = 500  # soak requests after the warm-up needed to show an RSS trend


# --------------------------------------------------------------------------------------------
# Tables


def rows_table(rows: Sequence[RowResult]) -> str:
    lines = [
        "| model | image | batch | row | requests | images/s | p50 ms | p95 ms | peak RSS MB | cores busy | CPU s "
        "| others' cores | × (a) torch | × (a+) strongest torch | × (b) onnxruntime | × (c) pyfunc "
        "| max abs Δp vs (a) | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r.ok
        lines.append(
            f"| {r.model} | {r.size} | {r.batch} | {r.label} | {r.requests if ok else '—'} | "
            f"{format_number(r.images_per_s, 2) if ok else '—'} | {format_number(r.p50_ms, 0) if ok else '—'} | "
            f"{format_number(r.p95_ms, 0) if ok else '—'} | {format_number(r.peak_rss_mb, 0) if ok else '—'} | "
            f"{format_number(r.cores_busy, 2) if ok else '—'} | {format_number(r.cpu_seconds, 1)} | "
            f"{format_number(r.others_cores, 2)} | {format_number(r.vs_torch, 2, 'x')} | "
            f"{format_number(r.vs_torch_strong, 2, 'x')} | {format_number(r.vs_onnxruntime, 2, 'x')} | "
            f"{format_number(r.vs_pyfunc, 2, 'x')} | {'—' if r.max_prob_diff is None else f'{r.max_prob_diff:.1e}'} | "
            f"{'' if ok else r.status + ': '}{_cell(r.note)} |"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def targets_table(targets: Sequence[TargetResult]) -> str:
    lines = ["| target | threshold | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.threshold} | {_cell(t.measured)} | **{t.result}** |" for t in targets]
    lines += [
        "",
        f"A ratio is judged only on a quiet machine: **{BUSY}** means other processes kept more than half the "
        "cores busy during a measured round of one of its rows, or its rows got shares of the machine's busy CPU "
        "time more than 20% apart (the reason is in the figure); rerun on a quiet machine to judge it.",
    ]
    return "\n".join(lines)


def loads_table(loads: Sequence[LoadResult]) -> str:
    lines = [
        "| model | precision | load to first prediction s (median) | runs | imports s | load s | predict s | "
        "peak RSS MB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for load in loads:
        lines.append(
            f"| {load.model} | {load.precision} | {format_number(load.seconds, 2)} | {len(load.runs)} | "
            f"{format_number(load.imports_s, 2)} | {format_number(load.load_s, 2)} | "
            f"{format_number(load.predict_s, 2)} | {format_number(load.peak_rss_mb, 0)} | "
            f"{'' if load.status == 'ok' else load.status + ': '}{_cell(load.note)} |"
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
            f"{format_number(s.images_per_s, 1)} | {format_number(s.p50_ms, 0)} | {format_number(s.p95_ms, 0)} "
            f"| {format_number(s.rss_start_mb, 0)} | "
            f"{format_number(s.rss_warm_mb, 0)} | {format_number(s.rss_end_mb, 0)} | {format_number(s.growth_mb, 1)} | "
            f"{format_number(_trend(s), 1)} | {format_number(s.rss_peak_mb, 0)} | "
            f"{'' if s.status == 'ok' else s.status + ': '}{_cell(s.note)} |"
        )
    return "\n".join(lines)


def hostile_table(runs: Sequence[HostileResult]) -> str:
    lines = [
        "| model | image | server | good clients | hostile clients | good requests | good errors | p50 ms alone "
        "| p95 ms alone | p50 ms beside | p95 ms beside | p95 ratio | hostile sent / refused | slowest refusal ms "
        "| 10 MB label sets sent / refused | RSS MB: start, after good, after hostile, after label sets | peak MB "
        "| note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for h in runs:
        rss = ", ".join(
            format_number(v, 0) for v in (h.rss_start_mb, h.rss_after_alone_mb, h.rss_after_hostile_mb, h.rss_end_mb)
        )
        lines.append(
            f"| {h.model} | {h.size} | {h.server} | {h.clients} | {h.hostile_clients} | {h.good_requests} | "
            f"{h.good_errors} | {format_number(h.alone_p50_ms, 0)} | {format_number(h.alone_p95_ms, 0)} | "
            f"{format_number(h.beside_p50_ms, 0)} | {format_number(h.beside_p95_ms, 0)} | "
            f"{format_number(h.p95_ratio, 2)} | {h.hostile_sent} / {h.hostile_refused} | "
            f"{format_number(h.hostile_max_ms, 0)} | {h.flood_requests} / {h.flood_refused} | {rss} | "
            f"{format_number(h.rss_peak_mb, 0)} | {'' if h.status == 'ok' else h.status + ': '}{_cell(h.note)} |"
        )
    return "\n".join(lines)


def _flags_text(flags: list[str] | None) -> str:
    """` (flags avx2, avx512f, ...)`: the CPU's speed-deciding flags, or nothing when unknown."""
    if flags is None:
        return ""
    return f" (flags: {', '.join(flags)})" if flags else " (none of AVX2, AVX-512, VNNI, bf16, AMX)"


def render_markdown(report: BenchmarkReport) -> str:
    """The run's tables: rows, targets, load time, soak, notes."""
    options, machine = report.options, report.machine
    parts = [
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores{_flags_text(machine.get('cpu_flags'))}; "
        f"threads {options['threads']}; "
        f"load average {format_number(machine.get('loadavg_start'), 2)} at the start, "
        f"{format_number(machine.get('loadavg_end'), 2)} at the end; "
        f"onnxruntime {machine['versions'].get('onnxruntime')}, torch {machine['versions'].get('torch')}, "
        f"mlflow {machine['versions'].get('mlflow')}; run took {report.seconds / 60:.1f} min."
        + (f" Resize and crop: {machine['resampling']}." if machine.get("resampling") else ""),
        f"Server: {', '.join(options['server_configs'])} (w = uvicorn workers, t = onnxruntime threads per worker), "
        f"`{options['server_form']}` requests{_env_text(options.get('server_env'))}. Warm-up: "
        f"{options['warmup']} requests per row, excluded; then at "
        f"least {options['min_requests']} requests and {options['min_seconds']:g} s per row, in {options['rounds']} "
        "rounds that alternate between the rows of a group; a request is one batch.",
    ]
    if report.rows:
        parts += ["### Throughput and latency", rows_table(report.rows), *_machine_load(report.rows)]
    heading = f"### Targets ({TARGET_MODEL}, {TARGET_SIZE}, batch {TARGET_BATCH}, {options['threads']} threads)"
    parts += [
        heading,
        targets_table(report.targets)
        if report.targets
        else f"None measured: the targets are stated for {TARGET_MODEL} at {TARGET_SIZE}, batch {TARGET_BATCH}, "
        "which this run did not include.",
    ]
    decode = [r for r in report.rows if r.row == "onnxruntime" and r.ok and r.decode_ms is not None]
    if decode and report.targets:
        parts.append(
            "The targets count each model's default path: exact for fp32, JPEG draft decoding for int8 and bf16 "
            "models of 224 px and more (their exact-decode figure beside them). Exact decode and preprocess of "
            "one image on one thread (CPU time, the median over row (b)'s rounds, each timed after its requests): "
            + ", ".join(f"{r.model} {r.size} {r.decode_ms:.1f} ms" for r in decode)
            + ". The decode-bound ceiling is the highest (c) / (b) ratio that work allows on the same cores, "
            "threads / ((b)'s cores busy + decode seconds x (b)'s images/s), times (b) / (a) against row (a)."
        )
    if report.loads:
        parts += ["### Load to first prediction (registered model, fresh interpreter)", loads_table(report.loads)]
    if report.soaks:
        parts += ["### Memory under load (soak)", soaks_table(report.soaks), soak_verdict(report.soaks)]
    if report.hostile:
        parts += [
            "### Hostile traffic",
            "Good requests (4 images each, `inputs` form) alone, then as many again while other clients send "
            "decompression bombs, oversized labels and templates, prompt floods and null texts in turn (each must be "
            "refused with a 400), then requests carrying 10 MB label sets. RSS is read idle after each phase.",
            hostile_table(report.hostile),
        ]
    if report.notes:
        parts += ["### Notes", "\n".join(f"- {_cell(n)}" for n in report.notes)]
    return "\n\n".join(parts) + "\n"


def _machine_load(rows: Sequence[RowResult]) -> list[str]:
    """Per group: the load average after each round, other processes' cores, the rows' CPU shares."""
    groups: dict[tuple[str, str, int], list[RowResult]] = {}
    for row in rows:
        if row.rounds:
            groups.setdefault((row.model, row.size, row.batch), []).append(row)
    lines = []
    for (model, size, batch), members in groups.items():
        last = members[-1].rounds  # the last row of a round ends it
        loads = ", ".join(format_number(r.get("loadavg"), 2) for r in last)
        others = [r.others_cores for r in members if r.others_cores is not None]
        shares = [r.cpu_share for r in members if r.cpu_share is not None]
        lines.append(
            f"- {model} {size} batch {batch}: load average after each round {loads}; other processes kept at most "
            f"{format_number(max(others, default=None), 2)} cores busy during a row's round; the rows got "
            + (_span(shares) if shares else "—")
            + " of the machine's busy CPU time"
        )
    if not lines:
        return []
    return [
        "Machine load while the rows were measured (CPU s: each row's own process tree; others' cores: the "
        "most cores other processes kept busy during one of its rounds, from /proc/stat; the load average "
        "counts the rows' own threads too):",
        "\n".join(lines),
    ]


def _span(values: Sequence[float]) -> str:
    low, high = f"{min(values):.0%}", f"{max(values):.0%}"
    return low if low == high else f"{low} to {high}"


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
            f"- {model}: arena off {off.rss_end_mb:.0f} MB idle at the end ({off.growth_mb:+.1f} MB since the "
            "warm-up), "
            f"{off.images_per_s:.1f} images/s; arena on {on.rss_end_mb:.0f} MB ({on.growth_mb:+.1f} MB), "
            f"{on.images_per_s:.1f} images/s: the smaller footprint is with the arena {lower}."
        )
    if not lines:
        return "Run both arena settings (`--soak-arena both`) to compare them."
    return "\n".join(lines) + (
        "\n\nThe soaks run one after the other, so a throughput difference between them also contains any "
        "change in the machine's background load; the memory figures are the server's own."
    )


# --------------------------------------------------------------------------------------------
# The docs page


# The page's prose, a file next to this module. In it, "{args} " stands for the arguments that
# reproduce the run (with their trailing space; nothing when there are none) and the line
# "{results}" for the run's tables (`render_markdown`, which ends with a newline).
DOCS_TEMPLATE = "docs_template.md"
ARGS_FIELD = "{args} "
RESULTS_FIELD = "{results}\n"


def docs_template() -> str:
    """The docs page's text around the run's tables (`DOCS_TEMPLATE`, next to this module)."""
    return (Path(__file__).parent / DOCS_TEMPLATE).read_text(encoding="utf-8")


def render_docs(report: BenchmarkReport) -> str:
    """The docs page: what each row is, the run's tables, and how to reproduce them."""
    head, tail = docs_template().split(RESULTS_FIELD)
    args = report.command + " " if report.command else ""
    return head.replace(ARGS_FIELD, args) + render_markdown(report) + tail


def write_docs(report: BenchmarkReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_docs(report), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# MLflow and JSON


def metric_key(*parts: Any) -> str:
    return ".".join(model_slug(str(p)) if i == 0 else str(p) for i, p in enumerate(parts))


def report_metrics(report: BenchmarkReport) -> dict[str, float]:
    """Flat MLflow metrics: `<model>.<size>.b<batch>.<row>.<figure>` and the load/soak figures."""
    metrics: dict[str, float] = {}
    for r in report.rows:
        if r.ok:
            for name in (
                "images_per_s",
                "p50_ms",
                "p95_ms",
                "peak_rss_mb",
                "vs_torch",
                "vs_torch_strong",
                "vs_onnxruntime",
                "vs_pyfunc",
            ):
                if getattr(r, name) is not None:
                    metrics[metric_key(r.model, r.size, f"b{r.batch}", r.row, name)] = float(getattr(r, name))
    for load in report.loads:
        if load.status == "ok":
            metrics[metric_key(load.model, load.precision, "load_to_first_prediction_s")] = float(load.seconds)
    for s in report.soaks:
        for name in ("images_per_s", "rss_warm_mb", "rss_end_mb", "growth_mb", "errors"):
            if getattr(s, name) is not None:
                metrics[metric_key(s.model, s.size, f"soak_arena_{'on' if s.arena else 'off'}", name)] = float(
                    getattr(s, name)
                )
    for h in report.hostile:
        for name in ("alone_p95_ms", "beside_p95_ms", "p95_ratio", "rss_start_mb", "rss_end_mb", "hostile_max_ms"):
            if getattr(h, name) is not None:
                metrics[metric_key(h.model, h.size, "hostile", name)] = float(getattr(h, name))
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
        mlflow.log_text(render_markdown(report), "benchmark.md")
        mlflow.log_dict(report.to_dict(), "benchmark.json")
    return run.info.run_id


def load_report(path: str | os.PathLike) -> BenchmarkReport:
    """A report saved with `--json`; its targets are evaluated again from its rows."""
    report = BenchmarkReport.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    report.targets = evaluate_targets(report)
    return report
