"""Gated, auditable, reversible alias moves (`@production`, `@challenger`).

    >>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
    >>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP

A promotion checks the names first, then the gates that concern the version alone (it exists;
its files match the manifest; its export's parity; it loads and predicts as serving will). Then,
under the alias's lock (`lock.py`): it completes any move a crash interrupted, reads the current
holder, runs the accuracy gate against it, records its intent, moves the alias, and records the
outcome (`history.py`). A refused promotion is recorded too. Nothing it writes depends on clocks
agreeing between hosts, and a promotion killed at any moment delays the next one by at most one
lock lease (20 s).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.registry import card, records
from mlflow_clip.registry.gates import GateResult, GateThresholds, accuracy_gate, check_gates, version_exists_gate
from mlflow_clip.registry.lock import LEASE_SECONDS, AliasLock, RegisteredModelTickets
from mlflow_clip.registry.names import check_alias, check_model_name, parse_version

_logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
VERSION_TAG_CHARS = 4000


class PromotionError(MlflowClipError, RuntimeError):
    """A gate failed or the request was invalid; the alias did not move. `.result`, when set,
    carries the gates that ran."""

    def __init__(self, message: str, result: PromotionResult | None = None):
        super().__init__(message)
        self.result = result


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
        raise PromotionError(
            f"Promotion refused: gate 'version exists' failed: registered model {model_name!r} has no "
            f"{'version' if ref.number else 'alias'} {ref} ({e.message.splitlines()[0][:200]})."
        ) from None


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
) -> PromotionResult:
    """Gate `model_name` version `version` (a number, or an alias naming one) and point `alias` at it.

    With `copy_to`, the version is first copied into that registered model (e.g. from
    `clip-zero-shot-staging` to `clip-zero-shot`) and the alias is set there. Raises
    PromotionError naming the failed gate and its figures; the alias then stays put.
    """
    check_model_name(model_name)
    check_alias(alias)
    target_name = check_model_name(copy_to, "--copy-to model name") if copy_to else model_name
    client = client or MlflowClient()
    source = resolve_version(client, model_name, version)
    if not copy_to and current_holder(client, model_name, alias) == source:
        return _no_op(model_name, alias, source, [])
    gates = [version_exists_gate(model_name, source, version), *check_gates(client, model_name, source, thresholds)]
    if all(g.passed for g in gates) and copy_to:
        target = _copy(client, model_name, source, copy_to)
    else:
        target = source
    with AliasLock(RegisteredModelTickets(client, target_name), alias, lease=lock.lease, timeout=lock.timeout) as held:
        result = _move_under_lock(client, target_name, alias, target, source, gates, thresholds, run_id, held)
        result.reclaimed_locks = len(held.reclaimed)
    return result


def _move_under_lock(client, name, alias, target, source, gates, thresholds, run_id, held) -> PromotionResult:
    holder = current_holder(client, name, alias)
    events = records.reconcile(client, name, alias, holder)
    if holder == target:
        return _no_op(name, alias, target, gates)
    if thresholds.max_accuracy_drop is not None:
        gates = [*gates, accuracy_gate(client, name, target, holder, thresholds)]
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


def _no_op(name: str, alias: str, version: str, gates: list[GateResult]) -> PromotionResult:
    message = (
        f"{name} version {version} already holds @{alias}; nothing to do (no gate was run)."
        if not gates
        else (f"{name} version {version} already holds @{alias}; nothing to do.")
    )
    return PromotionResult(name, alias, version, version, gates, False, message)


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
    check_model_name(model_name)
    check_alias(alias)
    client = client or MlflowClient()
    with AliasLock(RegisteredModelTickets(client, model_name), alias, lease=lock.lease, timeout=lock.timeout) as held:
        holder = current_holder(client, model_name, alias)
        events = records.reconcile(client, model_name, alias, holder)
        stack = records.promotion_stack(events)
        if not stack:
            raise PromotionError(
                f"No promotion of {model_name} @{alias} to roll back (its history has none in effect)."
            )
        top = stack[-1]
        if top.version != holder:
            raise PromotionError(
                f"@{alias} is on version {holder or 'no version'}, but the last promotion recorded by "
                "mlflow-clip set it to "
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
    where the alias is). Reading writes nothing."""
    check_model_name(model_name)
    check_alias(alias)
    client = client or MlflowClient()
    events = records.read_events(client, model_name, alias)
    legacy = records.legacy_events(client, model_name, alias)
    if legacy and not any(e.migrated for e in events):
        events = legacy + [e for e in events if e.seq > len(legacy)]
    return records.resolve(events, current_holder(client, model_name, alias))
