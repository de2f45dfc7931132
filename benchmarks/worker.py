"""Child processes: every row, build and soak runs in a fresh interpreter of its own (so its
peak RSS is its own), started as `python -m benchmarks.child TASK SPEC RESULT [FD]` with the
checkout on its `PYTHONPATH` (the harness is not installed: it runs from a checkout).

The spec is a JSON file; the child writes its result as JSON. A one-shot task (`run_child`)
runs and exits. A row task (`RowProcess`) sets up and warms up, writes "ready" to the reply
pipe (file descriptor FD), then runs one measured round per "round MIN_REQUESTS MIN_SECONDS
MAX_REQUESTS" line on its stdin, answering "done", until "finish".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from benchmarks.measure import process_tree, self_peak_rss_mb

# The module every child process runs (`python -m`): it maps task names to the tasks.
CHILD_MODULE = "benchmarks.child"
# The checkout that holds this harness (`benchmarks/` is a top-level folder, not installed).
CHECKOUT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: no MLflow run or inference config inherited, this interpreter first
    on PATH, and not the checkout on PYTHONPATH (a server runs the installed package and the
    model's own code, as a user's would)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.pop("MLFLOW_PYFUNC_INFERENCE_CONFIG", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != CHECKOUT]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def harness_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the harness's own children (`python -m benchmarks.child`): `child_env`
    with the checkout first on PYTHONPATH, so that `benchmarks` imports from any working directory."""
    env = child_env(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants (found in /proc)."""
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a child and its descendants, wait up to `grace` seconds, then SIGKILL what is left."""
    members = process_tree(proc.pid)
    kill_tree(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for member in members:
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_child(task: str, spec: dict[str, Any], work_dir: Path, name: str, timeout: float) -> dict:
    """Run one-shot `task` in a fresh child (`CHILD_MODULE`); its JSON result, or a failure."""
    spec_path, result_path, log_path = _task_files(work_dir, name, spec)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, task, str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=harness_env(),
            cwd=work_dir,
            preexec_fn=die_with_parent,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_tree(proc, grace=5)
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s (log: {log_path})"}
        except BaseException:  # e.g. Ctrl-C: take the row and its server down too
            stop_tree(proc, grace=5)
            raise
    if result_path.exists():
        return json.loads(result_path.read_text())
    return _exit_failure(proc.returncode, log_path)


def _task_files(work_dir: Path, name: str, spec: dict[str, Any]) -> tuple[Path, Path, Path]:
    """A child's spec (written now), result (a stale one removed) and log files, in work_dir/logs."""
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    spec_path, result_path, log_path = (logs / f"{stem}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    return spec_path, result_path, log_path


def _exit_failure(returncode: int | None, log_path: Path) -> dict[str, Any]:
    """The failure of a child that left no result: its exit code and the end of its log."""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {"status": "failed", "error": f"exit code {returncode}: {' | '.join(tail)[-600:]} (log: {log_path})"}


class RowProcess:
    """A row's own child process: set up once (load, warm up), then measured in rounds that the
    parent interleaves with the other rows' rounds, so a change in background load hits every
    row alike."""

    def __init__(self, task: str, spec: dict[str, Any], work_dir: Path, name: str, timeout: float):
        spec_path, self.result_path, self.log_path = _task_files(work_dir, name, spec)
        self.timeout = timeout
        self.failure: dict[str, Any] | None = None
        read_fd, write_fd = os.pipe()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, task, str(spec_path), str(self.result_path), str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                pass_fds=(write_fd,),
                env=harness_env(spec.get("env")),
                cwd=work_dir,
                preexec_fn=die_with_parent,
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")

    def wait_ready(self) -> bool:
        return self._expect("ready")

    def run_round(self, min_requests: int, min_seconds: float, max_requests: int) -> bool:
        if self.failure:
            return False
        try:
            self.proc.stdin.write(f"round {min_requests} {min_seconds} {max_requests}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reply (end of file) tells what happened
        return self._expect("done")

    def finish(self) -> dict[str, Any]:
        if not self.failure:
            try:
                self.proc.stdin.write("finish\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=self.timeout)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                stop_tree(self.proc, grace=5)
        with contextlib.suppress(OSError):  # a child that failed at set-up still has its stdin open
            self.proc.stdin.close()
        self.replies.close()
        return self.failure or self._result()

    def kill(self) -> None:
        stop_tree(self.proc, grace=5)
        self.replies.close()

    def _expect(self, word: str) -> bool:
        import select

        readable, _, _ = select.select([self.replies], [], [], self.timeout)
        line = self.replies.readline() if readable else None
        if line is not None and line.strip() == word:
            return True
        if line is None:
            stop_tree(self.proc, grace=5)
            self.failure = {
                "status": "failed",
                "error": f"no answer within {self.timeout:.0f} s (log: {self.log_path})",
            }
            return False
        self.proc.wait()  # end of file: the child has finished, most likely with an error
        self.failure = self._result()
        return False

    def _result(self) -> dict[str, Any]:
        if self.result_path.exists():
            result = json.loads(self.result_path.read_text())
            if result.get("status") == "ok" or result.get("error"):
                return result
        return _exit_failure(self.proc.returncode, self.log_path)


def child_main(
    argv: Sequence[str],
    row_tasks: Mapping[str, Callable[[dict], Any]],
    one_shot_tasks: Mapping[str, Callable[[dict], dict]],
) -> int:
    """A child's main: run the task named by `argv`, write its result (or its failure) as JSON."""
    task, spec_path, result_path, *reply_fd = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        if task in row_tasks:
            result = {"status": "ok", **_serve_rounds(row_tasks[task], spec, int(reply_fd[0]))}
        else:
            result = {"status": "ok", **one_shot_tasks[task](spec)}
        code = 0
    except Exception as e:
        import traceback

        traceback.print_exc()
        result, code = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}"}, 1
    result["peak_rss_mb"] = result.get("peak_rss_mb", self_peak_rss_mb())
    Path(result_path).write_text(json.dumps(result))
    return code


def _serve_rounds(setup: Callable[[dict], Any], spec: dict[str, Any], reply_fd: int) -> dict[str, Any]:
    """Child side of `RowProcess`: set up, say "ready", run each "round" asked for, "done"."""
    with os.fdopen(reply_fd, "w", buffering=1) as replies:
        runner = setup(spec)
        try:
            replies.write("ready\n")
            for line in sys.stdin:
                command, *args = line.split()
                if command != "round":
                    break
                runner.run_round(int(args[0]), float(args[1]), int(args[2]))
                replies.write("done\n")
            return runner.result()
        finally:
            runner.close()
