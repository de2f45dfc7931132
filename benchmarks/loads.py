"""Load to first prediction: a registered model loaded from scratch in a fresh interpreter, as a
user would, timed from before the interpreter starts (so imports count)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.models import model_slug, registry_uri
from benchmarks.options import BenchmarkOptions
from benchmarks.results import LoadResult
from benchmarks.worker import child_env

# A registered model from scratch in a fresh interpreter, as a user would: the clock starts
# before the interpreter does (the parent's time.time()), so imports count.
_LOAD_SCRIPT = """
import json, resource, sys, time
began = time.time()
import mlflow, pandas as pd
imported = time.time()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.time()
with open(sys.argv[2], "rb") as image:
    model.predict(pd.DataFrame({"image": [image.read()]}))
predicted = time.time()
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]  # exec resets it
with open(sys.argv[3], "w") as out:
    json.dump({"began": began, "imported": imported, "loaded": loaded, "predicted": predicted,
               "peak_rss_mb": (peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}, out)
"""


def run_loads(
    options: BenchmarkOptions, builds: dict, image: Path, progress: Callable[[str], None]
) -> list[LoadResult]:
    """Load to first prediction for every built model and precision of the run."""
    results = []
    for model in options.models:
        for precision in ["fp32", *(options.precisions if "precision" in options.rows else ())]:
            info = builds.get((model, precision), {})
            if info.get("status") != "ok":
                continue
            result = measure_load(options, info["model_uri"], image, model, precision)
            results.append(result)
            progress(
                f"{model} {precision} load to first prediction: "
                + (f"{result.seconds:.2f} s" if result.status == "ok" else f"{result.status}: {result.note}")
            )
    return results


def measure_load(options: BenchmarkOptions, model_uri: str, image: Path, model: str, precision: str) -> LoadResult:
    """Process start to first prediction for a registered model, in fresh interpreters."""
    result = LoadResult(model, precision, model_uri)
    env = child_env(
        {"MLFLOW_TRACKING_URI": registry_uri(options.work_dir), "MLFLOW_REGISTRY_URI": registry_uri(options.work_dir)}
    )
    out = options.work_dir / "logs" / f"load-{model_slug(model)}-{precision}.json"
    parts = []
    for _ in range(max(1, options.load_repeats)):
        out.unlink(missing_ok=True)
        spawned = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, model_uri, str(image), str(out)],
            env=env,
            cwd=options.work_dir,
            capture_output=True,
            text=True,
            timeout=options.child_timeout,
        )
        if proc.returncode != 0 or not out.exists():
            result.status = "not runnable" if precision == "fp16" else "failed"
            result.note = " | ".join(proc.stderr.strip().splitlines()[-2:])[-600:]
            return result
        times = json.loads(out.read_text())
        result.runs.append(times["predicted"] - spawned)
        parts.append(times)
    result.seconds = statistics.median(result.runs)
    middle = parts[result.runs.index(sorted(result.runs)[len(result.runs) // 2])]
    result.imports_s = middle["imported"] - middle["began"]
    result.load_s = middle["loaded"] - middle["imported"]
    result.predict_s = middle["predicted"] - middle["loaded"]
    result.peak_rss_mb = max(p["peak_rss_mb"] for p in parts)
    return result
