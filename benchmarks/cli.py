"""The harness's command line: `python -m benchmarks [OPTIONS]` from the root of a checkout.

Bad options are one line on stderr (the option, the value and the fix) and exit code 2.
"""

from __future__ import annotations

import sys

import click

from benchmarks.options import BenchmarkError, make_options
from benchmarks.run import run_from_cli

USAGE_EXIT_CODE = 2


@click.command("benchmark")
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
    help="Comma-separated rows: torch, torch-strong, onnxruntime, pyfunc, labels, server, precision, draft, load, "
    "settings, mlserver, peers. [default: all but settings, mlserver and peers; --quick: torch,onnxruntime,pyfunc,"
    "labels,server]",
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
@click.option(
    "--mlserver-runtimes",
    default=None,
    help="Runtimes of the MLServer rows: clip (mlflow_clip.mlserver.ClipRuntime), mlflow (mlserver_mlflow). "
    "[default: clip,mlflow]",
)
@click.option(
    "--mlserver-clients", default=None, help="Concurrent clients of the MLServer rows, e.g. 4,16. [default: 4,16]"
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
@click.option(
    "--torch-compile/--no-torch-compile",
    default=True,
    show_default=True,
    help="Let the strongest torch row try torch.compile, kept where it is faster (compiling takes minutes).",
)
@click.option("--json", "json_path", default=None, help="Write the full results as JSON to this file.")
@click.option("--write-docs", "docs_path", default=None, help="Write the Markdown page (e.g. docs/benchmark.md).")
@click.option("--mlflow", "--log-to-mlflow", "log_to_mlflow", is_flag=True, help="Log the tables to an MLflow run.")
@click.option(
    "--from-json", default=None, help="Measure nothing: read a run saved with --json (to write its docs or log it)."
)
def benchmark_command(json_path, docs_path, log_to_mlflow, from_json, **options) -> None:
    """Throughput, latency and memory: CLIP's PyTorch pipeline vs onnxruntime vs the pyfunc vs the server."""
    try:
        chosen = make_options(**options)
    except BenchmarkError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(USAGE_EXIT_CODE)
    run_from_cli(chosen, json_path, docs_path, log_to_mlflow, echo=click.echo, from_json=from_json)


def main(argv: list[str] | None = None) -> None:
    benchmark_command.main(args=argv, prog_name="python -m benchmarks")
