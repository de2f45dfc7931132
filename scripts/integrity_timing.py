"""What checking a model before any of its code runs costs, next to what loading it costs anyway.

    python scripts/integrity_timing.py --model demo|RN50 [--rounds 7] [--work-dir DIR]

Saves the model once into the work dir (RN50: published dimensions, random weights, with its text
encoder), then times, as medians over rounds alternating in fresh processes:
- the installed library's check of the whole directory against its manifest (what
  `mlflow_clip.load_model`, `mlflow-clip serve` and the Spark helper run), with and without
  Python's own bytecode caches of every module under `code/` (each one proven its source's);
- opening the graphs in onnxruntime (what every load pays after it);
- importing the model's serving package as MLflow's loader does: from verified source (the
  default), and unchecked (`MLFLOW_CLIP_VERIFY=0`) with and without Python's bytecode caches.
"""

from __future__ import annotations

import argparse
import json
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = ["a person", "a car", "a dog", "a cat", "a bird", "a tree", "a house", "a boat", "a bicycle", "a flower"]

CHECK = r"""
import json, sys, time
from mlflow_clip.serving.manifest import check_manifest
started = time.perf_counter(); check_manifest(sys.argv[1]); checked = time.perf_counter() - started
import onnxruntime as ort
started = time.perf_counter()
for name in ("model.onnx", "text_encoder.onnx"):
    ort.InferenceSession(sys.argv[1] + "/" + name, providers=["CPUExecutionProvider"])
print("TIMING " + json.dumps({"check": checked, "onnxruntime": time.perf_counter() - started}))
"""

IMPORT = r"""
import importlib, json, sys, time
sys.path.insert(0, sys.argv[1] + "/code")
import yaml, numpy, pandas, PIL.Image, onnxruntime, mlflow  # what the package imports, loaded first
started = time.perf_counter()
importlib.import_module(sys.argv[2] + ".loader")
print("TIMING " + json.dumps({"import": time.perf_counter() - started}))
"""


def build(model: str, work_dir: Path) -> Path:
    target = work_dir / model / "model"
    if (target / "MLmodel").exists():
        return target
    import mlflow_clip
    from mlflow_clip.export.job import build_classifier

    out = work_dir / model / "build"
    if model == "demo":
        from mlflow_clip.demo_data import DEMO_CLASSES

        built = build_classifier(DEMO_CLASSES, model="demo", templates="ensemble", out_dir=out)
    else:
        from mlflow_clip.export.checkpoints import save_random_checkpoint

        checkpoint = save_random_checkpoint(model, out / f"{model}.pt")
        built = build_classifier(CLASSES, model=str(checkpoint), templates="photo", out_dir=out)
    mlflow_clip.save_model(built.onnx_path, target, text_encoder=built.text_encoder_path)
    shutil.rmtree(out)
    return target


def _run(script: str, *args: str, **env: str) -> dict:
    environment = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.split("TIMING ", 1)[1])


def measure(model_dir: Path, rounds: int) -> dict[str, float]:
    from mlflow_clip.serving.manifest import read_mlmodel

    package = read_mlmodel(model_dir)["flavors"]["mlflow_clip"]["serving_package"]
    cached = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(model_dir, cached)
    for source in (cached / "code").rglob("*.py"):
        py_compile.compile(str(source), doraise=True)  # Python's own caches, as an import writes them
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        rows = {
            "check, no caches": _run(CHECK, str(model_dir)),
            "check, every module cached": _run(CHECK, str(cached)),
            "import, verified source": _run(IMPORT, str(model_dir), package, PYTHONDONTWRITEBYTECODE="1"),
            "import, unchecked, from caches": _run(IMPORT, str(cached), package, MLFLOW_CLIP_VERIFY="0"),
            "import, unchecked, no caches": _run(
                IMPORT, str(model_dir), package, MLFLOW_CLIP_VERIFY="0", PYTHONDONTWRITEBYTECODE="1"
            ),
        }
        for name, figures in rows.items():
            for key, seconds in figures.items():
                samples.setdefault(f"{name}: {key}" if key != "import" else name, []).append(seconds)
    shutil.rmtree(cached.parent)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "mlflow-clip" / "integrity-timing"))
    args = parser.parse_args()
    model_dir = build(args.model, Path(args.work_dir))
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    print(f"{args.model}: {size / 1e6:.0f} MB in {model_dir}")
    for name, seconds in measure(model_dir, args.rounds).items():
        print(f"  {name}: {1000 * seconds:.0f} ms")


if __name__ == "__main__":
    main()
