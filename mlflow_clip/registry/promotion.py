"""Registry promotion: gated, auditable, reversible alias moves (`@production`, `@challenger`).

    >>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
    >>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP

A promotion checks gates (the version exists; its ONNX file's SHA-256 matches the export's
record; the export's parity metrics are within thresholds; it loads through the flavor and
predicts; optionally its recorded accuracy is no worse than the current holder's), then moves
the alias and records the move on the version and in the registered model's alias history.

Concurrent promotions of one alias are serialized with a bakery lock kept in registered-model
tags (Lamport's bakery algorithm needs only per-writer registers, which tags with distinct keys
are), so the history is a consistent chain and `rollback` can undo moves one by one.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.registry.gates import GateResult, GateThresholds, check_gates

_logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
TAG_PREFIX = "mlflow_clip."
HISTORY_TAG = TAG_PREFIX + "alias_history.{alias}"
LOCK_TAG = TAG_PREFIX + "lock.{alias}.{owner}"
HISTORY_LIMIT = 200
LOCK_STALE_SECONDS = 600.0
LOCK_POLL_SECONDS = 0.05


class PromotionError(MlflowClipError, RuntimeError):
    """A gate failed or the request was invalid; the alias did not move."""


@dataclass
class PromotionResult:
    model_name: str
    alias: str
    version: str
    previous_version: str | None
    gates: list[GateResult]
    moved: bool
    message: str


def resolve_version(client: MlflowClient, model_name: str, version: str) -> str:
    """A version number, or an alias naming one."""
    try:
        if str(version).isdigit():
            return str(client.get_model_version(model_name, str(version)).version)
        return str(client.get_model_version_by_alias(model_name, str(version)).version)
    except MlflowException as e:
        raise PromotionError(
            f"Gate 'version exists' failed: registered model {model_name!r} has no version or alias "
            f"{version!r} ({e.message.splitlines()[0]})."
        ) from e


def current_holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


# ---------------------------------------------------------------------------------------------
# The bakery lock (one per registered model and alias)


class AliasLock:
    """Lamport's bakery lock over registered-model tags: each contender writes only its own tag."""

    def __init__(self, client: MlflowClient, model_name: str, alias: str, timeout: float = 300.0):
        self.client, self.model_name, self.alias, self.timeout = client, model_name, alias, timeout
        self.owner = uuid.uuid4().hex
        self.key = LOCK_TAG.format(alias=alias, owner=self.owner)
        self.prefix = LOCK_TAG.format(alias=alias, owner="")

    def _write(self, choosing: bool, number: int) -> None:
        value = json.dumps({"choosing": choosing, "number": number, "at": time.time()})
        self.client.set_registered_model_tag(self.model_name, self.key, value)

    def _others(self) -> dict[str, dict]:
        tags = self.client.get_registered_model(self.model_name).tags
        others = {}
        for key, value in tags.items():
            if key.startswith(self.prefix) and key != self.key:
                entry = json.loads(value)
                if time.time() - entry.get("at", 0) > LOCK_STALE_SECONDS:
                    continue  # a contender that died holding a ticket
                others[key[len(self.prefix):]] = entry
        return others

    def __enter__(self) -> "AliasLock":
        self._write(True, 0)
        number = 1 + max([e["number"] for e in self._others().values()] + [0])
        self._write(False, number)
        deadline = time.monotonic() + self.timeout
        while True:
            blocking = [
                owner for owner, e in self._others().items()
                if e["choosing"] or (e["number"] and (e["number"], owner) < (number, self.owner))
            ]
            if not blocking:
                return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise PromotionError(f"Timed out after {self.timeout:.0f} s waiting for other promotions of @{self.alias}.")
            time.sleep(LOCK_POLL_SECONDS)

    def __exit__(self, *exc) -> None:
        try:
            self.client.delete_registered_model_tag(self.model_name, self.key)
        except MlflowException:
            _logger.warning("Could not release the promotion lock tag %s", self.key)


# ---------------------------------------------------------------------------------------------
# History


def read_history(client: MlflowClient, model_name: str, alias: str) -> list[dict]:
    """The alias's moves, oldest first: {action, version, previous, at, by}."""
    raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG.format(alias=alias))
    return json.loads(raw) if raw else []


def _write_history(client: MlflowClient, model_name: str, alias: str, history: list[dict]) -> None:
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias), json.dumps(history[-HISTORY_LIMIT:]))


def promotion_stack(history: list[dict]) -> list[dict]:
    """Replay the history: promotions push, rollbacks pop. The top is the move in effect."""
    stack: list[dict] = []
    for event in history:
        if event["action"] == "promote":
            stack.append(event)
        elif event["action"] == "rollback" and stack:
            stack.pop()
    return stack


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _who() -> str:
    return os.environ.get("MLFLOW_CLIP_PROMOTED_BY") or getpass.getuser()


# ---------------------------------------------------------------------------------------------
# Public API


def promote(
    model_name: str,
    version: str,
    alias: str = DEFAULT_ALIAS,
    thresholds: GateThresholds = GateThresholds(),
    copy_to: str | None = None,
    client: MlflowClient | None = None,
) -> PromotionResult:
    """Gate `model_name` version `version` (a number or an alias) and point `alias` at it.

    With `copy_to`, the version is first copied into that registered model (e.g. from
    `clip-zero-shot-staging` to `clip-zero-shot`) and the alias is set there.
    Raises PromotionError naming the failed gate and its figures; the alias then stays put.
    """
    client = client or MlflowClient()
    source_version = resolve_version(client, model_name, version)
    target_name = copy_to or model_name
    holder = current_holder(client, target_name, alias)
    gates = check_gates(client, model_name, source_version, thresholds, holder)
    failed = [g for g in gates if not g.passed]
    if failed:
        raise PromotionError(
            "Promotion refused, @%s stays on %s: " % (alias, holder or "no version")
            + "; ".join(f"gate '{g.name}' failed: {g.detail}" for g in failed)
        )
    target_version = _copy(client, model_name, source_version, copy_to) if copy_to else source_version
    with AliasLock(client, target_name, alias):
        return _move_alias(client, target_name, alias, target_version, gates, copied_from=(model_name, source_version) if copy_to else None)


def _copy(client: MlflowClient, model_name: str, version: str, destination: str) -> str:
    copied = client.copy_model_version(f"models:/{model_name}/{version}", destination)
    source = client.get_model_version(model_name, version)
    for key, value in source.tags.items():
        client.set_model_version_tag(destination, copied.version, key, value)
    client.set_model_version_tag(destination, copied.version, "copied_from", f"{model_name}/{version}")
    return str(copied.version)


def _move_alias(client, model_name, alias, version, gates, copied_from=None) -> PromotionResult:
    holder = current_holder(client, model_name, alias)
    if holder == version:
        message = f"{model_name} version {version} already holds @{alias}; nothing to do."
        return PromotionResult(model_name, alias, version, holder, gates, False, message)
    at, by = _now(), _who()
    client.set_registered_model_alias(model_name, alias, version)
    history = read_history(client, model_name, alias)
    history.append({"action": "promote", "version": version, "previous": holder, "at": at, "by": by})
    _write_history(client, model_name, alias, history)
    tags = {
        "promoted_by": by,
        "promoted_at": at,
        "promoted_alias": alias,
        "promoted_previous_version": holder or "",
        "promotion_gates": json.dumps([asdict(g) for g in gates], default=str)[:4900],
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    message = f"{model_name} @{alias}: version {holder or 'none'} -> {version}"
    return PromotionResult(model_name, alias, version, holder, gates, True, message)


def rollback(model_name: str, alias: str = DEFAULT_ALIAS, client: MlflowClient | None = None) -> PromotionResult:
    """Move `alias` back to the version that held it before the last promotion in effect."""
    client = client or MlflowClient()
    with AliasLock(client, model_name, alias):
        history = read_history(client, model_name, alias)
        stack = promotion_stack(history)
        holder = current_holder(client, model_name, alias)
        if not stack:
            raise PromotionError(f"No promotion of {model_name} @{alias} to roll back (its history is empty).")
        top = stack[-1]
        if top["version"] != holder:
            raise PromotionError(
                f"@{alias} is on version {holder}, but the last recorded promotion set it to {top['version']}; "
                "it was moved outside mlflow-clip. Promote the version you want explicitly."
            )
        previous = top["previous"]
        if previous:
            client.set_registered_model_alias(model_name, alias, previous)
        else:
            client.delete_registered_model_alias(model_name, alias)
        history.append({"action": "rollback", "version": previous, "previous": holder, "at": _now(), "by": _who()})
        _write_history(client, model_name, alias, history)
    message = f"{model_name} @{alias}: version {holder} -> {previous or 'none (alias removed)'}"
    return PromotionResult(model_name, alias, previous or "", holder, [], True, message)
