"""Benchmark CLIP's PyTorch pipeline against the ONNX model: in process, and served by MLflow.

    python examples/benchmark.py --quick                                        # demo model, about a minute
    python examples/benchmark.py --models RN50 --sizes 1920x1080 --batches 8    # the targets' configuration
    python examples/benchmark.py --models RN50 --sizes 1920x1080 --batches 8 --write-docs docs/benchmark.md
    python examples/benchmark.py --quick --soak                                 # + memory under sustained load
    python examples/benchmark.py                                                # the full sweep (hours)

Prints a Markdown table: images/s, p50 and p95 latency per request, peak RSS and the ratios
between rows, then the targets, the load-to-first-prediction time and the soak. Every option of
`mlflow-clip benchmark` works here (`--help` lists them). Full-size models get random weights;
models, checkpoints and images are cached in --work-dir (default ~/.cache/mlflow-clip/benchmark).
"""

from __future__ import annotations

import sys

from mlflow_clip.cli import benchmark_command


def main(argv: list[str] | None = None) -> None:
    benchmark_command.main(args=sys.argv[1:] if argv is None else argv, prog_name="python examples/benchmark.py")


if __name__ == "__main__":
    main()
