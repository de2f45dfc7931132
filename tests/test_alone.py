"""The `alone` marker (tests/alone.py) keeps a test apart from every other under pytest-xdist,
and leaves the rest running side by side."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers import ROOT

TESTS = textwrap.dedent(
    """
    import json, os, time
    import pytest

    def _spell(name):
        started = time.monotonic()
        time.sleep(0.6)
        with open(os.environ["SPELLS"], "a") as out:
            out.write(json.dumps([name, started, time.monotonic()]) + "\\n")

    @pytest.mark.parametrize("n", range(6))
    def test_beside(n):
        _spell(f"beside{n}")

    @pytest.mark.alone
    @pytest.mark.parametrize("n", range(2))
    def test_alone(n):
        _spell(f"alone{n}")
    """
)


def test_an_alone_test_overlaps_no_other_and_the_rest_run_side_by_side(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["alone"]\n')
    (tmp_path / "test_spells.py").write_text(TESTS)
    spells = tmp_path / "spells.jsonl"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "tests"), "SPELLS": str(spells)}
    argv = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-p", "no:randomly", "."]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    runs = [json.loads(line) for line in spells.read_text().splitlines()]
    assert len(runs) == 8

    def overlap(a, b):
        return a[1] < b[2] and b[1] < a[2]

    alone = [r for r in runs if r[0].startswith("alone")]
    beside = [r for r in runs if r[0].startswith("beside")]
    assert [(a[0], b[0]) for a in alone for b in runs if a is not b and overlap(a, b)] == []
    assert any(overlap(a, b) for i, a in enumerate(beside) for b in beside[i + 1 :]), "no two tests ran side by side"
