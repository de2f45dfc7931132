"""Side by side: CLIP's PyTorch pipeline, raw onnxruntime, the pyfunc and the scoring server.

One run measures every row on the same JPEGs, with the same thread count, each row in a fresh
process of its own (so its peak RSS is its own), and reports images/s, p50 and p95 latency per
request, peak RSS and the ratios between rows. It is a development harness, not part of the
installed package: run it from the root of a checkout (with the package installed, e.g.
`pip install -e ".[dev]"`):

    $ python -m benchmarks --quick                                    # demo model, small images
    $ python -m benchmarks --models RN50 --sizes 1920x1080 --batches 8 --write-docs docs/benchmark.md

(`mlflow-clip benchmark`, in the package, measures one given model on a user's machine:
`mlflow_clip/benchmark.py`.)

Rows, per model x image size x batch size:

- `torch` (a): CLIP's own `preprocess` + the PyTorch model + the same baked zero-shot head,
  from the encoded JPEG bytes (decoded with PIL), `torch.set_num_threads(threads)`.
- `torch-strong` (a+): the strongest torch a user on this CPU would run: (a) with the weights
  and batches in `channels_last`, the image tower under bf16 autocast where the CPU has native
  bf16 (fp32 elsewhere, where torch emulates bf16 slowly), and `torch.compile` where it compiles
  and is faster (`--no-torch-compile` skips trying); its label says what ran.
- `onnxruntime` (b): the exported graph on already-preprocessed float32 tensors, the same
  session settings as the pyfunc: the ceiling for our graph.
- `pyfunc` (c): `mlflow.pyfunc.load_model(dir).predict(DataFrame({"image": [bytes, ...]}))`.
- `server` (d): `mlflow models serve --env-manager local` over HTTP, 1 and 4 concurrent clients.
- `precision` (e): the pyfunc on the int8 and fp16 variants of the model (`--precisions`, also
  bf16), each with its own defaults (int8 and bf16 decode JPEGs in draft mode; with `draft`, the
  exact decode beside them).
- `draft`: the pyfunc with the `jpeg_draft` decode option, when the model offers it.
- `load`: a registered model's load-to-first-prediction time, in a fresh interpreter.
- `settings` (only when asked for): the pyfunc and (b) with one default switched back at a
  time (a shard per onnxruntime thread; onnxruntime's thread spinning on; Pillow doing the resize), to
  show what each buys.
- `mlserver` (only when asked for): `mlserver start` with MLServer's MLflow runtime (what KServe
  and Seldon run) over V2 requests, 16 concurrent clients, adaptive batching on and off, beside
  row (d) with the same 16 clients; MLServer runs in an environment of its own, built once with
  uv under the work dir.

Every measured round of every row records the row's CPU seconds (its process tree), the
machine's busy CPU seconds (`/proc/stat`) and the load average after it; a ratio target whose
rows ran while other processes held more than half the cores, or whose rows got shares of the
machine's CPU more than 20% apart, is reported as BUSY (not judged) instead of PASS or FAIL.

`--soak` adds a sustained run of the server (mixed batch sizes, several clients) that samples
the server's RSS, with onnxruntime's CPU memory arena off and on. `--hostile` runs good
requests alone and then beside clients sending decompression bombs, oversized labels and 10 MB
label sets, and compares the good requests' p95 (target: within 2x).

The harness itself needs only the serving install; torch and clip are imported by the child
processes that build models or run row (a). Its modules, each importing only those listed before it:

- `options`: `BenchmarkOptions` and the command line's parsing (`make_options`).
- `results`: the result dataclasses and `BenchmarkReport` (to and from JSON).
- `images`: the photo-like JPEGs every row scores, and which of them each request sends.
- `bombs`: decompression bombs made on the spot, as an attacker would send them.
- `measure`: /proc accounting (RSS, CPU), `RssSampler`, timed requests, the machine.
- `targets`: the targets as data, and `evaluate_targets`.
- `worker`: the child-process protocol (`run_child`, `RowProcess`, `child_main`).
- `models`: building, caching and registering the benchmark's models.
- `rows`: the in-process rows' tasks: (a) torch, (b) onnxruntime, the pyfunc rows.
- `server`: `mlflow models serve` as a row, row (d).
- `mlserver`: MLServer as a row, in its own environment, and its ratio to row (d).
- `soak`: the server under sustained load, and its RSS over time.
- `hostile`: good requests beside hostile ones, and the requests an attacker would send.
- `loads`: load to first prediction, in fresh interpreters.
- `plan`: which rows run for a model, size and batch, and their specs.
- `report`: Markdown tables, the docs page (`docs_template.md`), MLflow logging.
- `run`: `run_benchmark` and `run_from_cli` (what `python -m benchmarks` does).
- `cli`: the command line (`python -m benchmarks`, `__main__`).
- `child`: the entry point of the child processes (imported by none of the above).
"""

from benchmarks.images import make_photo_jpeg, request_images
from benchmarks.models import pyfunc_config_keys
from benchmarks.options import (
    BenchmarkError,
    BenchmarkOptions,
    ServerSettings,
    command_line,
    make_options,
    quick_options,
)
from benchmarks.report import (
    load_report,
    log_report,
    render_docs,
    render_markdown,
    report_metrics,
    write_docs,
)
from benchmarks.results import (
    BenchmarkReport,
    HostileResult,
    LoadResult,
    RowResult,
    SoakResult,
    TargetResult,
)
from benchmarks.run import compare_rows, run_benchmark, run_from_cli
from benchmarks.targets import TARGET_BATCH, TARGET_MODEL, TARGET_SIZE, decode_bound, evaluate_targets

__all__ = [
    "TARGET_BATCH",
    "TARGET_MODEL",
    "TARGET_SIZE",
    "BenchmarkError",
    "BenchmarkOptions",
    "BenchmarkReport",
    "HostileResult",
    "LoadResult",
    "RowResult",
    "ServerSettings",
    "SoakResult",
    "TargetResult",
    "command_line",
    "compare_rows",
    "decode_bound",
    "evaluate_targets",
    "load_report",
    "log_report",
    "make_options",
    "make_photo_jpeg",
    "pyfunc_config_keys",
    "quick_options",
    "render_docs",
    "render_markdown",
    "report_metrics",
    "request_images",
    "run_benchmark",
    "run_from_cli",
    "write_docs",
]
