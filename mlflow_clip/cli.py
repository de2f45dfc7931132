"""`mlflow-clip`: the same jobs as the MLproject entry points, as a command-line tool.

Thin click commands that parse arguments, call library functions and print; heavy imports
(torch, clip) happen inside the commands that need them. Every error mlflow-clip raises on
purpose (`MlflowClipError`: bad input, a failed gate, a model that fails its check) is one line
on stderr and exit code 2, and so is MLflow's for a model, version, alias or run that does not
exist.

    $ mlflow-clip export --model demo --classes "a red circle,a blue square"
"""

from __future__ import annotations

import logging
import os
import re

import click

from mlflow_clip.registry.names import MAX_ALIAS_LENGTH, MAX_MODEL_NAME_LENGTH

USER_ERROR_EXIT_CODE = 2
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        from mlflow_clip.errors import MlflowClipError

        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if not _under_mlflow_run(ctx):
                raise
            click.echo(f"error: {_as_parameters(e.format_message(), ctx.invoked_subcommand)}", err=True)
            ctx.exit(USER_ERROR_EXIT_CODE)
        except MlflowClipError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(USER_ERROR_EXIT_CODE)
        except Exception as e:
            if not _names_something_missing(e):
                raise
            click.echo(f"error: {e.message}", err=True)  # e.g. "Model Version (name=m, version=99) not found"
            ctx.exit(USER_ERROR_EXIT_CODE)


def _under_mlflow_run(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("mlflow_run"))


def _as_parameters(message: str, command: str | None) -> str:
    """A usage error in the words of `mlflow run`, whose user typed `-P name=value`, not an
    option of a command they never ran: `'--text-encoder' / '--text_encoder'` becomes
    `-P text_encoder`."""
    named = re.sub(r"'?--([a-z][a-z0-9_-]*)'?", lambda m: "-P " + m.group(1).replace("-", "_"), message)
    named = re.sub(r"(-P \w+) / \1", r"\1", named)
    named = re.sub(r"\boptions?\b", lambda m: m.group(0).replace("option", "parameter"), named)
    where = " (docs/export.md lists the parameters)" if command == "export" else ""
    return " ".join(named.split()) + where


def _names_something_missing(error: Exception) -> bool:
    """An MLflow error about a model, version, alias or run that does not exist: the user's
    input, reported in one line like mlflow-clip's own errors (mlflow is imported only here)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST"


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
    # Progress is printed once, as [mlflow-clip] lines; the library's own log lines, and MLflow's
    # "Downloading artifacts" bars (one line of several KB in a log), are for -v.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        os.environ.setdefault(PROGRESS_BAR_ENV, "false")


def _export_options(command):
    """The export's options, each from its one definition (`mlflow_clip.export.options`), taken
    as text: `ExportSpec.create` parses and checks them, so a bad value is the same one-line
    error from `mlflow-clip export`, `mlflow run .` and Python."""
    from mlflow_clip.export.options import EXPORT_OPTIONS

    for option in reversed(EXPORT_OPTIONS):
        default = {} if option.required else {"default": option.text_default}
        command = click.option(
            *option.flags, option.name, required=option.required, metavar=option.metavar, help=option.help, **default
        )(command)
    return command


@cli.command("export")
@_export_options
@_EXPERIMENT_OPTION
def export_command(experiment_name, classes, **options) -> None:
    """Export CLIP as a parity-checked ONNX zero-shot classifier and register it.

    The model is an OpenAI CLIP name, demo, a local checkpoint file, open_clip:<architecture>
    (with --checkpoint; SigLIP and multilingual towers also with --tokenizer), or hf:<folder> (a
    Hugging Face CLIPModel or SiglipModel folder). Every option is checked
    before torch is imported. The same job as `mlflow run . -P classes=...`.
    """
    from mlflow_clip.export.spec import ExportSpec

    spec = ExportSpec.create(classes, **options)  # every argument checked before torch is imported
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
    served = (
        f"models:/{result.registered_model_name}/{result.model_version}" if result.model_version else result.model_uri
    )
    click.echo(f"serve it: mlflow models serve -m {served} --env-manager local -p 5001")


_MODEL_NAME_HELP = (
    f"The registered model (up to {MAX_MODEL_NAME_LENGTH} characters; no / : ? @, quotes, or spaces at either end)."
)
_ALIAS_RULES = f"(letters, digits, _ and -, up to {MAX_ALIAS_LENGTH} characters; not latest or v<number>)"


@cli.command("promote")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True, help=_MODEL_NAME_HELP)
@click.option(
    "--version",
    required=True,
    help="A version number (3), or an alias naming one (challenger; @3 for an all-digit alias).",
)
@click.option("--alias", default="production", show_default=True, help=f"The alias to move {_ALIAS_RULES}.")
@click.option(
    "--max-prob-diff",
    "--max_prob_diff",
    default="",
    help="Parity gate: largest allowed |ONNX - PyTorch| probability. [default: the export's own]",
)
@click.option(
    "--max-accuracy-drop",
    "--max_accuracy_drop",
    default="",
    help="Accuracy gate: largest allowed drop of eval_accuracy against the version holding the alias, "
    "e.g. 0.01. [default: off]",
)
@click.option(
    "--allow-missing-accuracy",
    "--allow_missing_accuracy",
    default="false",
    type=click.BOOL,
    show_default=True,
    help="With --max-accuracy-drop: pass when a version has no recorded accuracy instead of refusing.",
)
@click.option(
    "--copy-to",
    "--copy_to",
    default="",
    help="Copy the version into this registered model first and move the alias there (same rules as --model-name).",
)
@click.option(
    "--allow-legacy",
    "--allow_legacy",
    default="false",
    type=click.BOOL,
    show_default=True,
    help="Accept a version saved by mlflow-clip 0.1.0 (no manifest) on its graph's checksum alone.",
)
@click.option(
    "--experiment-name",
    "--experiment_name",
    default="",
    help="Record the promotion as a run of this experiment (created if missing). [default: MLflow's active one]",
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
    """Gate a version and point an alias (default: production) at it.

    The names and the version are checked first (a bad one is refused at once, and no run is
    recorded); then the gates run, each printed with its time, and the alias moves only if all
    passed. The promotion is recorded as an MLflow run and in the alias's history.
    """
    from mlflow_clip.registry.names import check_names, parse_version

    max_prob_diff, max_accuracy_drop = _optional_float(max_prob_diff), _optional_float(max_accuracy_drop)
    check_names(model_name, alias, copy_to or None, experiment_name or None)  # before MLflow is imported
    parse_version(version)
    from mlflow_clip.registry import GateThresholds, PromotionError
    from mlflow_clip.registry.runs import promote_in_run

    thresholds = GateThresholds(
        max_prob_diff=max_prob_diff,
        max_accuracy_drop=max_accuracy_drop,
        allow_legacy=allow_legacy,
        allow_missing_accuracy=allow_missing_accuracy,
    )
    try:
        result = promote_in_run(model_name, version, alias, thresholds, copy_to or None, experiment_name or None)
    except PromotionError as e:
        _echo_gates(e.result.gates if e.result else [])
        raise
    _echo_gates(result.gates)
    click.echo(result.message + _phases(result.seconds))


def _echo_gates(gates) -> None:
    for gate in gates:
        took = f" in {gate.seconds:.2f} s" if gate.seconds is not None else ""
        click.echo(f"gate {gate.name}: {'passed' if gate.passed else 'FAILED'}{took}: {gate.detail}")


def _phases(seconds: dict) -> str:
    if "total" not in seconds:
        return ""
    parts = [f"{phase} {seconds[phase]:.2f} s" for phase in ("gates", "copy", "lock", "move") if phase in seconds]
    return f" ({seconds['total']:.1f} s" + (": " + ", ".join(parts) if parts else "") + ")"


def _optional_float(text: str) -> float | None:
    try:
        return float(text) if str(text).strip() else None
    except ValueError:
        raise click.BadParameter(f"Received {text!r}; expected a number or nothing.") from None


@cli.command("rollback")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True, help=_MODEL_NAME_HELP)
@click.option("--alias", default="production", show_default=True, help=f"The alias to move back {_ALIAS_RULES}.")
@click.option(
    "--experiment-name",
    "--experiment_name",
    default="",
    help="Record the rollback as a run of this experiment (created if missing). [default: MLflow's active one]",
)
def rollback_command(model_name, alias, experiment_name) -> None:
    """Move an alias back to the version that held it before the last promotion.

    Each rollback undoes one promotion (as often as there are promotions to undo); with none
    left, the alias is removed. Recorded as an MLflow run and in the alias's history.
    """
    from mlflow_clip.registry.names import check_names

    check_names(model_name, alias, experiment_name=experiment_name or None)  # before MLflow is imported
    from mlflow_clip.registry.runs import rollback_in_run

    result = rollback_in_run(model_name, alias, experiment_name or None)
    click.echo(result.message + _phases(result.seconds))


@cli.command("history")
@click.option("--model-name", "--model_name", default="clip-zero-shot", show_default=True, help=_MODEL_NAME_HELP)
@click.option("--alias", default="production", show_default=True, help="The alias whose history to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event (every field) instead of a table.")
def history_command(model_name, alias, as_json) -> None:
    """Every promotion, rollback and refused promotion of an alias, oldest first.

    Columns: the record's sequence number, when (UTC, by the writer's clock), the event, the
    versions the alias moved from and to, the outcome (done; refused by a gate; abandoned: the
    process stopped before the alias moved), who, and for a refused promotion the failed gates.
    """
    import json
    from dataclasses import asdict

    from mlflow_clip.registry.names import check_names

    check_names(model_name, alias)  # before MLflow is imported
    from mlflow_clip.registry import history

    events = history(model_name, alias)
    if as_json:
        for event in events:
            click.echo(json.dumps(asdict(event), ensure_ascii=False))
        return
    if not events:
        click.echo(f"{model_name} @{alias} has no history.")
        return
    from mlflow_clip.registry.records import history_table

    click.echo("\n".join(history_table(events)))


@cli.command("serve")
@click.option("--model-uri", "-m", required=True, help="The model to serve, e.g. models:/clip-zero-shot@production.")
@click.option("--host", "-h", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port",
    "-p",
    default=None,
    type=int,
    help="The port to listen on. [default: 5001, or the next free one up to 5010; never 5000, mlflow ui's]",
)
@click.option("--workers", "-w", default=1, show_default=True, type=int, help="Server processes.")
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
    """Serve a model with MLflow's scoring server behind mlflow-clip's guard for untrusted traffic.

    The model is downloaded and checked before any of its code runs; the line printed then says
    where it is served. Ask it with examples/query_server.py or mlflow_clip.client.predict_files.
    """
    from mlflow_clip.gateway import choose_port, serve

    serve(model_uri, host, choose_port(host, port), workers, timeout, max_body_mb * 1024 * 1024, click.echo)


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
    "--model-uri",
    "-m",
    required=True,
    help="The model to measure: a model URI (models:/name@alias, runs:/...) or a local model directory.",
)
@click.option(
    "--images",
    default=None,
    help="A folder of images to score (its first 200, by name). [default: 16 photo-like JPEGs made here]",
)
@click.option("--size", default="1920x1080", show_default=True, help="Size of the JPEGs made here, WIDTHxHEIGHT.")
@click.option("--batch", default=8, show_default=True, type=int, help="Images per request.")
@click.option(
    "--threads", default=0, type=int, help="intra_op_num_threads for every configuration. [default: every core]"
)
@click.option(
    "--seconds", default=10.0, show_default=True, type=float, help="Measured seconds per configuration, at least."
)
@click.option(
    "--runtimes", default=None, help="Runtimes to measure: onnxruntime, openvino. [default: each one installed]"
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of tables.")
def benchmark_command(model_uri, images, size, batch, threads, seconds, runtimes, as_json) -> None:
    """Measure a model on this machine: images/s, latency, peak RSS and the decode's share, per runtime."""
    import json

    from mlflow_clip.benchmark import benchmark_model, parse_size, render_report

    chosen = [r.strip() for r in runtimes.split(",") if r.strip()] if runtimes is not None else None
    run = benchmark_model(model_uri, images, parse_size(size), batch, threads, seconds, chosen, _echo_progress)
    click.echo(json.dumps(run.to_dict(), indent=2) if as_json else render_report(run))


@cli.command("predict")
@click.option("--model-uri", "-m", required=True, help="The model, e.g. models:/clip-zero-shot@production.")
@click.argument("source")
@click.option(
    "--output", "-o", required=True, help="The table to write: .parquet, .csv or .jsonl (JSON lines), by suffix."
)
@click.option(
    "--mode",
    type=click.Choice(["full", "label", "embedding"]),
    default="full",
    show_default=True,
    help="full: label, score, probabilities; label: label and score; embedding: the image embedding.",
)
@click.option("--top-k", default=0, show_default=True, type=int, help="Also the k best labels and their scores.")
@click.option("--classes", default="", help="Comma-separated labels to classify against, instead of the model's own.")
@click.option("--templates", default="", help="Templates for --classes: none, photo, ensemble, or one with {}.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per call of the model.")
@click.option("--column", default="", help="The input table's column of image bytes or paths. [default: image, path]")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (with the same rows, for the same input).")
def predict_command(model_uri, source, output, mode, top_k, classes, templates, batch_size, column, overwrite) -> None:
    """Score or embed the images of SOURCE (a folder, a CSV of paths, or a Parquet table of image
    bytes or paths) into a table, one row per image; unreadable files get their error, and a
    stopped run resumes where it stopped."""
    from mlflow_clip.predict import PredictOptions, predict_images, print_progress

    chosen = tuple(c.strip() for c in classes.split(",") if c.strip())
    options = PredictOptions(mode, top_k, chosen, templates, batch_size, column)
    result = predict_images(model_uri, source, output, options, overwrite, print_progress)
    click.echo(
        f"[mlflow-clip] {result.rows:,} images into {result.output}: {result.rows - result.failed:,} scored, "
        f"{result.failed:,} failed (see the error column); {result.scored_now:,} this run at "
        f"{result.images_per_second:.1f} images/s"
    )


def _echo_progress(line: str) -> None:
    click.echo(line, err=True)


def main() -> None:
    """`python -m mlflow_clip.cli`, as MLproject's entry points run the commands. Under `mlflow
    run` (which sets MLFLOW_RUN_ID) a usage error names the `-P` parameter the user passed, not
    the option of a command they never typed."""
    cli(prog_name="mlflow-clip", obj={"mlflow_run": bool(os.environ.get("MLFLOW_RUN_ID"))})


if __name__ == "__main__":
    main()
