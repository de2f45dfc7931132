"""Gated, auditable, reversible alias moves (`@production`, `@challenger`).

    >>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
    >>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP

A promotion checks the names first, then the gates that concern the version alone (it exists;
its files match the manifest; its export's parity; it loads and predicts as serving will). Then,
under the alias's lock (`lock.py`): it completes any move a crash interrupted, reads the current
holder, runs the accuracy gate against it, records its intent, moves the alias, and records the
outcome (`records.py`). A refused promotion is recorded too. Nothing it writes depends on clocks
agreeing between hosts, and a promotion killed at any moment delays the next one by at most one
lock lease (20 s).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from mlflow_clip.errors import PromotionError
from mlflow_clip.registry import card, records
from mlflow_clip.registry.gates import GateResult, GateThresholds, accuracy_gate, check_gates, version_exists_gate
from mlflow_clip.registry.lock import LEASE_SECONDS, AliasLock, RegisteredModelTickets
from mlflow_clip.registry.names import VersionRef, check_alias, check_model_name, check_names, parse_version

if TYPE_CHECKING:
    from mlflow_clip.references import ServingProbe

_logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
VERSION_TAG_CHARS = 4000


@dataclass
class PromotionResult:
    model_name: str
    alias: str
    version: str
    previous_version: str | None
    gates: list[GateResult]
    moved: bool
    message: str
    seq: int | None = None  # the history record of this event
    reclaimed_locks: int = 0  # dead contenders' tickets this call removed
    seconds: dict[str, float] = field(default_factory=dict)  # gates, copy, lock (waiting), move, total


@dataclass(frozen=True)
class LockSettings:
    lease: float = LEASE_SECONDS
    timeout: float = 300.0


def resolve_version(client: MlflowClient, model_name: str, version: str) -> str:
    """A version number (`3`) or an alias naming one (`challenger`, `@3`)."""
    ref = parse_version(version)
    try:
        if ref.number is not None:
            return str(client.get_model_version(model_name, ref.number).version)
        return str(client.get_model_version_by_alias(model_name, ref.alias).version)
    except MlflowException as e:
        missing = _missing(client, model_name, ref, e)
        if missing is None:
            raise
        raise PromotionError(f"Promotion refused: {missing}.") from None


def _missing(client: MlflowClient, model_name: str, ref: VersionRef, error: MlflowException) -> str | None:
    """What is missing, in a few words, with what there is instead (None: nothing is)."""
    model = registered_model(client, model_name)
    if ref.alias is not None:
        if ref.alias in model.aliases:
            return None
        aliases = ", ".join(f"@{a}" for a in sorted(model.aliases)[:5]) or "none"
        return f"registered model {model_name!r} has no alias @{ref.alias} (its aliases: {aliases})"
    if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return None
    latest = client.search_model_versions(f"name='{model_name}'", max_results=1, order_by=["version_number DESC"])
    there = f"its latest is version {latest[0].version}" if latest else "it has no versions"
    return f"registered model {model_name!r} has no version {ref.number} ({there})"


def registered_model(client: MlflowClient, model_name: str):
    """The registered model, or PromotionError naming the one that does not exist."""
    try:
        return client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise PromotionError(
            f"There is no registered model {model_name!r}; export one with `mlflow-clip export "
            f"--registered-model-name ...`, or check the name (and MLFLOW_TRACKING_URI)."
        ) from None


def check_promotion(
    client: MlflowClient, model_name: str, version: str, alias: str, copy_to: str | None = None
) -> GateResult:
    """What a promotion checks before it writes anything: the names, then that the version
    exists. The 'version exists' gate, its figures naming the version resolved."""
    check_names(model_name, alias, copy_to)
    started = time.monotonic()
    gate = version_exists_gate(model_name, resolve_version(client, model_name, version), version)
    gate.seconds = time.monotonic() - started
    return gate


def current_holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def promote(
    model_name: str,
    version: str,
    alias: str = DEFAULT_ALIAS,
    thresholds: GateThresholds = GateThresholds(),
    copy_to: str | None = None,
    client: MlflowClient | None = None,
    run_id: str = "",
    lock: LockSettings = LockSettings(),
    probe: ServingProbe | None = None,
) -> PromotionResult:
    """Gate `model_name` version `version` (a number, or an alias naming one) and point `alias` at it.

    With `copy_to`, the version is first copied into that registered model (e.g. from
    `clip-zero-shot-staging` to `clip-zero-shot`) and the alias is set there. Raises
    PromotionError naming the failed gate and its figures; the alias then stays put. Each
    gate's time is in its `seconds`, each phase's in the result's `seconds`. `probe`, a
    `ServingProbe` started ahead, saves the 'loads and predicts' gate its interpreter's start.
    """
    started = time.monotonic()
    client = client or MlflowClient()
    exists = check_promotion(client, model_name, version, alias, copy_to)
    source = exists.figures["version"]
    if not copy_to and current_holder(client, model_name, alias) == source:
        return _no_op(model_name, alias, source, [], {"total": time.monotonic() - started})
    gates = [exists, *check_gates(client, model_name, source, thresholds, probe)]
    seconds = {"gates": time.monotonic() - started}
    target = _copy(client, model_name, source, copy_to) if all(g.passed for g in gates) and copy_to else source
    if copy_to:
        seconds["copy"] = time.monotonic() - started - seconds["gates"]
    target_name = copy_to or model_name
    waited = time.monotonic()
    try:
        with AliasLock(
            RegisteredModelTickets(client, target_name), alias, lease=lock.lease, timeout=lock.timeout
        ) as held:
            seconds["lock"] = time.monotonic() - waited
            result = _move_under_lock(client, target_name, alias, target, source, gates, thresholds, run_id, held)
            result.reclaimed_locks = len(held.reclaimed)
    except PromotionError as e:
        if e.result is not None:
            e.result.seconds = _phases(seconds, started, waited)
        raise
    result.seconds = _phases(seconds, started, waited)
    return result


def _phases(seconds: dict[str, float], started: float, waited: float) -> dict[str, float]:
    """gates, copy (with copy_to), lock (waiting for it), move (under it: history, accuracy gate,
    alias, tags), total."""
    now = time.monotonic()
    return {**seconds, "move": now - waited - seconds.get("lock", 0.0), "total": now - started}


def _move_under_lock(client, name, alias, target, source, gates, thresholds, run_id, held) -> PromotionResult:
    holder = current_holder(client, name, alias)
    events = records.reconcile(client, name, alias, holder)
    if holder == target:
        return _no_op(name, alias, target, gates)
    if thresholds.max_accuracy_drop is not None:
        started = time.monotonic()
        accuracy = accuracy_gate(client, name, target, holder, thresholds)
        accuracy.seconds = time.monotonic() - started
        gates = [*gates, accuracy]
    failed = [g for g in gates if not g.passed]
    base = dict(
        seq=records.next_seq(events),
        alias=alias,
        previous=holder,
        by=records.who(),
        at=records.now(),
        subject=target,
        run_id=run_id,
        gates={g.name: g.passed for g in gates},
    )
    if failed:
        message = f"Promotion refused, @{alias} stays on {holder or 'no version'}: " + "; ".join(
            f"gate '{g.name}' failed: {g.detail}" for g in failed
        )
        held.check_held()
        records.append(
            client, name, records.Event(event=records.REFUSED, version=target, detail=records.short(message), **base)
        )
        result = PromotionResult(name, alias, target, holder, gates, False, message, base["seq"])
        _note(client, name, target, alias, "promotion refused", base, f"stays on {holder or 'no version'}")
        raise PromotionError(message, result)
    held.check_held()
    event = records.append(client, name, records.Event(event=records.PROMOTE, version=target, **base))
    client.set_registered_model_alias(name, alias, target)
    records.complete(client, name, event, records.DONE)
    _tag_version(client, name, target, alias, holder, gates, event, source)
    _note(client, name, target, alias, "promoted to this version", base, f"was {holder or 'on no version'}")
    message = f"{name} @{alias}: version {holder or 'none'} -> {target}"
    return PromotionResult(name, alias, target, holder, gates, True, message, event.seq)


def _note(client, name: str, version: str, alias: str, verb: str, event: dict, other: str) -> None:
    """Append the event to the version's description (its model card); the history tags stay
    the record, so a crash before this line costs the description one line, nothing else."""
    line = card.alias_line(event["at"], alias, verb, event["by"], other, event.get("gates"), event.get("run_id", ""))
    try:
        card.append_line(client, name, version, line)
    except MlflowException as e:  # e.g. a refused promotion of a version that does not exist
        _logger.warning("Could not add to the description of %s version %s: %s", name, version, e.message[:200])


def _no_op(
    name: str, alias: str, version: str, gates: list[GateResult], seconds: dict[str, float] | None = None
) -> PromotionResult:
    message = (
        f"{name} version {version} already holds @{alias}; nothing to do (no gate was run)."
        if not gates
        else (f"{name} version {version} already holds @{alias}; nothing to do.")
    )
    return PromotionResult(name, alias, version, version, gates, False, message, seconds=seconds or {})


def _copy(client: MlflowClient, model_name: str, version: str, destination: str) -> str:
    copied = client.copy_model_version(f"models:/{model_name}/{version}", destination)
    source = client.get_model_version(model_name, version)
    for key, value in source.tags.items():
        if not key.startswith(records.HISTORY_TAG_PREFIX):
            client.set_model_version_tag(destination, copied.version, key, value)
    client.set_model_version_tag(destination, copied.version, "copied_from", f"{model_name}/{version}")
    return str(copied.version)


def _tag_version(client, name, version, alias, holder, gates, event, source) -> None:
    tags = {
        "promoted_by": event.by,
        "promoted_at": event.at,
        "promoted_alias": alias,
        "promoted_previous_version": holder or "",
        "promoted_seq": str(event.seq),
        "promotion_gates": json.dumps([asdict(g) for g in gates], default=str)[:VERSION_TAG_CHARS],
    }
    if event.run_id:
        tags["promotion_run_id"] = event.run_id
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def rollback(
    model_name: str,
    alias: str = DEFAULT_ALIAS,
    client: MlflowClient | None = None,
    run_id: str = "",
    lock: LockSettings = LockSettings(),
) -> PromotionResult:
    """Move `alias` back to the version that held it before the last promotion in effect."""
    started = time.monotonic()
    check_model_name(model_name)
    check_alias(alias)
    client = client or MlflowClient()
    registered_model(client, model_name)
    waited = time.monotonic()
    with AliasLock(RegisteredModelTickets(client, model_name), alias, lease=lock.lease, timeout=lock.timeout) as held:
        locked = time.monotonic()
        result = _roll_back_under_lock(client, model_name, alias, run_id, held)
    now = time.monotonic()
    result.seconds = {"lock": locked - waited, "move": now - locked, "total": now - started}
    return result


def _roll_back_under_lock(client, model_name: str, alias: str, run_id: str, held) -> PromotionResult:
    holder = current_holder(client, model_name, alias)
    events = records.reconcile(client, model_name, alias, holder)
    stack = records.promotion_stack(events)
    if not stack:
        raise PromotionError(f"No promotion of {model_name} @{alias} to roll back (its history has none in effect).")
    top = stack[-1]
    if top.version != holder:
        raise PromotionError(
            f"@{alias} is on version {holder or 'none'}, but the last promotion recorded by mlflow-clip set it to "
            f"{top.version}: it was moved outside mlflow-clip. Promote the version you want explicitly."
        )
    previous = top.previous
    held.check_held()
    event = records.append(
        client,
        model_name,
        records.Event(
            seq=records.next_seq(events),
            event=records.ROLLBACK,
            alias=alias,
            version=previous,
            previous=holder,
            by=records.who(),
            at=records.now(),
            subject=previous or holder,
            run_id=run_id,
        ),
    )
    if previous:
        client.set_registered_model_alias(model_name, alias, previous)
    else:
        client.delete_registered_model_alias(model_name, alias)
    records.complete(client, model_name, event, records.DONE)
    fields = {"at": event.at, "by": event.by, "run_id": run_id}
    if previous:
        _note(client, model_name, previous, alias, "rolled back to this version", fields, f"from {holder}")
    _note(client, model_name, holder, alias, "rolled back from this version", fields, f"to {previous or 'none'}")
    message = f"{model_name} @{alias}: version {holder} -> {previous or 'none (alias removed)'}"
    return PromotionResult(model_name, alias, previous or "", holder, [], True, message, event.seq)


def history(model_name: str, alias: str = DEFAULT_ALIAS, client: MlflowClient | None = None) -> list[records.Event]:
    """The alias's history, oldest first: every promotion, rollback and refused promotion, each
    with its state (`done`, `abandoned`; a move interrupted by a crash is resolved by reading
    where the alias is). Reading writes nothing, and takes two requests: the registered model
    (its aliases and any 0.1.0 history) and a search of its versions (the records)."""
    check_model_name(model_name)
    check_alias(alias)
    client = client or MlflowClient()
    model = registered_model(client, model_name)
    events = records.read_events(client, model_name, alias)
    legacy = records.legacy_events(model.tags, alias)
    if legacy and not any(e.migrated for e in events):
        events = legacy + [e for e in events if e.seq > len(legacy)]
    holder = model.aliases.get(alias)
    return records.resolve(events, str(holder) if holder is not None else None)
