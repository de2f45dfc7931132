"""The name checks on their own: each limit exactly and one past it, names matched whole, the
look-alikes and the characters MLflow's URIs cannot carry. That each accepted name then goes
through on a real PostgreSQL and SQLite server is in test_registry.py."""

from __future__ import annotations

import pytest

from mlflow_clip.registry.names import (
    MAX_ALIAS_LENGTH,
    MAX_EXPERIMENT_NAME_LENGTH,
    MAX_MODEL_NAME_LENGTH,
    MAX_RUN_NAME_LENGTH,
    MAX_TAG_KEY_LENGTH,
    MAX_VERSION,
    RegistryNameError,
    check_alias,
    check_experiment_name,
    check_model_name,
    fit,
    parse_version,
)


def test_the_limits_are_mlflows_columns_less_what_is_derived_from_the_names():
    from mlflow_clip.registry.lock import LOCK_TAG_PREFIX
    from mlflow_clip.registry.records import DONE_SUFFIX, HISTORY_TAG_PREFIX

    assert (MAX_MODEL_NAME_LENGTH, MAX_EXPERIMENT_NAME_LENGTH, MAX_RUN_NAME_LENGTH) == (256, 256, 250)
    assert MAX_ALIAS_LENGTH == 200 and MAX_VERSION == 2**31 - 1
    alias = "a" * MAX_ALIAS_LENGTH
    ticket = f"{LOCK_TAG_PREFIX}{alias}.{'f' * 32}"
    record = f"{HISTORY_TAG_PREFIX}{alias}.{999_999_999:09d}{DONE_SUFFIX}"
    assert len(ticket) == MAX_TAG_KEY_LENGTH and len(record) < MAX_TAG_KEY_LENGTH


@pytest.mark.parametrize(
    "name",
    ["clip-zero-shot", "m" * MAX_MODEL_NAME_LENGTH, "模" * MAX_MODEL_NAME_LENGTH, "clip zero shot", "a#b", "a.b", "x"],
)
def test_model_names_mlflow_can_store_and_address_are_accepted(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name, message",
    [
        ("m" * (MAX_MODEL_NAME_LENGTH + 1), "of 257 characters; expected at most 256"),
        ("", "empty"),
        ("   ", "empty"),
        (" clip-zero-shot", "starts with whitespace.*did you mean 'clip-zero-shot'"),
        ("clip-zero-shot ", "ends with whitespace"),
        ("clip-zero-shot\n", "ends with whitespace"),
        ("clip\tzero", r"control character \(U\+0009\)"),
        ("clip\x7fzero", r"control character \(U\+007F\)"),
        ("clip\u200bzero", r"format character \(U\+200B\)"),  # zero-width space: a look-alike
        ("clip\u00a0zero", r"whitespace other than a space \(U\+00A0\)"),
        ("clip\u2028zero", r"U\+2028"),
        ("clip\udcffzero", r"surrogate character"),  # an undecodable byte in argv
        ("a/b", "'/'"),
        ("a:b", "':'"),
        ("a?b", r"'\?'"),  # models:/a?b/1 is parsed as a query
        ("a@b", "'@'"),  # models:/a@b/1 is parsed as an alias
        ("it's", '"\'"'),
        ("a\\b", "'\\\\\\\\'"),
        (".", "MLflow refuses"),
        ("..clip", "MLflow refuses"),
    ],
)
def test_bad_model_names_are_refused_in_one_line_naming_the_problem(name, message):
    with pytest.raises(RegistryNameError, match=message) as refused:
        check_model_name(name)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "alias", ["production", "a" * MAX_ALIAS_LENGTH, "产" * MAX_ALIAS_LENGTH, "prodé", "３", "v", "v1a"]
)
def test_aliases_mlflow_accepts_whose_keys_fit_are_accepted(alias):
    assert check_alias(alias) == alias


@pytest.mark.parametrize(
    "alias",
    ["a" * (MAX_ALIAS_LENGTH + 1), "production\n", "\nproduction", "pro duction", "v.1", "it's", "", "latest",
     "LATEST", "v3", "V12", "a/b"],
)  # fmt: skip
def test_bad_aliases_are_refused_whole(alias):
    with pytest.raises(RegistryNameError) as refused:
        check_alias(alias)
    assert "\n" not in str(refused.value)


def test_experiment_names_fit_the_experiments_column():
    assert check_experiment_name("e" * MAX_EXPERIMENT_NAME_LENGTH)
    with pytest.raises(RegistryNameError, match="experiment name of 257 characters"):
        check_experiment_name("e" * (MAX_EXPERIMENT_NAME_LENGTH + 1))


def test_version_numbers_fit_the_versions_column():
    assert parse_version(str(MAX_VERSION)).number == str(MAX_VERSION)
    assert parse_version("0042").number == "42" and parse_version("@3").alias == "3"
    for bad in (str(MAX_VERSION + 1), "0", "9" * 400):
        with pytest.raises(RegistryNameError, match="expected a version number from 1 to 2147483647"):
            parse_version(bad)


def test_fit_keeps_short_text_and_shortens_long_text_with_a_digest_of_all_of_it():
    assert fit("promote m @a", MAX_RUN_NAME_LENGTH) == "promote m @a"
    long_a, long_b = "rollback " + "m" * 256 + " @" + "a" * 200, "rollback " + "m" * 256 + " @" + "a" * 199 + "b"
    assert len(fit(long_a, MAX_RUN_NAME_LENGTH)) == MAX_RUN_NAME_LENGTH
    assert fit(long_a, MAX_RUN_NAME_LENGTH) != fit(long_b, MAX_RUN_NAME_LENGTH)  # same start, other digest
    assert fit(long_a, MAX_RUN_NAME_LENGTH) == fit(long_a, MAX_RUN_NAME_LENGTH)


def test_the_names_are_checked_without_importing_mlflow():
    """So the CLI refuses a bad name before the seconds MLflow's import takes."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from mlflow_clip.registry.names import check_names\n"
        "check_names('clip-zero-shot', 'production')\n"
        "import mlflow_clip.registry as r\n"
        "assert sorted(r.__all__) == sorted(r._MODULE_OF)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mlflow" not in json.loads(done.stdout)  # the package mlflow_clip, not MLflow
