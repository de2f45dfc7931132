"""Entry point of the benchmark's child processes (see `mlflow_clip.bench.worker`):

python -m mlflow_clip.bench.child TASK SPEC_JSON RESULT_JSON [REPLY_FD]
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from mlflow_clip.bench.hostile import task_hostile
from mlflow_clip.bench.mlserver import MLServerRows
from mlflow_clip.bench.models import task_build
from mlflow_clip.bench.peers import task_peer_hf_model, task_peer_hf_pipeline, task_peer_open_clip, task_prepare_peers
from mlflow_clip.bench.rows import task_onnxruntime, task_pyfunc, task_torch
from mlflow_clip.bench.server import ServerRows
from mlflow_clip.bench.soak import task_soak
from mlflow_clip.bench.worker import child_main

# One-shot tasks: run, write the result, exit.
_ONE_SHOT_TASKS: dict[str, Callable[[dict], dict]] = {
    "build": task_build,
    "soak": task_soak,
    "hostile": task_hostile,
    "prepare_peers": task_prepare_peers,
}
# Row tasks: set up and warm up, answer "ready", then run measured rounds until told to finish.
_ROW_TASKS: dict[str, Callable[[dict], Any]] = {
    "torch": task_torch,
    "onnxruntime": task_onnxruntime,
    "pyfunc": task_pyfunc,
    "server": ServerRows,
    "mlserver": MLServerRows,
    "peer-open_clip": task_peer_open_clip,
    "peer-hf-model": task_peer_hf_model,
    "peer-hf-pipeline": task_peer_hf_pipeline,
}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], _ROW_TASKS, _ONE_SHOT_TASKS))
