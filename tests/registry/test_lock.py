"""The alias lock: mutual exclusion among many contenders, dead ones recognised within a lease by
their stopped heartbeat (never by clocks), and a holder that lost its ticket writes nothing.

Fast: an in-memory ticket store shared by threads, each contender with a short lease; a
contender is "killed" by making every one of its store operations fail from a chosen step on,
as if its process had been SIGKILLed there (its heartbeat stops, it never releases)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from mlflow_clip.registry.lock import AliasLock, LockError

LEASE = 0.6


class MemoryTickets:
    """Independent registers behind a mutex, like tags of a registered model."""

    def __init__(self):
        self.tags: dict[str, str] = {}
        self.mutex = threading.Lock()

    def read(self, prefix):
        with self.mutex:
            return {k: v for k, v in self.tags.items() if k.startswith(prefix)}

    def write(self, key, value):
        with self.mutex:
            self.tags[key] = value

    def delete(self, key):
        with self.mutex:
            self.tags.pop(key, None)


class Killed(Exception):
    pass


class Contender:
    """One contender's view of the store; `kill_after` store operations, it is dead."""

    def __init__(self, store: MemoryTickets, kill_after: int | None = None, delay: float = 0.0):
        self.store, self.kill_after, self.delay = store, kill_after, delay
        self.ops = 0
        self.dead = threading.Event()

    def _step(self):
        self.ops += 1
        if self.dead.is_set() or (self.kill_after is not None and self.ops > self.kill_after):
            self.dead.set()
            raise Killed()
        if self.delay:
            time.sleep(random.random() * self.delay)

    def read(self, prefix):
        self._step()
        return self.store.read(prefix)

    def write(self, key, value):
        self._step()
        self.store.write(key, value)

    def delete(self, key):
        self._step()
        self.store.delete(key)


class Section:
    """Counts contenders inside the critical section at once."""

    def __init__(self):
        self.inside = 0
        self.max_inside = 0
        self.entries = 0
        self.mutex = threading.Lock()

    def visit(self, hold: float):
        with self.mutex:
            self.inside += 1
            self.entries += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(hold)
        with self.mutex:
            self.inside -= 1


def _contend(view, section: Section, results: list, clock=time.monotonic, hold: float = 0.02, die_inside=False):
    try:
        with AliasLock(view, "production", lease=LEASE, poll=0.01, timeout=20, clock=clock) as lock:
            lock.check_held()
            section.visit(hold)
            if die_inside:
                view.dead.set()  # SIGKILL while holding: no release, no more heartbeats
                raise Killed()
        results.append("done")
    except Killed:
        results.append("killed")
    except LockError as e:
        results.append(f"lock error: {e}")


def _run(views, section, stagger: float = 0.0, **kwargs):
    results: list[str] = []
    threads = [
        threading.Thread(
            target=_contend,
            args=(v, section, results),
            kwargs={**kwargs, "die_inside": getattr(v, "die_inside", False)},
        )
        for v in views
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(timeout=60)
    return results, time.monotonic() - started


def test_sixteen_contenders_enter_one_at_a_time():
    store, section = MemoryTickets(), Section()
    results, _ = _run([Contender(store, delay=0.002) for _ in range(16)], section)
    assert results.count("done") == 16
    assert section.max_inside == 1 and section.entries == 16
    assert store.tags == {}  # every ticket released


@pytest.mark.parametrize("moment", ["choosing", "numbered", "waiting", "holding"])
def test_a_contender_killed_at_any_step_delays_the_others_by_at_most_a_lease(moment):
    """Killed after writing its choosing ticket, after taking its number, while waiting behind a
    holder, or while holding the lock."""
    store, section = MemoryTickets(), Section()
    first = Contender(store)
    victim = Contender(store, kill_after={"choosing": 1, "numbered": 3, "waiting": 6, "holding": None}[moment])
    victim.die_inside = moment == "holding"
    others = [Contender(store, delay=0.002) for _ in range(4)]
    results, seconds = _run([first, victim, *others], section, stagger=0.01, hold=0.05)
    assert results.count("done") >= 5 and "killed" in results, results
    assert section.max_inside == 1
    assert seconds < 5 * 0.05 + 3 * LEASE + 2.0  # five holds, plus at most one lease lost to the dead ticket
    assert not any(k.startswith("mlflow_clip.lock.") for k in store.tags), store.tags  # the dead ticket was removed


def test_random_kills_never_break_mutual_exclusion():
    rng = random.Random(7)
    store, section = MemoryTickets(), Section()
    views = [Contender(store, kill_after=rng.choice([None, None, 2, 4, 6, 9]), delay=0.003) for _ in range(12)]
    results, _ = _run(views, section, hold=0.02)
    assert section.max_inside == 1
    assert results.count("done") + results.count("killed") == 12, results
    assert results.count("done") == sum(v.kill_after is None for v in views) or section.entries >= results.count("done")


def test_a_contender_whose_clock_is_700_s_ahead_cannot_break_exclusion():
    """Staleness is measured by each observer's own clock: an offset clock changes nothing."""
    store, section = MemoryTickets(), Section()
    results: list[str] = []
    skewed = threading.Thread(
        target=_contend,
        args=(Contender(store), section, results),
        kwargs={"clock": lambda: time.monotonic() + 700.0, "hold": 0.2},
    )
    fair = [
        threading.Thread(target=_contend, args=(Contender(store), section, results), kwargs={"hold": 0.2})
        for _ in range(3)
    ]
    for thread in [skewed, *fair]:
        thread.start()
    for thread in [skewed, *fair]:
        thread.join(timeout=30)
    assert results == ["done"] * 4 and section.max_inside == 1


def test_a_holder_taken_for_dead_writes_nothing():
    """A holder whose ticket someone removed (after a stall longer than the lease) must stop."""
    store = MemoryTickets()
    with AliasLock(store, "production", lease=LEASE, poll=0.01) as lock:
        lock.check_held()
        store.delete(lock.key)  # what a contender does to a ticket that stopped beating
        with pytest.raises(LockError, match="took this one for dead"):
            lock.check_held()
        time.sleep(LEASE / 4)
        assert lock.key not in store.tags  # the heartbeat never writes it back


def test_a_live_slow_holder_keeps_its_lock_by_heartbeat():
    """Holding for three leases is fine while the heartbeat runs: nobody takes it for dead."""
    store, section = MemoryTickets(), Section()
    results: list[str] = []
    slow = threading.Thread(target=_contend, args=(Contender(store), section, results), kwargs={"hold": 3 * LEASE})
    slow.start()
    time.sleep(0.1)
    fast = threading.Thread(target=_contend, args=(Contender(store), section, results))
    fast.start()
    slow.join(timeout=30)
    fast.join(timeout=30)
    assert results == ["done", "done"] and section.max_inside == 1


def test_waiting_gives_up_after_the_timeout_on_a_live_holder():
    store = MemoryTickets()
    with AliasLock(store, "production", lease=LEASE, poll=0.01):
        with pytest.raises(LockError, match="Timed out after 0 s waiting for 1 other live promotion"):
            with AliasLock(store, "production", lease=LEASE, poll=0.01, timeout=0.3):
                pass
    assert store.tags == {}
