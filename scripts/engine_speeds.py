"""Each precision's graph on each runtime, on ready tensors, side by side on this CPU.

    python scripts/engine_speeds.py --model-dir RN50=/path/to/fp32/model --model-dir RN50:int8=/path/to/int8/model
        [--batch 8] [--threads 2] [--rounds 5] [--seconds 3]

For each tower: onnxruntime fp32, OpenVINO f32, OpenVINO bf16 (the fp32 graph at a bf16 hint),
onnxruntime int8 and OpenVINO int8 (the int8 graph), each through the serving session
(`mlflow_clip.serving.runtime.open_session`) on the same preprocessed batch, in interleaved
rounds; the table gives the median images/s, the ratio to onnxruntime fp32, the largest
probability difference from it, and the CPU flags the figures were measured on. This is what
`variants.SPEED_ORDER` and each int8 graph's runtime order rest on
(docs/decisions/precision-choice.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlflow_clip.serving.contract import ClassifierConfig  # noqa: E402
from mlflow_clip.serving.runtime import RuntimeSettings, open_session  # noqa: E402
from mlflow_clip.serving.variants import NATIVE_FLAGS, cpu_flags  # noqa: E402

ENGINES = (  # (label, graph precision, runtime, precision served)
    ("onnxruntime fp32", "fp32", "onnxruntime", "fp32"),
    ("OpenVINO f32", "fp32", "openvino", "fp32"),
    ("OpenVINO bf16", "fp32", "openvino", "bf16"),
    ("onnxruntime int8", "int8", "onnxruntime", "int8"),
    ("OpenVINO int8", "int8", "openvino", "int8"),
)


def _batch(model_dir: Path, size: int) -> np.ndarray:
    config = ClassifierConfig.read(model_dir)
    rng = np.random.default_rng(0)
    return rng.standard_normal((size, 3, config.input_resolution, config.input_resolution), dtype=np.float32)


def _rate(session, batch: np.ndarray, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2:
        session.run(batch)
        done += 1
    return done * len(batch) / (time.perf_counter() - started)


def measure_tower(graphs: dict[str, Path], args) -> list[str]:
    sessions = {}
    batch = _batch(graphs["fp32"], args.batch)
    for label, graph, runtime, precision in ENGINES:
        if graph in graphs:
            settings = RuntimeSettings(runtime=runtime, intra_op_num_threads=args.threads)
            sessions[label] = open_session(graphs[graph] / "model.onnx", settings, precision)
            sessions[label].run(batch)  # warm-up: the shape is specialised before timing
    reference = sessions["onnxruntime fp32"].run(batch)[0]
    rates: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(args.rounds):
        for label, session in sessions.items():
            rates[label].append(_rate(session, batch, args.seconds))
    base = statistics.median(rates["onnxruntime fp32"])
    rows = []
    for label, session in sessions.items():
        rate = statistics.median(rates[label])
        diff = float(np.abs(session.run(batch)[0] - reference).max())
        rows.append(f"{rate:.1f} | {rate / base:.2f}x | {diff:.1e} | {session.description}")
    return [f"| {label} | {row} |" for label, row in zip(sessions, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", action="append", required=True, help="TOWER[:PRECISION]=DIR")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    towers: dict[str, dict[str, Path]] = {}
    for item in args.model_dir:
        name, _, folder = item.partition("=")
        tower, _, precision = name.partition(":")
        towers.setdefault(tower, {})[precision or "fp32"] = Path(folder)
    flags = cpu_flags()
    shown = sorted({f for names in NATIVE_FLAGS.values() for f in names} & flags) or ["none of them"]
    print(f"CPU flags (of {sorted({f for n in NATIVE_FLAGS.values() for f in n})}): {', '.join(shown)}")
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds of {args.seconds} s, medians")
    print("| tower | engine | images/s | × onnxruntime fp32 | max prob diff | session |")
    print("|---|---|---:|---:|---:|---|")
    for tower, graphs in towers.items():
        for line in measure_tower(graphs, args):
            print(f"| {tower} {line}")


if __name__ == "__main__":
    main()
