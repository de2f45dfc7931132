"""Promotion's logic on a real MLflow store (SQLite, in process): the history as records, names
checked first, gates that say what they did, the holder read under the lock, and every state a
crash can leave reconciled by the next call. The same against a real `mlflow server` on SQLite
and PostgreSQL, with real SIGKILLs, is in test_registry.py."""

from __future__ import annotations

import json
import time

import pytest
from helpers import requires_export, using_store
from stores import fresh_sqlite_uri

pytestmark = requires_export

NAME = "clip-zero-shot"
CLASSES = ["a red circle", "a green square", "a blue triangle"]


@pytest.fixture(scope="module")
def store(module_tmp):
    """A SQLite tracking store and registry with two exported demo versions."""
    import mlflow

    from mlflow_clip.export.job import export_and_register

    root = module_tmp("promotion")
    uri = fresh_sqlite_uri(root / "mlflow.db")
    with using_store(uri):
        experiment = mlflow.create_experiment("p", artifact_location=(root / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            first = export_and_register(CLASSES, model="demo", templates="photo", registered_model_name=NAME)
        with mlflow.start_run(experiment_id=experiment):
            second = export_and_register(CLASSES, model="demo", templates="none", registered_model_name=NAME)
        yield {"uri": uri, "v1": first.model_version, "v2": second.model_version}


@pytest.fixture()
def client(store):
    from mlflow.tracking import MlflowClient

    with using_store(store["uri"]):
        yield MlflowClient()


@pytest.fixture()
def alias(request) -> str:
    """A fresh alias per test, so tests do not share a history."""
    return "a" + str(abs(hash(request.node.name)) % 10**8)


def test_promotions_rollbacks_and_refusals_are_records_in_order(store, client, alias):
    from mlflow_clip.registry import GateThresholds, PromotionError, history, promote, rollback

    v1, v2 = store["v1"], store["v2"]
    assert promote(NAME, v1, alias).moved
    with pytest.raises(PromotionError, match=rf"version {v2} and version {v1} have no recorded accuracy"):
        promote(NAME, v2, alias, GateThresholds(max_accuracy_drop=0.01))
    assert promote(NAME, v2, alias).previous_version == v1
    assert rollback(NAME, alias).version == v1
    events = history(NAME, alias)
    assert [(e.seq, e.event, e.previous, e.version, e.state) for e in events] == [
        (1, "promote", None, v1, "done"),
        (2, "refused", v1, v2, "done"),
        (3, "promote", v1, v2, "done"),
        (4, "rollback", v2, v1, "done"),
    ]
    assert "accuracy" in events[1].detail and events[1].gates["accuracy"] is False
    assert all(len(e.record()) < 2000 for e in events)
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promoted_alias"] == alias and tags["promoted_seq"] == "3"


def test_names_are_checked_before_any_gate(client, monkeypatch):
    import mlflow_clip.registry.promotion as promotion
    from mlflow_clip.registry import RegistryNameError, promote

    monkeypatch.setattr(promotion, "check_gates", lambda *a: pytest.fail("a gate ran"))
    for bad in ("pro duction", "it's", "v.1", "", "latest", "v3", "x" * 201, "production\n"):
        with pytest.raises(RegistryNameError):
            promote(NAME, "1", bad)
    with pytest.raises(RegistryNameError, match="control character"):
        promote("clip\nzero-shot", "1", "production")
    with pytest.raises(RegistryNameError, match="starts with whitespace"):
        promote(NAME, "1", "production", copy_to=" " + NAME)
    with pytest.raises(RegistryNameError, match="empty version"):
        promote(NAME, " ", "production")


def _runs(client) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize(
    "args, message",
    [
        (["promote", "--version", "1", "--alias", "production\n"], r"Received the alias 'production\\n'"),
        (["promote", "--version", "1", "--alias", "a" * 201], "alias of 201 characters; expected at most 200"),
        (["promote", "--version", "1", "--copy-to", " " + NAME], "starts with whitespace"),
        (["promote", "--version", "1", "--copy-to", "m" * 257], "257 characters; expected at most 256"),
        (["promote", "--version", "1", "--model-name", NAME + " "], "ends with whitespace"),
        (["promote", "--version", "1", "--experiment-name", "e" * 257], "experiment name of 257 characters"),
        (["promote", "--version", "2147483648"], "expected a version number from 1 to 2147483647"),
        (["promote", "--version", "999"], rf"refused: registered model '{NAME}' has no version 999 \(its latest"),
        (["promote", "--version", "@nope"], "has no alias @nope"),
        (["promote", "--version", "1", "--model-name", "nope"], "There is no registered model 'nope'"),
        (["rollback", "--alias", "a" * 201], "alias of 201 characters"),
        (["rollback", "--model-name", "nope"], "There is no registered model 'nope'"),
        (["history", "--model-name", "nope"], "There is no registered model 'nope'"),
    ],
)  # fmt: skip
def test_a_refused_request_is_one_line_exit_code_2_and_no_run(store, client, args, message):
    """Refused before a run is opened, a gate runs or anything is written: one line (said once),
    exit code 2, and no run, FAILED or otherwise, in any experiment."""
    import re

    from click.testing import CliRunner

    from mlflow_clip.cli import cli

    runs, tags = len(_runs(client)), client.get_registered_model(NAME).tags
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output) and "Traceback" not in result.output, result.output
    assert "not found" not in result.output  # MLflow's own words are not repeated after ours
    assert len(_runs(client)) == runs and client.get_registered_model(NAME).tags == tags
    assert not [m for m in client.search_registered_models() if m.name.strip() != m.name or len(m.name) > 256]


def test_the_cli_prints_each_gates_time_and_history_prints_a_table(store, client, alias):
    import re

    from click.testing import CliRunner

    from mlflow_clip.cli import cli

    promoted = CliRunner().invoke(cli, ["promote", "--version", store["v1"], "--alias", alias])
    assert promoted.exit_code == 0, promoted.output
    for gate in ("version exists", "checksum", "parity", "loads and predicts"):
        assert re.search(rf"^gate {gate}: passed in \d+\.\d\d s: ", promoted.output, re.M), promoted.output
    assert re.search(
        rf"@{alias}: version none -> {store['v1']} \(\d+\.\d s: gates .* s, lock .* s, move .* s\)", promoted.output
    )
    assert CliRunner().invoke(cli, ["rollback", "--alias", alias]).exit_code == 0
    shown = CliRunner().invoke(cli, ["history", "--alias", alias])
    lines = shown.output.splitlines()
    assert lines[0].split() == ["seq", "time", "(UTC)", "event", "from", "to", "outcome", "by"], shown.output
    assert lines[1].split()[:7] == ["1", *lines[1].split()[1:3], "promote", "none", store["v1"], "done"]
    assert lines[2].split()[3:7] == ["rollback", store["v1"], "none", "done"]
    assert len({line.index("event") if i == 0 else line.index(line.split()[3]) for i, line in enumerate(lines)}) == 1
    assert "-" not in [cell for line in lines for cell in line.split()]  # one spelling of no version: none


def test_the_longest_alias_accepted_promotes_and_rolls_back(store, client):
    """200 characters: the lock ticket's and the history's tag keys stay within MLflow's 250,
    so the longest alias the name check accepts also goes through (201 is refused up front)."""
    from mlflow_clip.registry import history, promote, rollback

    longest = "L" * 200
    promote(NAME, store["v1"], longest)
    promote(NAME, store["v2"], longest)
    assert rollback(NAME, longest).version == store["v1"]
    assert [e.event for e in history(NAME, longest)] == ["promote", "promote", "rollback"]


def test_a_promotion_run_records_what_was_asked_what_moved_and_each_gate(store, client, alias):
    """As `mlflow run -e promote` leaves it: the entry point's own `version` param (an alias
    here) stays, the resolved number, the outcome and every gate's figures are on the run, and its
    description is a table of the gates, as the MLflow UI shows the run."""
    import mlflow

    from mlflow_clip.registry import GateThresholds
    from mlflow_clip.registry.runs import promote_in_run

    client.set_registered_model_alias(NAME, "challenger", store["v2"])
    with mlflow.start_run() as run:
        mlflow.log_param("version", "challenger")  # what MLproject logs for -P version=challenger
        result = promote_in_run(NAME, "challenger", alias, GateThresholds())
    data = client.get_run(run.info.run_id).data
    assert data.params["version"] == "challenger" and data.params["resolved_version"] == store["v2"]
    assert data.params["outcome"] == "promoted" and data.params["alias"] == alias
    assert data.params["history_seq"] == str(result.seq)
    assert {f"gate_{g.name.replace(' ', '_')}_passed" for g in result.gates} <= set(data.metrics)
    assert all(data.metrics[f"gate_{g.name.replace(' ', '_')}_passed"] == 1.0 for g in result.gates)
    for gate in result.gates:  # each gate's time, as printed, is a metric too
        assert gate.seconds is not None and gate.seconds >= 0
        assert data.metrics[f"gate_{gate.name.replace(' ', '_')}_seconds"] == pytest.approx(gate.seconds)
    assert data.metrics["promotion_total_seconds"] >= data.metrics["promotion_gates_seconds"] > 0
    assert {"promotion_lock_seconds", "promotion_move_seconds"} <= set(data.metrics)
    description = data.tags["mlflow.note.content"]
    assert f"version {store['v2']}" in description and "| gate | result | detail |" in description


def test_a_number_is_a_version_and_at_names_an_alias(store, client):
    from mlflow_clip.registry import parse_version, resolve_version

    client.set_registered_model_alias(NAME, "3", store["v1"])  # an all-digit alias
    assert resolve_version(client, NAME, "@3") == store["v1"]
    assert resolve_version(client, NAME, store["v2"]) == store["v2"]
    assert str(parse_version("@3")) == "@3" and parse_version("0042").number == "42"


def test_re_promoting_the_holder_says_so_before_any_gate(store, client, alias, monkeypatch):
    import mlflow_clip.registry.promotion as promotion
    from mlflow_clip.registry import promote

    promote(NAME, store["v1"], alias)
    monkeypatch.setattr(promotion, "check_gates", lambda *a: pytest.fail("a gate ran"))
    started = time.monotonic()
    again = promote(NAME, store["v1"], alias)
    assert not again.moved and again.gates == [] and "already holds" in again.message
    assert time.monotonic() - started < 2


def test_every_gate_reports_what_it_did(store, alias):
    from mlflow_clip.registry import GateThresholds, promote

    result = promote(NAME, store["v1"], alias, GateThresholds(max_accuracy_drop=0.01))
    names = [g.name for g in result.gates]
    assert names == ["version exists", "checksum", "parity", "loads and predicts", "accuracy"]
    assert "nothing to compare with" in result.gates[-1].detail  # no holder yet
    assert all(g.detail for g in result.gates)


def test_missing_accuracy_passes_only_when_allowed(store, client, alias):
    from mlflow_clip.registry import ACCURACY_TAG, GateThresholds, PromotionError, promote

    v1, v2 = store["v1"], store["v2"]
    promote(NAME, v1, alias)
    result = promote(NAME, v2, alias, GateThresholds(max_accuracy_drop=0.01, allow_missing_accuracy=True))
    assert result.moved and "--allow-missing-accuracy" in result.gates[-1].detail
    client.set_model_version_tag(NAME, v1, ACCURACY_TAG, "0.99")
    client.set_model_version_tag(NAME, v2, ACCURACY_TAG, "0.50")
    try:
        promote(NAME, v1, alias)
        with pytest.raises(PromotionError, match=r"drop 0.4900, allowed 0.0100"):
            promote(NAME, v2, alias, GateThresholds(max_accuracy_drop=0.01))
    finally:
        client.delete_model_version_tag(NAME, v1, ACCURACY_TAG)
        client.delete_model_version_tag(NAME, v2, ACCURACY_TAG)


def test_the_accuracy_gate_reads_the_holder_under_the_lock(store, client, alias, monkeypatch):
    """A second promotion lands while the first runs its gates: the accuracy comparison must be
    with the version that holds the alias when the first one moves it, not the one before."""
    import mlflow_clip.registry.promotion as promotion
    from mlflow_clip.registry import ACCURACY_TAG, GateThresholds, PromotionError, promote

    client.set_model_version_tag(NAME, store["v1"], ACCURACY_TAG, "0.99")
    client.set_model_version_tag(NAME, store["v2"], ACCURACY_TAG, "0.50")
    real_gates = promotion.check_gates

    def gates_during_which_v1_is_promoted(*args):
        out = real_gates(*args)
        monkeypatch.setattr(promotion, "check_gates", real_gates)
        promote(NAME, store["v1"], alias)  # the other promotion, completed meanwhile
        return out

    try:
        monkeypatch.setattr(promotion, "check_gates", gates_during_which_v1_is_promoted)
        with pytest.raises(PromotionError, match=rf"vs 0.9900 \(version {store['v1']}, holding the alias\)"):
            promote(NAME, store["v2"], alias, GateThresholds(max_accuracy_drop=0.01))
        assert promotion.current_holder(client, NAME, alias) == store["v1"]
    finally:
        client.delete_model_version_tag(NAME, store["v1"], ACCURACY_TAG)
        client.delete_model_version_tag(NAME, store["v2"], ACCURACY_TAG)


def _crashed_move(client, alias: str, version: str, previous: str | None, moved: bool) -> None:
    """What a promotion killed around its alias move leaves: its record without an outcome, and
    the alias moved or not."""
    from mlflow_clip.registry import records

    events = records.read_events(client, NAME, alias)
    records.append(
        client,
        NAME,
        records.Event(
            seq=records.next_seq(events),
            event=records.PROMOTE,
            alias=alias,
            version=version,
            previous=previous,
            by="crashed",
            at=records.now(),
            subject=version,
        ),
    )
    if moved:
        client.set_registered_model_alias(NAME, alias, version)


def test_killed_right_after_the_alias_moved(store, client, alias):
    from mlflow_clip.registry import history, promote, rollback

    v1, v2 = store["v1"], store["v2"]
    promote(NAME, v1, alias)
    _crashed_move(client, alias, v2, v1, moved=True)
    assert history(NAME, alias)[-1].state == "done"  # read as done, from where the alias is
    assert rollback(NAME, alias).version == v1  # the interrupted move is known, and undone
    events = history(NAME, alias)
    assert [(e.event, e.state) for e in events] == [("promote", "done"), ("promote", "done"), ("rollback", "done")]
    assert "the next command" in events[1].resolved_by


def test_killed_before_the_alias_moved(store, client, alias):
    from mlflow_clip.registry import history, promote

    v1, v2 = store["v1"], store["v2"]
    promote(NAME, v1, alias)
    _crashed_move(client, alias, v2, v1, moved=False)
    assert history(NAME, alias)[-1].state == "abandoned"
    result = promote(NAME, v2, alias)
    assert result.moved and result.seq == 3
    assert [e.state for e in history(NAME, alias)] == ["done", "abandoned", "done"]


def test_killed_holding_the_lock_delays_the_next_by_one_lease(store, client, alias):
    from mlflow_clip.registry import LockSettings, promote

    ticket = json.dumps({"choosing": False, "number": 1, "beat": 7})
    client.set_registered_model_tag(NAME, f"mlflow_clip.lock.{alias}.deadbeef", ticket)
    started = time.monotonic()
    result = promote(NAME, store["v1"], alias, lock=LockSettings(lease=2.0))
    assert result.moved and result.reclaimed_locks == 1
    assert 2.0 <= time.monotonic() - started < 30
    assert not [k for k in client.get_registered_model(NAME).tags if k.startswith(f"mlflow_clip.lock.{alias}.")]


def test_the_0_1_0_history_is_read_once_and_migrated(store, client, alias):
    from mlflow_clip.registry import history, promote, rollback

    v1, v2 = store["v1"], store["v2"]
    legacy = [
        {"action": "promote", "version": v1, "previous": None, "at": "2026-11-01T00:00:00", "by": "ann"},
        {"action": "promote", "version": v2, "previous": v1, "at": "2026-11-02T00:00:00", "by": "bob"},
    ]
    client.set_registered_model_tag(NAME, f"mlflow_clip.alias_history.{alias}", json.dumps(legacy))
    client.set_registered_model_alias(NAME, alias, v2)
    assert [(e.version, e.by) for e in history(NAME, alias)] == [(v1, "ann"), (v2, "bob")]  # read, not migrated
    assert rollback(NAME, alias).version == v1  # migrates, then undoes bob's promotion
    assert f"mlflow_clip.alias_history.{alias}" not in client.get_registered_model(NAME).tags
    events = history(NAME, alias)
    assert [(e.seq, e.event, e.migrated) for e in events] == [
        (1, "promote", True),
        (2, "promote", True),
        (3, "rollback", False),
    ]
    assert promote(NAME, v2, alias).seq == 4


def test_records_stay_far_from_the_column_limits(store, client):
    from mlflow_clip.registry import records

    event = records.Event(
        seq=999_999_999,
        event=records.REFUSED,
        alias="a" * 200,
        version="12345",
        previous="12344",
        by="b" * 100,
        at=records.now(),
        subject="1",
        run_id="c" * 32,
        gates={
            "version exists": True,
            "checksum": False,
            "parity": True,
            "loads and predicts": False,
            "accuracy": False,
        },
        detail=records.short("d" * 5000),
    )
    assert len(event.record()) < 2000  # model-version tags are TEXT; 2,000 is below even VARCHAR(5000)
    assert len(json.dumps({"choosing": False, "number": 10**9, "beat": 10**9})) < 100  # lock tickets
