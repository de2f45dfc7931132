"""The pyfunc against its own engine on ready tensors, per model, and the ceiling the cores allow.

    python scripts/pipeline_ceiling.py --model NAME=DIR [--model ...] --images DIR [--batch 8] [--rounds 5]

For each model (loaded as serving loads it, 2 threads): the engine alone on the batch already
preprocessed (images/s and the cores it keeps busy), the whole pipeline from JPEG bytes
(`ZeroShotClassifier.predict`, with its default shards and with one per thread), and the CPU one image's
decode and preprocess costs on one thread. On C cores, a pipeline can at best spend
engine-core-seconds + decode-core-seconds per image: the ceiling is
C / (engine cores busy / engine images/s + decode seconds) images/s, as a ratio of the engine's
own speed. Interleaved rounds, medians; the machine's load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow_clip  # noqa: E402
from mlflow_clip.serving.deadline import NO_DEADLINE  # noqa: E402

CORES = 2


def _timed(fn, seconds: float, images: int) -> tuple[float, float]:
    """(images/s, cores busy) of calling `fn` (which handles `images` images) for `seconds`."""
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or done < 2:
        fn()
        done += 1
    elapsed = time.perf_counter() - wall
    return done * images / elapsed, (time.process_time() - cpu) / elapsed


def _decode_seconds(classifier, data: list[bytes]) -> float:
    started = time.process_time()
    for item in data:
        classifier._load(classifier._open(item), NO_DEADLINE)
    return (time.process_time() - started) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR (a model directory)")
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    data = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))][: args.batch]
    rows = {}
    for item in args.model:
        name, _, folder = item.partition("=")
        config = {"intra_op_num_threads": CORES}
        per_thread = mlflow_clip.load_model(folder, model_config={**config, "shards": CORES})
        classifier = mlflow_clip.load_model(folder, model_config=config)
        tensors = __import__("numpy").stack([classifier._load(classifier._open(d), NO_DEADLINE) for d in data])
        rows[name] = {
            "engine": lambda c=classifier, t=tensors: c.session.run(t),
            "pyfunc": lambda c=classifier: c.predict(data),
            "pyfunc, a shard per thread": lambda c=per_thread: c.predict(data),
            "decode": lambda c=classifier: _decode_seconds(c, data),
            "label": f"{classifier.config.precision} on {classifier.session.runtime}",
        }
        for key in ("engine", "pyfunc", "pyfunc, a shard per thread"):
            rows[name][key]()  # warm-up
    results = {
        name: {k: [] for k in ("engine", "busy", "pyfunc", "pyfunc, a shard per thread", "decode")} for name in rows
    }
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, fns in rows.items():
            rate, busy = _timed(fns["engine"], args.seconds, args.batch)
            results[name]["engine"].append(rate)
            results[name]["busy"].append(busy)
            for key in ("pyfunc", "pyfunc, a shard per thread"):
                results[name][key].append(_timed(fns[key], args.seconds, args.batch)[0])
            results[name]["decode"].append(fns["decode"]())
    print(f"batch {args.batch}, {CORES} threads, {args.rounds} interleaved rounds; load average {min(loads):.2f} to "
          f"{max(loads):.2f}")  # fmt: skip
    print("| model | served | engine img/s | engine cores busy | decode + preprocess ms/img | pyfunc img/s | "
          "× engine | a shard per thread × engine | ceiling × engine |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, values in results.items():
        m = {k: statistics.median(v) for k, v in values.items()}
        ceiling = min(1.0, CORES / (m["busy"] / m["engine"] + m["decode"]) / m["engine"])
        print(
            f"| {name} | {rows[name]['label']} | {m['engine']:.1f} | {m['busy']:.2f} | {1000 * m['decode']:.1f} | "
            f"{m['pyfunc']:.1f} | {m['pyfunc'] / m['engine']:.2f}x | "
            f"{m['pyfunc, a shard per thread'] / m['engine']:.2f}x | {ceiling:.2f}x |"
        )


if __name__ == "__main__":
    main()
