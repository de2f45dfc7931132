"""Entry point of the benchmark's child processes (see `benchmarks.worker`):

python -m benchmarks.child TASK SPEC_JSON RESULT_JSON [REPLY_FD]
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from benchmarks.hostile import task_hostile
from benchmarks.mlserver import MLServerRows
from benchmarks.models import task_build
from benchmarks.peers import task_peer_hf_model, task_peer_hf_pipeline, task_peer_open_clip, task_prepare_peers
from benchmarks.rows import task_onnxruntime, task_pyfunc, task_torch, task_torch_strong
from benchmarks.server import ServerRows
from benchmarks.soak import task_soak
from benchmarks.worker import child_main

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
    "torch-strong": task_torch_strong,
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
