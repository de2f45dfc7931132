"""The audit trail of an alias: one record per event, written once, ordered by a sequence number.

Each promotion, rollback and refused promotion is a record in a tag of the model version it is
about (model-version tags are TEXT on SQL backends; each record stays under 2,000 characters, far
from the 5,000 of a registered-model tag too):

    mlflow_clip.history.<alias>.<seq, 9 digits>       the event, written before the alias moves
    mlflow_clip.history.<alias>.<seq, 9 digits>.done  its outcome, written once the move is known

Records are written only under the alias's lock (`lock.py`), where the next sequence number is
one more than the highest recorded, checked again just before writing. Nothing depends on clocks:
the `at` times are for people. A move interrupted at any moment leaves an event without an
outcome; the next promotion or rollback completes it (`reconcile`) by reading where the alias
actually is, and `history` reports it resolved the same way without writing.

The 0.1.0 history (one JSON list in a registered-model tag, which PostgreSQL refused beyond
5,000 characters) is read once and migrated into records, then removed.

    >>> for event in history("clip-zero-shot", "production"):  # doctest: +SKIP
    ...     print(event.seq, event.event, event.previous, "->", event.version, event.state)
"""

from __future__ import annotations

import getpass
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from mlflow.exceptions import MlflowException

from mlflow_clip.errors import HistoryError

HISTORY_TAG_PREFIX = "mlflow_clip.history."
LEGACY_HISTORY_TAG = "mlflow_clip.alias_history.{alias}"
DONE_SUFFIX = ".done"
MAX_RECORD_CHARS = 2000
_DETAIL_CHARS = 600
_SEARCH_PAGE = 1000

PROMOTE, ROLLBACK, REFUSED = "promote", "rollback", "refused"
DONE, ABANDONED, PENDING = "done", "abandoned", "pending"


@dataclass(frozen=True)
class Event:
    """One record of an alias's history."""

    seq: int
    event: str  # promote, rollback, refused
    alias: str
    version: str | None  # where the alias goes (None: a rollback that removed it)
    previous: str | None  # where it was
    by: str
    at: str
    subject: str  # the version whose tags hold the record
    run_id: str = ""
    gates: dict[str, bool] = field(default_factory=dict)
    detail: str = ""
    migrated: bool = False
    state: str = PENDING  # done, abandoned, pending (refused events are done)
    resolved_by: str = ""

    def record(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in ("state", "resolved_by", "subject")}
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if len(text) > MAX_RECORD_CHARS:
            raise HistoryError(f"A history record of {len(text)} characters exceeds {MAX_RECORD_CHARS}.")
        return text


def now() -> str:
    """This host's wall-clock time, for people reading the history (never used for ordering)."""
    return datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds")


def who() -> str:
    return (os.environ.get("MLFLOW_CLIP_PROMOTED_BY") or getpass.getuser())[:100]


def short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _key(alias: str, seq: int) -> str:
    return f"{HISTORY_TAG_PREFIX}{alias}.{seq:09d}"


_RECORD_KEY = re.compile(r"^mlflow_clip\.history\.(?P<alias>[\w\-]+)\.(?P<seq>\d{9})(?P<done>\.done)?$")


# -- reading ------------------------------------------------------------------------------------


def read_events(client, model_name: str, alias: str) -> list[Event]:
    """Every record of `alias`, oldest first, with its state as recorded (no alias lookup)."""
    events: dict[int, Event] = {}
    outcomes: dict[int, dict[str, Any]] = {}
    for mv in _all_versions(client, model_name):
        for key, value in mv.tags.items():
            match = _RECORD_KEY.match(key)
            if match is None or match.group("alias") != alias:
                continue
            seq = int(match.group("seq"))
            if match.group("done"):
                outcomes[seq] = _loads(value)
            elif seq in events:
                raise HistoryError(
                    f"Two records of @{alias} carry sequence number {seq} (versions "
                    f"{events[seq].subject} and {mv.version}); the history is inconsistent."
                )
            else:
                events[seq] = _event(_loads(value), str(mv.version), seq, alias)
    result = []
    for seq in sorted(events):
        event = events[seq]
        outcome = outcomes.get(seq)
        if event.event == REFUSED or event.migrated:
            event = replace(event, state=DONE)
        elif outcome is not None:
            event = replace(event, state=outcome.get("state", DONE), resolved_by=outcome.get("by", ""))
        result.append(event)
    return result


def _all_versions(client, model_name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{model_name}'", max_results=_SEARCH_PAGE, page_token=token)
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return versions


def _loads(value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _event(data: dict[str, Any], subject: str, seq: int, alias: str) -> Event:
    return Event(
        seq=seq,
        event=str(data.get("event", "")),
        alias=alias,
        version=data.get("version"),
        previous=data.get("previous"),
        by=str(data.get("by", "")),
        at=str(data.get("at", "")),
        subject=subject,
        run_id=str(data.get("run_id", "")),
        gates={str(k): bool(v) for k, v in (data.get("gates") or {}).items()},
        detail=str(data.get("detail", "")),
        migrated=bool(data.get("migrated", False)),
    )


def resolve(events: list[Event], holder: str | None) -> list[Event]:
    """The events with a pending last move resolved by where the alias is (`holder`)."""
    if not events or events[-1].state != PENDING:
        return events
    return [*events[:-1], replace(events[-1], state=outcome_of(events[-1], holder), resolved_by="reading the alias")]


def outcome_of(event: Event, holder: str | None) -> str:
    """A move took effect if the alias is where it was going; else it was abandoned."""
    return DONE if holder == event.version else ABANDONED


def promotion_stack(events: list[Event]) -> list[Event]:
    """Replay the moves that took effect: promotions push, rollbacks pop. The top is in effect."""
    stack: list[Event] = []
    for event in events:
        if event.state != DONE:
            continue
        if event.event == PROMOTE:
            stack.append(event)
        elif event.event == ROLLBACK and stack:
            stack.pop()
    return stack


# -- writing (under the alias's lock) -----------------------------------------------------------


def append(client, model_name: str, event: Event) -> Event:
    """Write `event` as the next record; its `seq` must be one more than the highest recorded."""
    events = read_events(client, model_name, event.alias)
    expected = (events[-1].seq if events else 0) + 1
    if event.seq != expected:
        raise HistoryError(
            f"Record {event.seq} of @{event.alias} would not follow record {expected - 1}; "
            "another writer was active. Run the command again."
        )
    client.set_model_version_tag(model_name, event.subject, _key(event.alias, event.seq), event.record())
    return event


def next_seq(events: list[Event]) -> int:
    return (events[-1].seq if events else 0) + 1


def complete(client, model_name: str, event: Event, state: str, by: str = "") -> Event:
    """Record the outcome of a move (once)."""
    outcome = json.dumps({"state": state, "by": by or "the mover", "at": now()}, separators=(",", ":"))
    client.set_model_version_tag(model_name, event.subject, _key(event.alias, event.seq) + DONE_SUFFIX, outcome)
    return replace(event, state=state, resolved_by=by)


def reconcile(client, model_name: str, alias: str, holder: str | None) -> list[Event]:
    """Under the lock: migrate a 0.1.0 history, and complete a move interrupted by a crash."""
    events = migrate_legacy(client, model_name, alias)
    if events and events[-1].state == PENDING:
        last = events[-1]
        events[-1] = complete(client, model_name, last, outcome_of(last, holder), "the next command, reading the alias")
    return events


def migrate_legacy(client, model_name: str, alias: str) -> list[Event]:
    """Turn the 0.1.0 history tag (a JSON list) into records, once; returns the history."""
    events = read_events(client, model_name, alias)
    tag = LEGACY_HISTORY_TAG.format(alias=alias)
    raw = client.get_registered_model(model_name).tags.get(tag)
    if raw is None:
        return events
    done = {e.seq for e in events}
    for index, item in enumerate(_legacy_items(raw), start=1):
        if index in done:  # an earlier migration got this far before it was interrupted
            continue
        subject = item.get("version") or item.get("previous")
        if not subject:
            continue
        event = Event(
            seq=index,
            event=PROMOTE if item.get("action") == "promote" else ROLLBACK,
            alias=alias,
            version=item.get("version"),
            previous=item.get("previous"),
            by=str(item.get("by", ""))[:100],
            at=str(item.get("at", "")),
            subject=str(subject),
            migrated=True,
        )
        client.set_model_version_tag(model_name, event.subject, _key(alias, index), event.record())
    try:
        client.delete_registered_model_tag(model_name, tag)
    except MlflowException:
        pass
    return read_events(client, model_name, alias)


def _legacy_items(raw: str) -> list[dict[str, Any]]:
    try:
        items = json.loads(raw)
    except ValueError:
        return []
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def legacy_events(model_tags: dict[str, str], alias: str) -> list[Event]:
    """The 0.1.0 history (from the registered model's tags) as events, without migrating it
    (for read-only callers)."""
    raw = model_tags.get(LEGACY_HISTORY_TAG.format(alias=alias))
    if raw is None:
        return []
    return [
        Event(
            seq=i,
            event=PROMOTE if it.get("action") == "promote" else ROLLBACK,
            alias=alias,
            version=it.get("version"),
            previous=it.get("previous"),
            by=str(it.get("by", "")),
            at=str(it.get("at", "")),
            subject=str(it.get("version") or it.get("previous") or ""),
            migrated=True,
            state=DONE,
        )
        for i, it in enumerate(_legacy_items(raw), start=1)
    ]


# -- showing ------------------------------------------------------------------------------------

HISTORY_COLUMNS = ["seq", "time (UTC)", "event", "from", "to", "outcome", "by", "note"]


def history_table(events: list[Event]) -> list[str]:
    """The events as the lines of a table with a header, columns aligned (`none`: no version)."""
    rows = [HISTORY_COLUMNS]
    for e in events:
        failed = [name for name, passed in e.gates.items() if not passed]
        refused = e.event == REFUSED
        rows.append(
            [
                str(e.seq),
                e.at[:19].replace("T", " "),
                PROMOTE if refused else e.event,
                e.previous or "none",
                e.version or "none",
                "refused" if refused else e.state,
                e.by,
                "failed: " + ", ".join(failed) if refused and failed else "",
            ]
        )
    if not any(row[-1] for row in rows[1:]):
        rows = [row[:-1] for row in rows]  # no notes: no note column
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if i == 0 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
