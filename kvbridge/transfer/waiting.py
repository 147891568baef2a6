"""How an idle transceiver waits for news (``wait``), shared by the one-sided backends.

``wait`` polls until it has events, then returns to the engine. Between polls it re-polls
at once, yielding the core, while an event is due within microseconds (``_due_soon``), and
otherwise sleeps in the backend's ``_sleep`` until news for it (a peer's nudge, a UCX
event), ``wake()`` or a timeout. docs/tuning.md says what this costs in CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvbridge.config import TransferMode
from kvbridge.transfer.base import Role, TransferEvent

if TYPE_CHECKING:
    from kvbridge.engine.kv_cache import KVCache

SPIN_AFTER_POST_S = 200e-6  # after posting our op, ``wait`` re-polls without sleeping this long
HOT_S = 5e-3  # after a message or event, ``wait`` re-polls without sleeping this long
OWN_OP_SPIN_S = 1e-3  # an op of ours in flight: ``wait`` re-polls without sleeping this long after posting
OWN_OP_SLEEP_S = 200e-6  # ... and then sleeps at most this long between polls (it waits on the peer)
WATCH_S = 50e-6  # between two such polls, a backend watches for news this long (_watch_briefly)


class WaitLoop:
    """The ``wait``/``wake`` half of ``LifecycleTransceiver`` (lifecycle.py), which keeps the
    requests this reads and sets ``_last_activity`` (messages, events) and ``_own_op_since``
    (ops posted)."""

    kv: KVCache
    mode: TransferMode
    _reqs: dict[str, Any]
    _active: set[str]
    _closed: bool
    poll: Callable[[], list[TransferEvent]]  # the backend's

    def _init_waiting(self) -> None:
        self._own_op_since = 0.0  # when we last posted a one-sided op
        self._woken = False  # wake() was called: wait() returns to the engine
        self._last_activity = 0.0  # last message or event

    def wait(self, timeout_s: float, min_events: int = 1) -> list[TransferEvent]:
        """Poll until ``min_events`` events, ``timeout_s``, ``wake()`` or close. While
        something is due within microseconds (``_due_soon``) re-poll at once, yielding the
        core; otherwise sleep in the backend's ``_sleep``, which news for us ends early."""
        ready = self._ready_events(min_events)
        if ready is not None:
            return ready
        deadline = time.monotonic() + timeout_s
        events: list[TransferEvent] = []
        while True:
            self._arm_sleep()
            events.extend(self.poll())
            now = time.monotonic()
            left = deadline - now
            if len(events) >= min_events or left <= 0 or self._closed or self._take_wake():
                return events
            if self._due_soon(now):
                self._watch_briefly()
                continue
            self._sleep(min(left, OWN_OP_SLEEP_S) if self._own_op_in_flight() else left)

    def _own_op_in_flight(self) -> bool:
        return any(r.xfer is not None for rid in self._active if (r := self._reqs.get(rid)) is not None)

    def _ready_events(self, min_events: int) -> list[TransferEvent] | None:
        """At least ``min_events`` events that need no poll, or None (lifecycle.py)."""
        return None

    def _watch_briefly(self) -> None:
        """Between two polls while something is due: look for news the cheapest way the
        backend has, for ``WATCH_S`` at most, then yield the core. UCX-direct keeps the plain
        yield: a receiver spinning on UCX progress made the sender's tag send 35 -> 55 µs."""
        os.sched_yield()  # releases the GIL too; time.sleep(0) would sleep ~50 µs (timer slack)

    def _arm_sleep(self) -> None:
        """Before each poll in ``wait``: news that arrives from now on ends the next ``_sleep``."""

    def _sleep(self, left: float) -> None:
        """Sleep until news for us, or ``left`` seconds at most (a backend may cap it)."""
        raise NotImplementedError

    def wake(self) -> None:
        self._woken = True  # each backend's wait() checks it between polls (_take_wake)

    def _take_wake(self) -> bool:
        """Whether ``wake()`` was called since the last check (``wait`` then returns)."""
        woken, self._woken = self._woken, False
        return woken

    def _due_soon(self, now: float) -> bool:
        """Whether the next event is expected within microseconds, so that ``wait`` re-polls
        at once instead of sleeping (a sleep, even of 50 µs, costs 60-110 µs on a small VM,
        once or twice per request). It is: our own operation is in flight or just posted;
        the peer's operation on our blocks runs (its WRITE in push, its READ in pull: its
        message follows the copy, and a sleeping target slows a CMA copy into it by up to
        30%), for as long as the copy should take at 2 GB/s plus 1 ms (a peer busy with an
        engine step wakes us later); or there was traffic in the last ``HOT_S``. The spin is
        bounded and happens only in ``wait``, when the engine has nothing to compute. An op
        of ours that is still in flight ``OWN_OP_SPIN_S`` after it was posted waits on a
        busy peer's answer: ``wait`` then sleeps briefly between polls."""
        if now - self._last_activity < HOT_S or now - self._own_op_since < SPIN_AFTER_POST_S:
            return True
        per_block = self.kv.layout.num_layers * self.kv.layout.block_bytes
        for rid in self._active:
            r = self._reqs.get(rid)
            if r is None or r.ending is not None:
                continue
            if r.xfer is not None:
                if now - self._own_op_since < OWN_OP_SPIN_S:
                    return True
                continue
            if r.started is not None and (
                (r.role is Role.RECEIVER and self.mode is TransferMode.PUSH)
                or (r.role is Role.SENDER and self.mode is TransferMode.PULL and r.peer is not None)
            ):
                if now - r.started < len(r.block_ids) * per_block / 2e9 + 1e-3:
                    return True
        return False
