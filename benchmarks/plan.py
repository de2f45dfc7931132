"""The row plan: which rows run for one model, image size and batch size, and the spec each
row's child process gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.models import TEMPLATES, classes_for, flavor_conf, model_slug, pyfunc_config_keys
from benchmarks.options import BenchmarkOptions, ServerSettings, size_name
from benchmarks.peers import PEER_ROWS
from benchmarks.results import RowResult
from benchmarks.rows import strong_torch_bf16, strong_torch_label
from mlflow_clip.serving import resample
from mlflow_clip.serving.preprocess import native_status

ROW_LABELS = {
    "torch": "(a) torch",
    "torch-strong": strong_torch_label(strong_torch_bf16()),  # with ", torch.compile" when that ran
    "onnxruntime": "(b) onnxruntime",
    "pyfunc": "(c) pyfunc fp32",
    "pyfunc-draft": "pyfunc fp32 jpeg_draft",
    "onnxruntime-spin": "(b) onnxruntime, spinning on",
    "pyfunc-shards": "pyfunc fp32, a shard per thread",
    "pyfunc-spin": "pyfunc fp32, spinning on",
    "pyfunc-pillow": "pyfunc fp32, Pillow resampling",
    "pyfunc-labels": "(c) pyfunc fp32, labels per request (cached)",
    # (e): each precision's model with its own defaults (int8 and bf16 decode JPEGs in draft
    # mode, PRECISION_JPEG_DRAFT), and, with the `draft` rows, the exact decode beside it.
    "graph-int8": "(b) graph int8 (its runtime)",
    "graph-bf16": "(b) graph bf16 (OpenVINO)",
    "pyfunc-int8": "(e) pyfunc int8",
    "pyfunc-int8-exact": "(e) pyfunc int8, exact decode",
    "pyfunc-fp16": "(e) pyfunc fp16",
    "pyfunc-bf16": "(e) pyfunc bf16",
    "pyfunc-bf16-exact": "(e) pyfunc bf16, exact decode",
    **PEER_ROWS,
}


def server_row(clients: int, config: ServerSettings, several: bool) -> tuple[str, str]:
    suffix = f"-{config.key}" if several else ""
    label = f"(d) server {clients} client{'s' if clients > 1 else ''}" + (f" {config.key}" if several else "")
    return f"server-{clients}c{suffix}", label


def _row(row: str, task: str, **spec: Any) -> tuple[str, str, str, dict]:
    return (row, ROW_LABELS[row], task, spec)


def row_plan(options: BenchmarkOptions, model: str, builds: dict) -> list[tuple[str, str, str, dict]]:
    """(row id, label, task, spec extras) for the in-process rows of one model."""
    fp32 = builds.get((model, "fp32"), {})
    if fp32.get("status") != "ok":
        return []
    threads = {"intra_op_num_threads": options.threads}
    keys = pyfunc_config_keys(fp32["model_dir"])
    exact = {**threads, **({"jpeg_draft": False} if "jpeg_draft" in keys else {})}
    return [
        *_baseline_rows(options, model, fp32, threads, exact, keys),
        *_setting_rows(options, fp32["model_dir"], threads, exact, keys),
        *_precision_rows(options, model, builds, threads, exact),
        *_peer_rows(options, model, fp32, builds.get((model, "peers"), {})),
    ]


def _peer_rows(options, model, fp32, peers) -> list[tuple[str, str, str, dict]]:
    """The peers, on row (a)'s weights and classes (`peers`: what `prepare_peers` wrote)."""
    if "peers" not in options.rows:
        return []
    common = {
        "model": model,
        "clip_spec": fp32["clip_spec"],
        "classes": list(classes_for(model)),
        "templates": TEMPLATES,
        "time_first": True,  # from process start to the first prediction, as for (a) and (c)
    }
    hf = {"hf_folder": peers.get("hf_folder", ""), "hf_note": peers.get("hf_note", "")}
    return [
        _row("peer-open_clip", "peer-open_clip", **common),
        _row("peer-hf-model", "peer-hf-model", **common, **hf),
        _row("peer-hf-pipeline", "peer-hf-pipeline", **common, **hf),
    ]


def _baseline_rows(options, model, fp32, threads, exact, keys) -> list[tuple[str, str, str, dict]]:
    rows, model_dir = options.rows, fp32["model_dir"]
    plan = []
    if "torch" in rows:
        plan.append(_row("torch", "torch", clip_spec=fp32["clip_spec"], head=fp32["head"], time_first=True))
    if "torch-strong" in rows:
        strong = {"clip_spec": fp32["clip_spec"], "head": fp32["head"], "torch_compile": options.torch_compile}
        plan.append(_row("torch-strong", "torch-strong", **strong, time_first=True))
    if "onnxruntime" in rows:
        plan.append(_row("onnxruntime", "onnxruntime", model_dir=model_dir, model_config=threads))
    if "pyfunc" in rows:
        plan.append(_row("pyfunc", "pyfunc", model_dir=model_dir, model_config=exact, time_first=True))
    if "labels" in rows and (Path(model_dir) / "text_encoder.onnx").exists():
        # The same classes and templates as the baked graph, sent per request: after the first
        # (warm-up) request the label set is cached, so this is the per-request labels path's cost.
        params = {"classes": list(classes_for(model)), "templates": TEMPLATES}
        plan.append(_row("pyfunc-labels", "pyfunc", model_dir=model_dir, model_config=exact, params=params))
    if "draft" in rows and "jpeg_draft" in keys:
        plan.append(_row("pyfunc-draft", "pyfunc", model_dir=model_dir, model_config={**threads, "jpeg_draft": True}))
    return plan


def _setting_rows(options, model_dir, threads, exact, keys) -> list[tuple[str, str, str, dict]]:
    """Each default setting switched back alone, side by side with the default."""
    if "settings" not in options.rows:
        return []
    plan = []
    if {"shards", "allow_spinning"} <= keys:
        plan += [
            _row(
                "onnxruntime-spin", "onnxruntime", model_dir=model_dir, model_config={**threads, "allow_spinning": True}
            ),
            _row(
                "pyfunc-shards",
                "pyfunc",
                model_dir=model_dir,
                model_config={**exact, "shards": threads["intra_op_num_threads"]},
            ),
            _row("pyfunc-spin", "pyfunc", model_dir=model_dir, model_config={**exact, "allow_spinning": True}),
        ]
    if native_status().available:  # the same pixels, by Pillow
        plan.append(
            _row("pyfunc-pillow", "pyfunc", model_dir=model_dir, model_config=exact, env={resample.ENV_VAR: "0"})
        )
    return plan


def _precision_rows(options, model, builds, threads, exact) -> list[tuple[str, str, str, dict]]:
    if "precision" not in options.rows:
        return []
    plan = []
    for precision in options.precisions:
        info = builds.get((model, precision), {})
        if info.get("status") != "ok":
            continue
        model_dir = info["model_dir"]
        if "onnxruntime" in options.rows and precision in ("int8", "bf16"):  # the graph alone, its runtime
            plan.append(
                _row(
                    f"graph-{precision}", "onnxruntime", model_dir=model_dir, model_config=threads, precision=precision
                )
            )
        plan.append(
            _row(f"pyfunc-{precision}", "pyfunc", model_dir=model_dir, model_config=threads, precision=precision)
        )
        if "draft" in options.rows and default_jpeg_draft(model_dir):
            plan.append(
                _row(
                    f"pyfunc-{precision}-exact", "pyfunc", model_dir=model_dir, model_config=exact, precision=precision
                )
            )
    return plan


def default_jpeg_draft(model_dir: str) -> bool:
    """Whether the model decodes JPEGs in draft mode unless told otherwise."""
    return bool((flavor_conf(Path(model_dir)).get("runtime") or {}).get("jpeg_draft"))


def _timing_spec(options: BenchmarkOptions, batch: int, pool: Sequence[Path]) -> dict[str, Any]:
    return {
        "batch": batch,
        "threads": options.threads,
        "warmup": options.warmup,
        "min_requests": options.min_requests,
        "min_seconds": options.min_seconds,
        "max_requests": options.max_requests,
        "images": [str(p) for p in pool],
    }


@dataclass
class Planned:
    """A child process to start for one group, and the rows its result fills."""

    task: str
    name: str
    spec: dict[str, Any]
    rows: list[tuple[RowResult, str]]  # (row, key of its result: "" or the client count)
    precision: str = "fp32"


def plan_group(
    options: BenchmarkOptions,
    model: str,
    size: tuple[int, int],
    batch: int,
    pool: Sequence[Path],
    builds: dict,
    unrunnable: dict[tuple[str, str], str],
) -> tuple[list[Planned], list[RowResult]]:
    """The child processes for one group and the rows they fill; a (model, precision) in
    `unrunnable` gets its rows marked so, without a process."""
    planned, rows = [], []
    prefix = _group_prefix((model, size_name(size), batch))
    for row_id, label, task, extra in row_plan(options, model, builds):
        row = RowResult(model, size_name(size), batch, row_id, label)
        rows.append(row)
        precision = extra.pop("precision", "fp32")
        if (model, precision) in unrunnable:
            row.status, row.note = "not runnable", unrunnable[(model, precision)]
            continue
        spec = {**_timing_spec(options, batch, pool), **extra}
        planned.append(Planned(task, f"{prefix}-{row_id}", spec, [(row, "")], precision))
    fp32 = builds.get((model, "fp32"), {})
    if fp32.get("status") == "ok":
        group = (model, size_name(size), batch)
        for item in [*_server_planned(options, fp32, group, pool), *_mlserver_planned(options, fp32, group, pool)]:
            rows += [row for row, _ in item.rows]
            planned.append(item)
    return planned, rows


def server_clients(options: BenchmarkOptions) -> list[int]:
    """Row (d)'s client counts: `clients`, and the MLServer rows' clients beside them."""
    clients = list(options.clients) if "server" in options.rows else []
    if "mlserver" in options.rows:
        clients += [c for c in options.mlserver_clients if c not in clients]
    return clients


def _group_prefix(group: tuple[str, str, int]) -> str:
    model, size, batch = group
    return f"{model_slug(model)}-{size}-b{batch}"


def _server_planned(options, fp32, group, pool) -> list[Planned]:
    """Row (d): one server per setting, measured with each client count."""
    clients = server_clients(options)
    if not clients:
        return []
    prefix, batch = _group_prefix(group), group[2]
    several = len(options.server_configs) > 1
    planned = []
    for config in options.server_configs:
        name = f"{prefix}-server-{config.key}"
        spec = {
            **_timing_spec(options, batch, pool),
            "model_dir": fp32["model_dir"],
            "workers": config.workers,
            "model_config": {"intra_op_num_threads": config.threads},
            "clients": clients,
            "form": options.server_form,
            "log": str(options.work_dir / "logs" / f"{name}.server.log"),
            "env": dict(options.server_env),
        }
        rows = [(RowResult(*group, *server_row(c, config, several)), str(c)) for c in clients]
        planned.append(Planned("server", name, spec, rows))
    return planned


MLSERVER_RUNTIME_LABELS = {"clip": "ClipRuntime", "mlflow": "MLflow runtime"}


def mlserver_row(clients: int, batching: bool, runtime: str = "mlflow") -> tuple[str, str]:
    """The id (`mlserver-16c-clip-batching`: clients second, as `note_mlserver_ratios` reads it)
    and the label of an MLServer row."""
    suffix = "batching" if batching else "nobatch"
    if not batching:
        what = "no batching"
    elif runtime == "clip":
        what = "batching per parameter set"
    else:
        what = "MLServer's adaptive batching"
    return (
        f"mlserver-{clients}c-{runtime}-{suffix}",
        f"MLServer {MLSERVER_RUNTIME_LABELS[runtime]} {clients} clients, {what}",
    )


def _mlserver_planned(options, fp32, group, pool) -> list[Planned]:
    """The MLServer rows: one `mlserver start` per runtime and batching setting, measured with
    each client count in turn, the threads of row (d)'s first setting."""
    if "mlserver" not in options.rows:
        return []
    prefix, batch = _group_prefix(group), group[2]
    batching_settings = {
        "max_batch_size": options.mlserver_max_batch_size,
        "max_batch_time": options.mlserver_max_batch_time,
    }
    planned = []
    for runtime in options.mlserver_runtimes:
        for batching in options.mlserver_batching:
            name = f"{prefix}-mlserver-{runtime}-{'batching' if batching else 'nobatch'}"
            spec = {
                **_timing_spec(options, batch, pool),
                "model_dir": fp32["model_dir"],
                "model_config": {"intra_op_num_threads": options.server_configs[0].threads},
                "clients": list(options.mlserver_clients),
                "runtime": runtime,
                "batching": batching_settings if batching else {},
                "parallel_workers": options.mlserver_parallel_workers,
                # One environment per runtime: ClipRuntime's also holds this checkout's wheel.
                "env_dir": str(options.work_dir / f"mlserver-env-{runtime}"),
                "wheel_dir": str(options.work_dir / "mlserver-wheel"),
                "repository": str(options.work_dir / "mlserver" / name),
                "log": str(options.work_dir / "logs" / f"{name}.server.log"),
                "env": dict(options.server_env),
            }
            rows = [
                (RowResult(*group, *mlserver_row(clients, batching, runtime)), str(clients))
                for clients in options.mlserver_clients
            ]
            planned.append(Planned("mlserver", name, spec, rows))
    return planned
