"""The benchmark times rows side by side and refuses to judge on a busy machine: its real runs,
the slow tests here, have no test beside them (`alone`, tests/alone.py). Its other tests time
nothing and run beside any test."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/bench/" in item.nodeid and item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.alone)
