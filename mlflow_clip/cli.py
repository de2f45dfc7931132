"""`mlflow-clip`: the same jobs as the MLproject entry points, as a command-line tool.

Thin click commands that parse arguments, call library functions and print; heavy imports
(torch, clip) happen inside the commands that need them. Every error mlflow-clip raises on
purpose (`MlflowClipError`: bad input, a failed gate) is one line on stderr and exit code 2.

    $ mlflow-clip export --model demo --classes "a red circle,a blue square"
"""

from __future__ import annotations

import logging

import click

USER_ERROR_EXIT_CODE = 2


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        from mlflow_clip.errors import MlflowClipError

        try:
            return super().invoke(ctx)
        except MlflowClipError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(USER_ERROR_EXIT_CODE)


def _version() -> str:
    from mlflow_clip.version import __version__

    return __version__


def _use_experiment(name: str) -> None:
    """Runs this command starts go to experiment `name` (created if missing); under `mlflow run`,
    whose run is already open, `mlflow run --experiment-name` chooses instead."""
    import os

    if name and not os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        mlflow.set_experiment(name)


_EXPERIMENT_OPTION = click.option(
    "--experiment-name",
    "--experiment_name",
    default="",
    help="Record the run in this experiment (created if missing). [default: MLflow's active experiment]",
)


@click.group(cls=_Commands)
@click.version_option(_version(), "--version", prog_name="mlflow-clip", message="%(prog)s %(version)s")
@click.option("--verbose", "-v", is_flag=True, help="Also log what each step does, at DEBUG level.")
def cli(verbose: bool) -> None:
    """Ship CLIP zero-shot image classifiers through MLflow."""
    # Progress is printed once, as [mlflow-clip] lines; the library's own log lines are for -v.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@cli.command("export")
@click.option(
    "--classes", required=True, help="Comma-separated class names, or @path to a UTF-8 file with one per line."
)
@click.option(
    "--model",
    default="RN50",
    show_default=True,
    help="A CLIP model name, 'demo', a local checkpoint path, or open_clip:<architecture> (with --checkpoint).",
)
@click.option(
    "--checkpoint", default="", help="open_clip:<architecture> only: the local weights file (nothing is downloaded)."
)
@click.option(
    "--templates",
    default="ensemble",
    show_default=True,
    help="none, photo, ensemble, or @path to a file of templates with {}.",
)
@click.option(
    "--registered-model-name",
    "--registered_model_name",
    default="clip-zero-shot",
    show_default=True,
    help="Registered model to add a version to ('' to skip registering).",
)
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (12 or newer).")
@click.option(
    "--images", default="", help="Folder of sample images for the parity check (default: the package's samples)."
)
@click.option(
    "--max-prob-diff",
    "--max_prob_diff",
    default=None,
    type=float,
    help="Parity gate: largest allowed |ONNX - PyTorch| probability. "
    "[default: per precision: fp32 1e-4, fp16 1e-2, int8 0.1, bf16 1e-2]",
)
@click.option("--alias", default="", help="Alias to set on the new version, e.g. challenger.")
@click.option(
    "--text-encoder",
    "--text_encoder",
    default="true",
    type=click.BOOL,
    show_default=True,
    help="Also ship CLIP's text encoder (per-request labels, text embeddings).",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "fp16", "int8", "bf16"]),
    help="fp16 for GPU providers, int8 (onnxruntime quantization) for CPUs, bf16 (OpenVINO; pays on CPUs with "
    "native bf16).",
)
@click.option(
    "--truncate",
    default="false",
    type=click.BOOL,
    show_default=True,
    help="Keep CLIP's cut of prompts longer than its context instead of refusing them.",
)
@_EXPERIMENT_OPTION
def export_command(
    classes,
    model,
    checkpoint,
    templates,
    registered_model_name,
    opset,
    images,
    max_prob_diff,
    alias,
    text_encoder,
    precision,
    truncate,
    experiment_name,
) -> None:
    """Export CLIP as a parity-checked ONNX zero-shot classifier and register it."""
    from mlflow_clip.export.spec import ExportSpec

    spec = ExportSpec.create(  # every argument checked before torch is imported
        classes=classes,
        model=model,
        templates=templates,
        registered_model_name=registered_model_name or None,
        opset=opset,
        images=images or None,
        max_prob_diff=max_prob_diff,
        alias=alias or None,
        text_encoder=text_encoder,
        precision=precision,
        truncate=truncate,
        checkpoint=checkpoint or None,
    )
    _use_experiment(experiment_name)
    from mlflow_clip.export.job import run_export

    result = run_export(spec)
    report = result.parity
    click.echo(
        f"run {result.run_id}: {result.model_uri}"
        + (
            f" registered as {result.registered_model_name} version {result.model_version}"
            if result.model_version
            else ""
        )
        + f"\nparity: max |dp| {report.max_abs_prob_diff:.2e}, max |dlogit| {report.max_abs_logit_diff:.2e}, "
        f"top-1 agreement {report.top1_agreement:.3f}, max |dpixel| {report.max_abs_pixel_diff:.1e}"
    )


@cli.command("promote")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True)
@click.option(
    "--version",
    required=True,
    help="A version number (3), or an alias naming one (challenger; @3 for an all-digit alias).",
)
@click.option("--alias", default="production", show_default=True)
@click.option("--max-prob-diff", "--max_prob_diff", default="", help="Parity gate (default: the export's own).")
@click.option(
    "--max-accuracy-drop",
    "--max_accuracy_drop",
    default="",
    help="Accuracy gate vs the current holder (off by default).",
)
@click.option(
    "--allow-missing-accuracy",
    "--allow_missing_accuracy",
    default="false",
    type=click.BOOL,
    show_default=True,
    help="With --max-accuracy-drop: pass when a version has no recorded accuracy instead of refusing.",
)
@click.option("--copy-to", "--copy_to", default="", help="Copy the version into this registered model first.")
@click.option(
    "--allow-legacy",
    "--allow_legacy",
    default="false",
    type=click.BOOL,
    show_default=True,
    help="Accept a version saved by mlflow-clip 0.1.0 (no manifest) on its graph's checksum alone.",
)
@click.option(
    "--experiment-name", "--experiment_name", default="", help="Record the promotion as a run of this experiment."
)
def promote_command(
    model_name,
    version,
    alias,
    max_prob_diff,
    max_accuracy_drop,
    allow_missing_accuracy,
    copy_to,
    allow_legacy,
    experiment_name,
) -> None:
    """Gate a version and point an alias (default: production) at it."""
    from mlflow_clip.registry import GateThresholds, PromotionError
    from mlflow_clip.registry.runs import promote_in_run

    thresholds = GateThresholds(
        max_prob_diff=_optional_float(max_prob_diff),
        max_accuracy_drop=_optional_float(max_accuracy_drop),
        allow_legacy=allow_legacy,
        allow_missing_accuracy=allow_missing_accuracy,
    )
    try:
        result = promote_in_run(model_name, version, alias, thresholds, copy_to or None, experiment_name or None)
    except PromotionError as e:
        _echo_gates(e.result.gates if e.result else [])
        raise
    _echo_gates(result.gates)
    click.echo(result.message)


def _echo_gates(gates) -> None:
    for gate in gates:
        click.echo(f"gate {gate.name}: {'passed' if gate.passed else 'FAILED'}: {gate.detail}")


def _optional_float(text: str) -> float | None:
    try:
        return float(text) if str(text).strip() else None
    except ValueError:
        raise click.BadParameter(f"Received {text!r}; expected a number or nothing.") from None


@cli.command("rollback")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True)
@click.option("--alias", default="production", show_default=True)
@click.option(
    "--experiment-name", "--experiment_name", default="", help="Record the rollback as a run of this experiment."
)
def rollback_command(model_name, alias, experiment_name) -> None:
    """Move an alias back to the version that held it before the last promotion."""
    from mlflow_clip.registry.runs import rollback_in_run

    click.echo(rollback_in_run(model_name, alias, experiment_name or None).message)


@cli.command("history")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True)
@click.option("--alias", default="production", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event instead of a table.")
def history_command(model_name, alias, as_json) -> None:
    """Every promotion, rollback and refused promotion of an alias, oldest first."""
    import json
    from dataclasses import asdict

    from mlflow_clip.registry import history

    events = history(model_name, alias)
    if as_json:
        for event in events:
            click.echo(json.dumps(asdict(event), ensure_ascii=False))
        return
    if not events:
        click.echo(f"{model_name} @{alias} has no history.")
    for e in events:
        move = f"{e.previous or '-'} -> {e.version or '-'}"
        click.echo(f"{e.seq:>5}  {e.at[:23]:<23}  {e.event:<8}  {move:<14}  {e.state:<9}  {e.by}")


@cli.command("serve")
@click.option("--model-uri", "-m", required=True, help="The model to serve, e.g. models:/clip-zero-shot@production.")
@click.option("--host", "-h", default="127.0.0.1", show_default=True)
@click.option("--port", "-p", default=5000, show_default=True, type=int)
@click.option("--workers", "-w", default=1, show_default=True, type=int)
@click.option(
    "--timeout",
    "-t",
    default=60,
    show_default=True,
    type=int,
    help="Seconds per request; the model stops its work then.",
)
@click.option("--max-body-mb", default=64, show_default=True, type=int, help="Largest request body, in MiB.")
def serve_command(model_uri, host, port, workers, timeout, max_body_mb) -> None:
    """Serve a model with MLflow's scoring server behind mlflow-clip's guard for untrusted traffic."""
    from mlflow_clip.gateway import serve

    serve(model_uri, host, port, workers, timeout, max_body_mb * 1024 * 1024)


@cli.command("evaluate")
@click.option(
    "--model-uri", "--model_uri", required=True, help="The model to evaluate, e.g. models:/clip-zero-shot@challenger."
)
@click.option(
    "--data", required=True, help="A folder with one subfolder of images per class, or a CSV with path,label columns."
)
@click.option(
    "--reference",
    default="",
    help="Also evaluate CLIP's PyTorch pipeline: a CLIP model name, 'demo', or a checkpoint path.",
)
@_EXPERIMENT_OPTION
def evaluate_command(model_uri, data, reference, experiment_name) -> None:
    """Measure a model's accuracy on labelled images; record it on the registered version."""
    from mlflow_clip.evaluation import evaluate_command_impl

    _use_experiment(experiment_name)
    evaluate_command_impl(model_uri, data, reference)


@cli.command("benchmark")
@click.option(
    "--models",
    default=None,
    help="Comma-separated CLIP architectures (random weights), 'demo', or checkpoint paths. "
    "[default: RN50,ViT-B/32,demo; --quick: demo]",
)
@click.option(
    "--sizes",
    default=None,
    help="Comma-separated JPEG sizes WxH. [default: 640x480,1920x1080,4000x3000; --quick: 320x240]",
)
@click.option(
    "--batches", default=None, help="Comma-separated batch sizes (images per request). [default: 1,8,32; --quick: 4]"
)
@click.option(
    "--rows",
    default=None,
    help="Comma-separated rows: torch, onnxruntime, pyfunc, labels, server, precision, draft, load, settings, "
    "mlserver, peers. [default: all but settings, mlserver and peers; --quick: torch,onnxruntime,pyfunc,labels,server]",
)
@click.option(
    "--precisions", default=None, help="Variants for the precision rows: int8, fp16, bf16. [default: int8,fp16]"
)
@click.option(
    "--threads", default=2, show_default=True, type=int, help="Threads for every row (torch, onnxruntime, pyfunc)."
)
@click.option(
    "--quick", is_flag=True, help="A smoke run under a minute: demo model, 320x240, batch 4, the pipeline rows."
)
@click.option(
    "--work-dir",
    default=None,
    help="Cache of models, checkpoints, images and logs. [default: ~/.cache/mlflow-clip/benchmark]",
)
@click.option(
    "--requests", type=int, default=None, help="Measured requests per row, at least. [default: 5; --quick: 3]"
)
@click.option(
    "--seconds", type=float, default=None, help="Measured seconds per row, at least. [default: 10; --quick: 0]"
)
@click.option(
    "--warmup", type=int, default=None, help="Warm-up requests per row, not counted. [default: 2; --quick: 1]"
)
@click.option(
    "--rounds",
    type=int,
    default=None,
    help="Rounds the measured requests are split into, alternating between rows. [default: 3; --quick: 2]",
)
@click.option("--server-configs", default=None, help="Server settings to compare, WORKERSxTHREADS each, e.g. 1x2,2x1.")
@click.option(
    "--server-form", default="dataframe_split", show_default=True, type=click.Choice(["dataframe_split", "inputs"])
)
@click.option(
    "--server-env",
    default=None,
    help="Environment for the servers, NAME=VALUE comma-separated, e.g. MALLOC_ARENA_MAX=2.",
)
@click.option("--soak", is_flag=True, help="Also run a sustained load on the server and sample its RSS.")
@click.option(
    "--soak-requests",
    default=None,
    help="Soak requests, one count for all soak models or one each. [default: 2000; --quick: 100]",
)
@click.option("--soak-models", default=None, help="Comma-separated models for the soak. [default: demo]")
@click.option("--soak-size", default=None, help="Image size for the soak. [default: 640x480; --quick: 320x240]")
@click.option(
    "--soak-arena",
    default="both",
    show_default=True,
    type=click.Choice(["both", "off", "on"]),
    help="onnxruntime CPU memory arena in the soak.",
)
@click.option(
    "--hostile",
    is_flag=True,
    help="Also run good requests beside hostile ones (bombs, long labels, 10 MB label sets) and compare their p95.",
)
@click.option(
    "--hostile-requests", default=None, type=int, help="Good requests per hostile phase. [default: 300; --quick: 30]"
)
@click.option(
    "--hostile-flood", default=None, type=int, help="Requests carrying 10 MB label sets. [default: 1000; --quick: 20]"
)
@click.option("--rebuild", is_flag=True, help="Export the models again instead of using the cached ones.")
@click.option("--json", "json_path", default=None, help="Write the full results as JSON to this file.")
@click.option("--write-docs", "docs_path", default=None, help="Write the Markdown page (e.g. docs/benchmark.md).")
@click.option("--mlflow", "--log-to-mlflow", "log_to_mlflow", is_flag=True, help="Log the tables to an MLflow run.")
@click.option(
    "--from-json", default=None, help="Measure nothing: read a run saved with --json (to write its docs or log it)."
)
def benchmark_command(json_path, docs_path, log_to_mlflow, from_json, **options) -> None:
    """Throughput, latency and memory: CLIP's PyTorch pipeline vs onnxruntime vs the pyfunc vs the server."""
    from mlflow_clip.bench import make_options, run_from_cli

    run_from_cli(make_options(**options), json_path, docs_path, log_to_mlflow, echo=click.echo, from_json=from_json)


def main() -> None:
    cli(prog_name="mlflow-clip")


if __name__ == "__main__":
    main()
