"""Decode + preprocess of a 1920x1080 JPEG, per image, in an environment built from a model alone
(`--env-manager uv`: no mlflow-clip installed) and in this one, side by side.

    python scripts/env_resize_timing.py [--rounds 5] [--images 20]

Saves a 224-pixel classifier, builds its environment with `mlflow models prepare-env
--env-manager uv`, and times the model's own decode + preprocess in both interpreters (native
resize as the model carries it, and Pillow with MLFLOW_CLIP_NATIVE_RESAMPLE=0), alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TIMING = r"""
import io, json, sys, time
import mlflow, numpy as np
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
classifier = model.get_raw_model() if hasattr(model, "get_raw_model") else model._model_impl.get_raw_model()
from importlib import import_module
package = type(classifier).__module__.rsplit(".", 1)[0]  # the model's own serving code
no_deadline = import_module(package + ".deadline").NO_DEADLINE
images = [open(p, "rb").read() for p in sys.argv[3:]]
classifier._load(classifier._open(images[0]), no_deadline)
started = time.perf_counter()
for data in images * int(sys.argv[2]):
    classifier._load(classifier._open(data), no_deadline)  # header check, decode, resize, normalize
seconds = (time.perf_counter() - started) / (len(images) * int(sys.argv[2]))
status = import_module(package + ".preprocess").native_status()
print("TIMING " + json.dumps({"ms": 1000 * seconds, "path": status.describe()}))
"""


def _time(python: str, model: Path, images: list[Path], repeat: int, env: dict) -> dict:
    done = subprocess.run(
        [python, "-c", TIMING, str(model), str(repeat), *map(str, images)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.split("TIMING ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from helpers import build_colour_onnx

    import mlflow_clip
    from mlflow_clip.demo_data import make_photo_jpeg

    work = Path(tempfile.mkdtemp(prefix="mlflow-clip-env-timing-"))
    model = work / "model"
    mlflow_clip.save_model(build_colour_onnx(work / "colour.onnx", resolution=224), model)
    images = []
    for index in range(args.images):
        path = work / f"photo-{index}.jpg"
        path.write_bytes(make_photo_jpeg(1920, 1080, seed=index))
        images.append(path)
    env = {**os.environ, "MLFLOW_ENV_ROOT": str(work / "envs")}
    subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "prepare-env", "-m", str(model), "--env-manager", "uv"],
        check=True,
        env=env,
        capture_output=True,
        timeout=1800,
    )
    (uv_env,) = (work / "envs").glob("mlflow-*")
    pythons = {"this environment": sys.executable, "uv environment (model only)": str(uv_env / "bin" / "python")}
    results: dict[str, list[float]] = {}
    paths: dict[str, str] = {}
    for _ in range(args.rounds):
        for label, python in pythons.items():
            for resize, extra in (("native", {}), ("Pillow", {"MLFLOW_CLIP_NATIVE_RESAMPLE": "0"})):
                result = _time(python, model, images, args.repeat, {**env, **extra})
                results.setdefault(f"{label}, {resize}", []).append(result["ms"])
                paths[f"{label}, {resize}"] = result["path"]
    print("| environment, resize | decode + preprocess ms per 1920x1080 JPEG (median of rounds) | path |")
    print("|---|---|---|")
    for key, values in results.items():
        print(
            f"| {key} | {statistics.median(values):.1f} ({min(values):.1f} to {max(values):.1f}) | {paths[key][:90]} |"
        )


if __name__ == "__main__":
    main()
