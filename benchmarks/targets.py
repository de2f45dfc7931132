"""The targets, stated for one configuration (`TARGET_MODEL`, `TARGET_SIZE`, `TARGET_BATCH`):
throughput ratios between rows on each model's default path (`RATIO_TARGETS`, data), the
load-to-first-prediction time, and the good requests' latency under hostile traffic.

A ratio is judged only on a quiet machine: when other processes kept more than half the cores
busy during a measured round of either row, or the two rows got shares of the machine's busy
CPU time more than 20% apart, the figure is shown with the reason and the verdict is `BUSY`,
never PASS or FAIL (under load, the rows that hold fewer cores lose more: ratios flatter)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.results import REFERENCE_ROWS, BenchmarkReport, HostileResult, LoadResult, RowResult, TargetResult

# The configuration the targets are stated for.
TARGET_MODEL, TARGET_SIZE, TARGET_BATCH = "RN50", "1920x1080", 8
LOAD_TARGET_SECONDS = 3.0
HOSTILE_P95_RATIO = 2.0  # good requests' p95 beside hostile traffic over their p95 alone
# The reference of a target against raw onnxruntime: the faster of the raw onnxruntime rows
# (with and without thread spinning, when both ran): the pyfunc's session settings are not assumed best.
GRAPH = "graph"
GRAPH_ROWS = ("onnxruntime", "onnxruntime-spin")
NOT_MEASURED = "n/a"  # the verdict of a target whose rows did not run; such targets are not reported
# The verdict of a target that needs CPU instructions this machine lacks: measured, not judged.
NOT_THIS_CPU = "not on this CPU"
NO_NATIVE_BF16 = (
    "this CPU has no AVX512_BF16 or AMX, so OpenVINO and torch emulate bf16; the target is set for a CPU that has them"
)
# The verdict of a ratio measured while the machine was busy: shown, not judged.
BUSY = "BUSY"
MAX_OTHERS_SHARE_OF_CORES = 0.5  # other processes' cores, in any measured round of a row
MAX_CPU_SHARE_SPREAD = 0.2  # between the two rows of a ratio: their shares of the machine's busy CPU


PYFUNC_VS_ENGINE = 0.95  # each precision's pyfunc against its own engine on ready tensors


@dataclass(frozen=True)
class RatioTarget:
    """`row`'s images/s over its reference's must be at least `threshold`.

    `versus` is the reference: a row whose ratio column (`vs_torch`, `vs_torch_strong`,
    `vs_pyfunc`) `compare_rows` filled, or `GRAPH`. With `best_of`, `row` is a prefix and the best
    of the rows it starts (one per server setting) counts; with `candidates`, the best of those
    rows counts, and the figure names it. Beside the figure, never counted for it: the `draft`
    row's figure against the same reference, and with `ceiling` the decode-bound ceiling.
    """

    key: str
    name: str
    row: str
    versus: str
    threshold: float
    draft: str | None = None
    ceiling: bool = False
    best_of: bool = False
    exact: str | None = None  # the row of the same model with the exact decode, shown beside
    needs_bf16: bool = False  # judged only on a CPU with bf16 instructions (else NOT_THIS_CPU)
    candidates: tuple[str, ...] = ()


RATIO_TARGETS: tuple[RatioTarget, ...] = (
    RatioTarget(
        "pyfunc_fp32_vs_torch", "pyfunc fp32 vs (a) torch", "pyfunc", "torch", 2.0, draft="pyfunc-draft", ceiling=True
    ),
    # int8 and bf16 models decode JPEGs in draft mode by default (PRECISION_JPEG_DRAFT): the
    # targets are on that default; the exact decode's figure is shown beside them.
    RatioTarget(
        "pyfunc_int8_vs_torch", "pyfunc int8 vs (a) torch", "pyfunc-int8", "torch", 4.5, exact="pyfunc-int8-exact"
    ),
    RatioTarget("graph_int8_vs_graph_fp32", "(b) graph int8 vs (b) onnxruntime fp32", "graph-int8", GRAPH, 3.0),
    RatioTarget(
        "pyfunc_bf16_vs_torch",
        "pyfunc bf16 vs (a) torch",
        "pyfunc-bf16",
        "torch",
        3.0,
        exact="pyfunc-bf16-exact",
        needs_bf16=True,
    ),
    RatioTarget(
        "graph_bf16_vs_graph_fp32",
        "(b) graph bf16 vs (b) onnxruntime fp32",
        "graph-bf16",
        GRAPH,
        1.9,
        needs_bf16=True,
    ),
    RatioTarget(
        "pyfunc_fp32_vs_onnxruntime",
        "pyfunc fp32 vs (b) onnxruntime (the faster (b) row)",
        "pyfunc",
        GRAPH,
        PYFUNC_VS_ENGINE,
        draft="pyfunc-draft",
        ceiling=True,
    ),
    RatioTarget(
        "server_4_clients_vs_pyfunc", "server 4 clients vs in-process pyfunc", "server-4c", "pyfunc", 0.8, best_of=True
    ),
    # The strongest torch a user here would run (bf16 autocast, channels_last, torch.compile where
    # it helps): on a CPU with native bf16, the default path must beat it, and the fastest
    # precision's pyfunc (each precision gated at export) by 4x.
    RatioTarget(
        "pyfunc_fp32_vs_strong_torch",
        "pyfunc fp32 (the default path) vs (a+) strongest torch",
        "pyfunc",
        "torch_strong",
        1.0,
        ceiling=True,
        needs_bf16=True,
    ),
    RatioTarget(
        "fastest_pyfunc_vs_strong_torch",
        "fastest pyfunc precision vs (a+) strongest torch",
        "pyfunc",
        "torch_strong",
        4.0,
        ceiling=True,
        needs_bf16=True,
        candidates=("pyfunc", "pyfunc-int8", "pyfunc-bf16", "pyfunc-fp16"),
    ),
    # Every precision's pyfunc keeps 95% of its own engine's speed on ready tensors (its model's
    # default decode: draft for int8 and bf16, the exact decode's figure beside it).
    RatioTarget(
        "pyfunc_int8_vs_graph_int8",
        "pyfunc int8 vs (b) graph int8 (its engine)",
        "pyfunc-int8",
        "graph-int8",
        PYFUNC_VS_ENGINE,
        ceiling=True,
        exact="pyfunc-int8-exact",
    ),
    RatioTarget(
        "pyfunc_bf16_vs_graph_bf16",
        "pyfunc bf16 vs (b) graph bf16 (its engine)",
        "pyfunc-bf16",
        "graph-bf16",
        PYFUNC_VS_ENGINE,
        ceiling=True,
        exact="pyfunc-bf16-exact",
        needs_bf16=True,
    ),
    # Cached per-request labels cost at most 5% more than the baked classes.
    RatioTarget(
        "labels_per_request_vs_pyfunc", "pyfunc labels per request vs baked", "pyfunc-labels", "pyfunc", 1 / 1.05
    ),
)


def evaluate_targets(report: BenchmarkReport) -> list[TargetResult]:
    """The targets on the exact (default) path, from the rows of the target configuration and
    its fp32 load time; `jpeg_draft` figures and the decode-bound ceiling are shown next to
    them, never counted for them. A target whose rows this run did not measure is left out."""
    group = {r.row: r for r in report.rows if (r.model, r.size, r.batch) == (TARGET_MODEL, TARGET_SIZE, TARGET_BATCH)}
    graphs = (group.get(name) for name in GRAPH_ROWS)
    graph = max((r for r in graphs if r is not None and r.ok), key=lambda r: r.images_per_s or 0, default=None)
    threads = int(report.options.get("threads") or 0)
    native_bf16 = report.machine.get("cpu_bf16") is not False  # unknown: judged
    cores = int(report.machine.get("cpu_count") or 0)
    targets = [_ratio_target(target, group, graph, threads, native_bf16, cores) for target in RATIO_TARGETS]
    load = next(
        (r for r in report.loads if (r.model, r.precision) == (TARGET_MODEL, "fp32") and r.status == "ok"), None
    )
    targets += [_load_target(load), _hostile_target(report.hostile[0] if report.hostile else None)]
    return [t for t in targets if t.result != NOT_MEASURED]


def _hostile_target(hostile: HostileResult | None) -> TargetResult:
    ratio = hostile.p95_ratio if hostile is not None and hostile.status == "ok" else None
    return TargetResult(
        "hostile_good_p95",
        "good requests' p95 beside hostile traffic vs alone (server, `--hostile`)",
        f"<= {HOSTILE_P95_RATIO:.1f}x",
        "not measured"
        if ratio is None
        else f"{ratio:.2f}x ({hostile.beside_p95_ms:.0f} ms vs {hostile.alone_p95_ms:.0f} ms)",
        NOT_MEASURED if ratio is None else ("PASS" if ratio <= HOSTILE_P95_RATIO else "FAIL"),
    )


def _ratio_target(
    target: RatioTarget,
    group: dict[str, RowResult],
    graph: RowResult | None,
    threads: int = 0,
    native_bf16: bool = True,
    cores: int = 0,
) -> TargetResult:
    def figure(row: RowResult | None) -> float | None:
        if target.versus == GRAPH:
            return _relative(row, graph)
        if target.versus.startswith("graph-"):  # a precision's own engine row
            return _relative(row, group.get(target.versus))
        return _ratio(row, f"vs_{target.versus}")

    if target.best_of or target.candidates:
        names = target.candidates or [name for name in group if name.startswith(target.row)]
        candidates = [group[name] for name in names if name in group and group[name].ok]
        row = max(candidates, key=lambda r: figure(r) or 0, default=None)
    else:
        row = group.get(target.row)
    value = figure(row)
    draft = figure(group.get(target.draft)) if target.draft else None
    exact = figure(group.get(target.exact)) if target.exact else None
    reference = graph if target.versus == GRAPH else group.get(REFERENCE_ROWS.get(target.versus, target.versus))
    ceiling = exact_ceiling = None
    if target.ceiling and row is not None:
        ceiling = _relative_value(pipeline_ceiling(row.row, group, graph, threads), reference)
        if target.exact:
            exact_ceiling = _relative_value(pipeline_ceiling(row.row, group, graph, threads, exact=True), reference)
    extra = _extras(draft, ceiling, exact, exact_ceiling)
    if target.candidates and row is not None:
        extra = f" ({row.label}){extra}"
    verdict = "PASS" if value is not None and value >= target.threshold else "FAIL"
    busy = busy_reason([row, reference], cores)
    if target.needs_bf16 and not native_bf16:
        verdict, extra = NOT_THIS_CPU, f"{extra}: {NO_NATIVE_BF16}"
    elif busy:
        verdict, extra = BUSY, f"{extra}; not judged: {busy}"
    return TargetResult(
        target.key,
        f"{target.name} ({TARGET_MODEL}, {TARGET_SIZE}, batch {TARGET_BATCH})",
        f">= {target.threshold:.2f}x",
        "not measured" if value is None else f"{_shown_against(value, target.threshold)}x{extra}",
        NOT_MEASURED if value is None else verdict,
    )


def _shown_against(value: float, threshold: float) -> str:
    """`value` to two decimals, or three where two would round it onto `threshold` from either
    side (3.997 against 4.0 is not met, and must not read as 4.00)."""
    shown = f"{value:.2f}"
    return f"{value:.3f}" if float(shown) == threshold and value != threshold else shown


def busy_reason(rows: list[RowResult | None], cores: int) -> str | None:
    """Why a ratio between `rows` cannot be judged (the machine was busy), or None.

    Busy: in a measured round of one of them, other processes kept more than half the `cores`
    busy; or their shares of the machine's busy CPU time are more than 20% apart (one row had
    to share the cores, the other did not). Rows measured without /proc/stat are judged."""
    measured = [r for r in rows if r is not None and r.ok]
    limit = cores * MAX_OTHERS_SHARE_OF_CORES
    for row in measured:
        if cores and row.others_cores is not None and row.others_cores > limit:
            return (
                f"other processes kept {row.others_cores:.2f} of the {cores} cores busy during a round of "
                f"{row.label} (at most {limit:g})"
            )
    shared = [r for r in measured if r.cpu_share]
    if len(shared) >= 2:
        low, high = min(shared, key=lambda r: r.cpu_share), max(shared, key=lambda r: r.cpu_share)
        if high.cpu_share > low.cpu_share * (1 + MAX_CPU_SHARE_SPREAD):
            return (
                f"{high.label} got {high.cpu_share:.0%} of the machine's busy CPU time, {low.label} "
                f"{low.cpu_share:.0%} (more than {MAX_CPU_SHARE_SPREAD:.0%} apart)"
            )
    return None


# The engine (row (b)) of each pyfunc row: the graph alone, on the same model and runtime.
ENGINE_OF = {"pyfunc": GRAPH, "pyfunc-int8": "graph-int8", "pyfunc-bf16": "graph-bf16", "pyfunc-fp16": "graph-fp16"}


def pipeline_ceiling(
    row_name: str, group: dict[str, RowResult], graph: RowResult | None, threads: int, exact: bool = False
) -> float | None:
    """The most images/s the pyfunc row `row_name` can reach on `threads` cores: its engine's
    core-seconds per image plus its model's default decode (JPEG draft mode for int8 and bf16
    models that decode so, exact otherwise; `exact`: the exact decode), on the same cores, with
    decoding and inference overlapped perfectly (`decode_bound`). None when not measured."""
    name = ENGINE_OF.get(row_name)
    engine = graph if name == GRAPH else group.get(name or "")
    if engine is None or not engine.ok or not engine.images_per_s:
        return None
    decode_ms = engine.decode_ms if exact or engine.draft_decode_ms is None else engine.draft_decode_ms
    if not exact and name != GRAPH and engine.draft_decode_ms is None:
        return None  # the default decode of a draft-mode model was not measured: no ceiling shown
    ratio = decode_bound(engine, threads, decode_ms)
    return None if ratio is None else ratio * engine.images_per_s


def _relative_value(images_per_s: float | None, reference: RowResult | None) -> float | None:
    if images_per_s is None or reference is None or not reference.ok or not reference.images_per_s:
        return None
    return images_per_s / reference.images_per_s


def _load_target(load: LoadResult | None) -> TargetResult:
    seconds = load_seconds(load)
    return TargetResult(
        "load_to_first_prediction",
        f"load to first prediction ({TARGET_MODEL} fp32, registered; after `import mlflow`)",
        f"<= {LOAD_TARGET_SECONDS:.1f} s",
        "not measured"
        if seconds is None
        else f"{seconds:.2f} s (from process start {load.seconds:.2f} s, "
        f"of which interpreter and imports {load.seconds - seconds:.2f} s)",
        NOT_MEASURED if seconds is None else ("PASS" if seconds <= LOAD_TARGET_SECONDS else "FAIL"),
    )


def load_seconds(load: LoadResult | None) -> float | None:
    """`mlflow.pyfunc.load_model(models:/...)` to the first prediction: the registry lookup, the
    artifact download, the session and one predict. Starting the interpreter and `import
    mlflow` (the same for every MLflow model) are reported beside it."""
    if load is None or load.load_s is None or load.predict_s is None:
        return None
    return load.load_s + load.predict_s


def decode_bound(onnxruntime_row: RowResult | None, threads: int, decode_ms: float | None = None) -> float | None:
    """The highest (c) / (b) ratio the decode allows on `threads` cores (the exact decode row (b)
    measured, or `decode_ms`).

    Row (b) spends cores_busy / images_per_s core-seconds per image; the pyfunc must also decode
    and preprocess each image (decode_ms, on one core), on the same cores:
    (c) <= threads / (cores_busy / (b) + decode), so (c) / (b) <= threads / (cores_busy + decode x (b)).
    """
    row = onnxruntime_row
    decode_ms = row.decode_ms if row is not None and decode_ms is None else decode_ms
    if row is None or not row.ok or not threads or None in (decode_ms, row.cores_busy, row.images_per_s):
        return None
    return min(1.0, threads / (row.cores_busy + decode_ms / 1000.0 * row.images_per_s))


def _relative(row: RowResult | None, reference: RowResult | None) -> float | None:
    if (
        row is None
        or reference is None
        or not row.ok
        or not reference.ok
        or not row.images_per_s
        or not reference.images_per_s
    ):
        return None
    return row.images_per_s / reference.images_per_s


def _extras(
    draft: float | None, ceiling: float | None, exact: float | None = None, exact_ceiling: float | None = None
) -> str:
    parts = []
    if ceiling is not None:
        parts.append(f"decode-bound ceiling {ceiling:.2f}x")
    if draft is not None:
        parts.append(f"with jpeg_draft {draft:.2f}x")
    if exact is not None:
        parts.append(
            f"exact decode {exact:.2f}x" + ("" if exact_ceiling is None else f", its ceiling {exact_ceiling:.2f}x")
        )
    return f" ({'; '.join(parts)})" if parts else ""


def _ratio(row: RowResult | None, name: str) -> float | None:
    return getattr(row, name) if row is not None and row.ok else None
