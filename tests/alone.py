"""Tests marked `alone` run with no other test beside them when the suite runs on several
workers (`python -m pytest -n auto`, pytest-xdist); every other test runs beside any other.

Most of the suite waits on subprocesses, servers and imports and leaves a core idle, so the full
suite runs on every core. What cannot share the machine is marked `alone`: ratios timed side by
side (decoding against its estimate, the benchmark, which refuses to judge on a busy machine),
and waits bounded in seconds after a SIGKILL. Those hold an exclusive lock for their whole
protocol (setup, call, teardown); every other test holds it shared. A worker that wants it
exclusive first takes a turnstile, so that the other workers' next tests wait behind it instead
of starving it. Without xdist (one process) nothing is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: runs with no other test at the same time under pytest-xdist (timing, load-sensitive)"
    )


@contextlib.contextmanager
def _held(folder: Path, exclusive: bool) -> Iterator[None]:
    with open(folder / "turnstile", "a+") as turnstile, open(folder / "tests", "a+") as tests:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(tests, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)  # the next worker's test may come in beside this one
        try:
            yield
        finally:  # unlocked explicitly: a child forked during the test may still hold the files open
            fcntl.flock(tests, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


_FOLDER = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """On the controller, for each xdist worker: the folder of this run's locks."""
    stash = node.config.stash
    if _FOLDER not in stash:
        stash[_FOLDER] = tempfile.mkdtemp(prefix="mlflow-clip-tests-")
    node.workerinput["mlflow_clip_locks"] = stash[_FOLDER]


def _lock_folder(config) -> Path | None:
    """The folder of this run's locks, shared by its workers; None outside xdist."""
    workerinput = getattr(config, "workerinput", None)
    return Path(workerinput["mlflow_clip_locks"]) if workerinput else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    folder = _lock_folder(item.config)
    if folder is None:
        yield
        return
    with _held(folder, exclusive=item.get_closest_marker("alone") is not None):
        yield


def pytest_unconfigure(config):
    if _FOLDER in config.stash:
        shutil.rmtree(config.stash[_FOLDER], ignore_errors=True)
