"""Mutual exclusion for moves of one alias, over registered-model tags: Lamport's bakery lock with
heartbeats instead of clocks.

The registry offers no compare-and-swap, only per-key tag writes, and Lamport's bakery needs
nothing more: each contender writes only its own ticket (`mlflow_clip.lock.<alias>.<owner>`).
A contender that dies (SIGKILL) leaves its ticket behind; tickets therefore carry a heartbeat
counter that a thread of their owner advances every `lease / 8` seconds, and a ticket whose
counter has not moved for `lease` seconds, **measured by the observer's own monotonic clock**, is
dead: the observer deletes it and goes on. No clock of another host is ever read, so a host
whose clock is off by minutes changes nothing.

A holder that stops heartbeating while alive (stalled for a whole lease) could be taken for
dead; it fences itself: `check_held` fails once it could not beat for half a lease, or its
ticket was deleted by someone else, and the holder then stops before writing anything.
A holder that never finishes (a hung call) stops beating after `max_hold` seconds.

    >>> with AliasLock(RegisteredModelTickets(client, "clip-zero-shot"), "production") as lock:  # doctest: +SKIP
    ...     lock.check_held()
    ...     client.set_registered_model_alias("clip-zero-shot", "production", "3")
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol

from mlflow_clip.errors import LockError

_logger = logging.getLogger(__name__)

LOCK_TAG_PREFIX = "mlflow_clip.lock."
LOCK_KEY_OVERHEAD = len(LOCK_TAG_PREFIX) + 1 + 32  # a ticket's key: <prefix><alias>.<uuid4 hex>
LEASE_SECONDS = 20.0
POLL_SECONDS = 0.2
WAIT_SECONDS = 300.0
MAX_HOLD_SECONDS = 600.0


class TicketStore(Protocol):
    """Where tickets live: independent registers, one per key."""

    def read(self, prefix: str) -> dict[str, str]: ...

    def write(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...


class RegisteredModelTickets:
    """Tickets as tags of one registered model (values of a few dozen characters)."""

    def __init__(self, client, model_name: str):
        self.client, self.model_name = client, model_name

    def read(self, prefix: str) -> dict[str, str]:
        tags = self.client.get_registered_model(self.model_name).tags
        return {key: value for key, value in tags.items() if key.startswith(prefix)}

    def write(self, key: str, value: str) -> None:
        self.client.set_registered_model_tag(self.model_name, key, value)

    def delete(self, key: str) -> None:
        self.client.delete_registered_model_tag(self.model_name, key)


@dataclass(frozen=True)
class Ticket:
    choosing: bool
    number: int
    beat: int

    @classmethod
    def parse(cls, value: str) -> Ticket | None:
        try:
            data = json.loads(value)
            return cls(bool(data["choosing"]), int(data["number"]), int(data["beat"]))
        except (ValueError, KeyError, TypeError):
            return None


class AliasLock:
    """The bakery lock of one alias; use it as a context manager."""

    def __init__(
        self,
        store: TicketStore,
        alias: str,
        lease: float = LEASE_SECONDS,
        poll: float = POLL_SECONDS,
        timeout: float = WAIT_SECONDS,
        max_hold: float = MAX_HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.alias = store, alias
        self.lease, self.poll, self.timeout, self.max_hold, self.clock = lease, poll, timeout, max_hold, clock
        self.owner = uuid.uuid4().hex
        self.prefix = f"{LOCK_TAG_PREFIX}{alias}."
        self.key = self.prefix + self.owner
        self._ticket = Ticket(True, 0, 0)
        self._write_lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._last_beat = clock()
        self._started = clock()
        self._thread: threading.Thread | None = None
        self.reclaimed: list[str] = []  # owners of dead tickets this contender removed

    # -- taking and releasing ----------------------------------------------------------------

    def __enter__(self) -> AliasLock:
        self._write(Ticket(True, 0, 0))
        self._thread = threading.Thread(target=self._heartbeat, name="mlflow-clip-lock-heartbeat", daemon=True)
        self._thread.start()
        try:
            others = self._live_others()
            number = 1 + max([t.number for t in others.values() if t is not None] + [0])
            self._write(Ticket(False, number, self._ticket.beat))
            self._wait_for_turn(number)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def check_held(self) -> None:
        """Raise `LockError` if this contender may no longer hold the lock (write nothing then)."""
        if self._lost.is_set() or self.clock() - self._last_beat > self.lease / 2:
            raise LockError(
                f"Lost the lock of @{self.alias}: no heartbeat for {self.clock() - self._last_beat:.0f} s or the "
                "ticket was taken for dead; stopping before writing anything. Run the command again."
            )
        if self.key not in self.store.read(self.prefix):
            self._lost.set()
            raise LockError(
                f"Lost the lock of @{self.alias}: another contender took this one for dead. Run the command again."
            )

    def _wait_for_turn(self, number: int) -> None:
        deadline = self.clock() + self.timeout
        while True:
            blocking = [
                owner
                for owner, t in self._live_others().items()
                if t is None or t.choosing or (t.number and (t.number, owner) < (number, self.owner))
            ]
            if not blocking:
                return
            if self.clock() > deadline:
                raise LockError(
                    f"Timed out after {self.timeout:.0f} s waiting for {len(blocking)} other live promotion(s) of "
                    f"@{self.alias}; a dead one is recognised within {self.lease:.0f} s, so these are still running."
                )
            time.sleep(self.poll)

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.delete(self.key)
        except Exception as e:  # noqa: BLE001 - an unreleased ticket expires after one lease
            _logger.warning(
                "Could not remove the lock ticket %s (%s); it expires after %.0f s.", self.key, e, self.lease
            )

    # -- tickets -------------------------------------------------------------------------------

    def _write(self, ticket: Ticket) -> None:
        with self._write_lock:
            self._ticket = ticket
            value = json.dumps({"choosing": ticket.choosing, "number": ticket.number, "beat": ticket.beat})
            self.store.write(self.key, value)
            self._last_beat = self.clock()

    def _heartbeat(self) -> None:
        interval = self.lease / 8
        while not self._stop.wait(interval):
            if self.clock() - self._started > self.max_hold:
                _logger.warning("Held the lock of @%s for over %.0f s; letting it expire.", self.alias, self.max_hold)
                self._lost.set()
                return
            try:
                if self.key not in self.store.read(self.prefix):
                    self._lost.set()  # taken for dead: never write the ticket back
                    return
                ticket = self._ticket
                self._write(Ticket(ticket.choosing, ticket.number, ticket.beat + 1))
            except Exception as e:  # noqa: BLE001 - check_held fails once beats stop for half a lease
                _logger.debug("Lock heartbeat failed: %s", e)

    def _live_others(self) -> dict[str, Ticket | None]:
        """The other contenders' tickets that are alive; dead ones are deleted."""
        now = self.clock()
        live: dict[str, Ticket | None] = {}
        tickets = {k[len(self.prefix) :]: v for k, v in self.store.read(self.prefix).items() if k != self.key}
        for owner in list(self._seen):
            if owner not in tickets:
                del self._seen[owner]
        for owner, value in tickets.items():
            seen = self._seen.get(owner)
            if seen is None or seen[0] != value:
                self._seen[owner] = (value, now)
            elif now - seen[1] > self.lease:
                self._reclaim(owner)
                continue
            live[owner] = Ticket.parse(value)
        return live

    def _reclaim(self, owner: str) -> None:
        _logger.warning(
            "A promotion of @%s stopped without releasing its lock (no heartbeat for %.0f s); removing its ticket.",
            self.alias,
            self.lease,
        )
        try:
            self.store.delete(self.prefix + owner)
        except Exception as e:  # noqa: BLE001 - someone else may have removed it first
            _logger.debug("Could not remove dead ticket %s: %s", owner, e)
        self._seen.pop(owner, None)
        self.reclaimed.append(owner)
