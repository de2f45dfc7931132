"""Concurrent predictions on the OpenVINO path never hang, with torch in the same process.

Two shard threads once blocked forever in `InferRequest.infer`, in a process that also ran torch,
on a loaded 2-core machine. The session now runs at most one request per OpenVINO stream
(`openvino_runtime.OpenVinoSession`). This test runs hundreds of concurrent predictions of
changing batch sizes (each a new input shape for the graph), with torch's OpenMP threads doing
matrix products in the same process and a busy process beside it, in a subprocess with a timeout:
a hang fails the test instead of stopping the suite. The torch thread is joined before the
script exits: left running inside a matrix product at interpreter exit, it aborted the process
(`terminate called without an active exception`) after every prediction had come back right,
in 4 of 12 runs, and in none of 8 once joined.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import has_module

from mlflow_clip.package_data import sample_image_paths

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (has_module("openvino") and has_module("torch")), reason="needs openvino and torch"),
]

CLIENTS = 8
PREDICTIONS = 320
TIMEOUT_SECONDS = 300

STRESS = r"""
import sys, threading
from concurrent.futures import ThreadPoolExecutor
import pandas as pd
import torch  # OpenMP's runtime, in the process that runs OpenVINO's TBB
import mlflow

model_dir, clients, predictions, *paths = sys.argv[1:]
images = [open(p, "rb").read() for p in paths]
model = mlflow.pyfunc.load_model(model_dir, model_config={"runtime": "openvino", "shards": 2})
assert model.get_raw_model().session.runtime == "openvino"
stop = threading.Event()

def burn():  # torch keeps both cores busy with its own threads all along
    torch.set_num_threads(2)
    a = torch.randn(384, 384)
    while not stop.is_set():
        a @ a

def labels(count):
    return model.predict(pd.DataFrame({"image": images[:count]}))["label"].tolist()

burner = threading.Thread(target=burn, daemon=True)
burner.start()
expected = {count: labels(count) for count in range(1, len(images) + 1)}
sizes = [1 + i % len(images) for i in range(int(predictions))]
with ThreadPoolExecutor(int(clients)) as pool:
    got = list(pool.map(labels, sizes))
stop.set()
burner.join()  # a thread still inside torch at interpreter exit aborts the process (C++ terminate)
wrong = sum(g != expected[n] for n, g in zip(sizes, got))
print(f"STRESS {len(got)} predictions, {wrong} wrong")
"""


def test_hundreds_of_concurrent_predictions_with_torch_loaded_finish(demo_model_dir):
    paths = [str(p) for p in sample_image_paths()][:9]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # load beside us
    try:
        done = subprocess.run(
            [sys.executable, "-c", STRESS, str(demo_model_dir), str(CLIENTS), str(PREDICTIONS), *paths],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{PREDICTIONS} concurrent predictions on OpenVINO did not finish in {TIMEOUT_SECONDS} s")
    finally:
        burner.kill()
        burner.wait()
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-500:]}\n{done.stderr[-3000:]}"
    assert f"STRESS {PREDICTIONS} predictions, 0 wrong" in done.stdout
