"""Measure a model on this machine, then print how to serve it the fastest way measured.

    python examples/benchmark.py models:/clip-zero-shot@production
    python examples/benchmark.py ./model --images photos/ --seconds 20

The measurements of `mlflow-clip benchmark -m MODEL` (each runtime that can run the model, in a
process of its own, on photo-like JPEGs made here or on your images), used from Python.
"""

from __future__ import annotations

import argparse

from mlflow.exceptions import MlflowException

from mlflow_clip.benchmark import benchmark_model, parse_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri", help="a model URI (models:/name@alias) or a local model directory")
    parser.add_argument("--images", help="a folder of images to score (default: photo-like JPEGs made here)")
    parser.add_argument("--size", default="1920x1080", help="size of the JPEGs made here (default: 1920x1080)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per runtime (default: 10)")
    args = parser.parse_args(argv)
    try:
        run = benchmark_model(args.model_uri, args.images, parse_size(args.size), seconds=args.seconds, progress=print)
    except (MlflowException, ValueError) as e:  # no such model or images, a bad size: one line, not a trace
        raise SystemExit(f"error: {getattr(e, 'message', e)}") from None
    measured = [m for m in run.measurements if m.status == "ok"]
    if not measured:
        raise SystemExit("No runtime could run the model: " + "; ".join(m.note for m in run.measurements))
    fastest = max(measured, key=lambda m: m.images_per_s)
    print(
        f"Fastest here: {fastest.precision} on {fastest.runtime}, {fastest.images_per_s:.1f} images/s "
        f"(p95 {fastest.p95_ms:.0f} ms per {run.batch} images, peak RSS {fastest.peak_rss_mb:.0f} MB; "
        f"decoding is {fastest.decode_share:.0%} of the CPU time). Serve it so:"
    )
    print(fastest.serve)


if __name__ == "__main__":
    main()
