"""KV and load events over NATS (official nats-py client), and the router's views of them.

Subjects: ``kvbridge.<ns>.kv.<worker_id>`` carry ``KVEvent`` (prefix hashes stored/removed),
``kvbridge.<ns>.load.<worker_id>`` carry ``LoadReport``; payloads are messages.encode().

    bus = EventBus("nats://127.0.0.1:4222", namespace="default")
    await bus.start()                                 # connects in the background, forever
    kv = KVEventPublisher(bus, "prefill-0")           # BlockPool(on_event=kv.on_block_event)
    index, loads = KVIndex(), LoadView()
    await bus.subscribe_kv(index.apply); await bus.subscribe_load(loads.apply)
    index.longest_prefix("prefill-0", prefix_hashes(prompt, block_size))

Contracts:
- Nothing here raises into a caller because NATS is down. ``start()`` returns at once; the
  client reconnects forever with capped exponential backoff; one warning line when the
  connection is lost (or the first connect fails), one info line when it is back.
- Publishing while disconnected buffers in nats-py's bounded pending buffer (``pending_bytes``)
  and is flushed on reconnect; past that bound, or before the first connect, an event is
  dropped and counted in ``EventBus.dropped``.
- Subscriptions are made once and survive reconnects (nats-py replays them).
- Core NATS has no delivery guarantee: ``KVIndex`` notes gaps in ``seq``; a publisher with a
  ``snapshot`` callable sends a full ``reset`` event after every reconnect to heal them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .backoff import Backoff, cancel_and_wait, one_line
from .messages import KVEvent, LoadReport, ProtocolError, decode, encode

log = logging.getLogger(__name__)


def kv_subject(namespace: str, worker_id: str = "*") -> str:
    return f"kvbridge.{namespace}.kv.{worker_id}"


def load_subject(namespace: str, worker_id: str = "*") -> str:
    return f"kvbridge.{namespace}.load.{worker_id}"


def _display(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1]


class EventBus:
    """One NATS connection for a process: publish and subscribe KV and load events."""

    def __init__(
        self,
        nats_endpoint: str,
        namespace: str = "default",
        *,
        name: str = "kvbridge",
        pending_bytes: int = 1 << 20,
        backoff_cap: float = 2.0,
        repeat_warning_s: float = 30.0,
    ) -> None:
        if "://" not in nats_endpoint:
            nats_endpoint = f"nats://{nats_endpoint}"
        self.nats_endpoint = nats_endpoint
        self.namespace = namespace
        self.name = name
        self.pending_bytes = pending_bytes
        self.dropped = 0
        self._backoff = Backoff(initial=0.1, cap=backoff_cap)
        self._repeat_warning_s = repeat_warning_s
        self._nc: NATS | None = None
        self._connect_task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._down_since: float | None = None
        self._last_warning = 0.0
        self._subscriptions: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = []
        self._on_reconnect: list[Callable[[], None]] = []
        self._bad_subjects: set[str] = set()

    # -- life cycle
    async def start(self) -> None:
        """Start connecting (in the background, retrying forever); returns at once."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(self._connect(), name="kvbridge-nats-connect")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        task, self._connect_task = self._connect_task, None
        await cancel_and_wait(task)
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
        self._connected.clear()

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (on the event loop) after every reconnect."""
        self._on_reconnect.append(fn)

    # -- publish (never raises)
    async def publish_kv(self, event: KVEvent) -> bool:
        return await self._publish(kv_subject(self.namespace, event.worker_id), encode(event))

    async def publish_load(self, report: LoadReport) -> bool:
        return await self._publish(load_subject(self.namespace, report.worker_id), encode(report))

    async def _publish(self, subject: str, payload: bytes) -> bool:
        nc = self._nc
        if nc is None or not (nc.is_connected or nc.is_reconnecting):  # before the first connect
            self.dropped += 1
            return False
        try:
            await nc.publish(subject, payload)  # buffered while reconnecting, up to pending_bytes
            return True
        except Exception as e:
            self.dropped += 1
            log.debug("NATS publish on %s dropped: %s", subject, one_line(e))
            return False

    # -- subscribe
    async def subscribe_kv(self, handler: Callable[[KVEvent], Any], worker_id: str = "*") -> None:
        await self._subscribe(kv_subject(self.namespace, worker_id), KVEvent, handler)

    async def subscribe_load(self, handler: Callable[[LoadReport], Any], worker_id: str = "*") -> None:
        await self._subscribe(load_subject(self.namespace, worker_id), LoadReport, handler)

    async def _subscribe(self, subject: str, kind: type, handler: Callable[[Any], Any]) -> None:
        async def cb(msg: Msg) -> None:
            try:
                message = decode(msg.data, kind)
            except ProtocolError as e:
                if msg.subject not in self._bad_subjects:
                    self._bad_subjects.add(msg.subject)
                    log.warning("ignoring messages on %s: %s", msg.subject, e)
                return
            try:
                result = handler(message)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:
                log.error("handler for %s failed: %s", msg.subject, one_line(e))

        self._subscriptions.append((subject, cb))
        if self._nc is not None and self._connected.is_set():
            await self._nc.subscribe(subject, cb=cb)
            await self.flush()  # the server has the subscription when this returns

    async def flush(self, timeout: float = 2.0) -> bool:
        """Round trip to the server: what was published/subscribed before is processed by it."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.flush(timeout)
            return True
        except Exception as e:
            log.debug("NATS flush failed: %s", one_line(e))
            return False

    # -- connection
    def _next_server(self, servers: list, _info: dict) -> tuple[Any, float]:
        server = servers[0]
        return server, (self._backoff.next() if server.reconnects > 0 else 0.0)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if self._down_since is None or now - self._last_warning >= self._repeat_warning_s:
            log.warning(message)
            self._last_warning = now
        else:
            log.debug(message)
        if self._down_since is None:
            self._down_since = now

    async def _error_cb(self, e: Exception) -> None:
        self._warn(f"NATS at {_display(self.nats_endpoint)} unreachable ({one_line(e)}); retrying")

    async def _disconnected_cb(self) -> None:
        if self._connected.is_set() and self._connect_task is not None:  # not close()
            self._connected.clear()
            self._warn(f"NATS at {_display(self.nats_endpoint)} disconnected; reconnecting (publishes buffered up to {self.pending_bytes} bytes)")

    async def _reconnected_cb(self) -> None:
        self._up("reconnected")
        for fn in self._on_reconnect:
            try:
                fn()
            except Exception as e:
                log.error("NATS reconnect callback failed: %s", one_line(e))

    def _up(self, what: str) -> None:
        down_for = "" if self._down_since is None else f" after {time.monotonic() - self._down_since:.1f} s"
        log.info("NATS at %s %s%s", _display(self.nats_endpoint), what, down_for)
        self._down_since = None
        self._backoff.reset()
        self._connected.set()

    async def _connect(self) -> None:
        nc = NATS()
        self._nc = nc
        await nc.connect(
            servers=[self.nats_endpoint],
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # forever
            reconnect_time_wait=0.5,  # first connect: fixed wait; reconnects: _next_server backoff
            reconnect_to_server_handler=self._next_server,
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=2,
            pending_size=self.pending_bytes,
            error_cb=self._error_cb,
            disconnected_cb=self._disconnected_cb,
            reconnected_cb=self._reconnected_cb,
        )
        for subject, cb in self._subscriptions:
            await nc.subscribe(subject, cb=cb)
        await self.flush()
        self._up("connected")


# ---------------------------------------------------------------------------- publishers


class KVEventPublisher:
    """Turns a BlockPool's ``on_event(stored, removed)`` into ``KVEvent``s, in order.

    ``on_block_event`` may be called from any thread (the engine thread); events are queued (at
    most ``max_queued``; the oldest are dropped past that, leaving a seq gap) and sent by one
    task on the bus's event loop. ``snapshot``, if given, returns every hash the worker holds;
    it is called on the event loop after each reconnect to send a ``reset`` event.
    """

    def __init__(
        self,
        bus: EventBus,
        worker_id: str,
        *,
        snapshot: Callable[[], Sequence[int]] | None = None,
        max_queued: int = 10_000,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self._snapshot = snapshot
        self._loop = loop or asyncio.get_running_loop()
        self._queue: deque[KVEvent] = deque(maxlen=max_queued)
        self._lock = threading.Lock()
        self._seq = 0
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._send_loop(), name=f"kvbridge-kv-publisher-{worker_id}")
        if snapshot is not None:
            bus.on_reconnect(self.send_snapshot)

    def on_block_event(self, stored: list[int], removed: list[int]) -> None:
        """Thread-safe; never blocks, never raises because of NATS."""
        if not stored and not removed:
            return
        self._put(list(stored), list(removed), reset=False)

    def send_snapshot(self) -> None:
        if self._snapshot is not None:
            self._put(list(self._snapshot()), [], reset=True)

    def _put(self, stored: list[int], removed: list[int], reset: bool) -> None:
        with self._lock:
            self._seq += 1
            self._queue.append(KVEvent(worker_id=self.worker_id, seq=self._seq, stored=stored, removed=removed, reset=reset))
        if self._on_loop_thread():
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._queue:
                        break
                    event = self._queue.popleft()
                await self.bus.publish_kv(event)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until the queue is handed to the NATS client (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await cancel_and_wait(self._task)


class LoadPublisher:
    """Publishes ``sample()`` every ``interval_s`` seconds until closed."""

    def __init__(self, bus: EventBus, sample: Callable[[], LoadReport], interval_s: float = 0.5) -> None:
        self.bus = bus
        self._sample = sample
        self.interval_s = interval_s
        self._task = asyncio.create_task(self._run(), name="kvbridge-load-publisher")

    async def _run(self) -> None:
        while True:
            try:
                await self.bus.publish_load(self._sample())
            except Exception as e:  # a bad sample must not stop the reports
                log.error("load sample failed: %s", one_line(e))
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await cancel_and_wait(self._task)


# ---------------------------------------------------------------------------- views


class KVIndex:
    """Which worker holds which prefix-hashed block: ``{hash: {worker_id}}``, fed by KVEvents."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._by_worker: dict[str, set[int]] = {}
        self._seq: dict[str, int] = {}
        self.gaps = 0  # events seen missing (lost while NATS was down, or dropped)

    def apply(self, event: KVEvent) -> None:
        last = self._seq.get(event.worker_id)
        if event.reset or (last is not None and event.seq <= 1 < last):
            self.remove_worker(event.worker_id)  # a full snapshot, or a restarted worker
        elif last is not None and event.seq <= last:
            return  # duplicate or out of date
        elif last is not None and event.seq != last + 1:
            self.gaps += 1
            log.debug("KV events %d..%d of %s missing", last + 1, event.seq - 1, event.worker_id)
        self._seq[event.worker_id] = event.seq
        held = self._by_worker.setdefault(event.worker_id, set())
        for h in event.removed:
            if h in held:
                held.discard(h)
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(event.worker_id)
                    if not holders:
                        del self._holders[h]
        for h in event.stored:
            held.add(h)
            self._holders.setdefault(h, set()).add(event.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it left; or a reset follows)."""
        for h in self._by_worker.pop(worker_id, ()):
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[h]
        self._seq.pop(worker_id, None)

    def longest_prefix(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its chained prefix hashes, in order) the worker
        holds."""
        held = self._by_worker.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def prefix_lengths(self, hashes: Sequence[int]) -> dict[str, int]:
        """``longest_prefix`` for every worker holding at least the first block, in one pass."""
        if not hashes:
            return {}
        alive = set(self._holders.get(hashes[0], ()))
        out = dict.fromkeys(alive, 0)
        for h in hashes:
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for w in alive:
                out[w] += 1
        return out

    def num_blocks(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    @property
    def workers(self) -> list[str]:
        return sorted(self._by_worker)


class LoadView:
    """The latest ``LoadReport`` of each worker; reports older than ``stale_s`` (by local receive
    time) are treated as unknown."""

    def __init__(self, stale_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s = stale_s
        self._clock = clock
        self._reports: dict[str, tuple[float, LoadReport]] = {}

    def apply(self, report: LoadReport) -> None:
        self._reports[report.worker_id] = (self._clock(), report)

    def get(self, worker_id: str) -> LoadReport | None:
        entry = self._reports.get(worker_id)
        if entry is None or self._clock() - entry[0] > self.stale_s:
            return None
        return entry[1]

    def remove_worker(self, worker_id: str) -> None:
        self._reports.pop(worker_id, None)

    def snapshot(self) -> dict[str, LoadReport]:
        return {w: r for w in list(self._reports) if (r := self.get(w)) is not None}


__all__ = [
    "EventBus",
    "KVEventPublisher",
    "KVIndex",
    "LoadPublisher",
    "LoadView",
    "kv_subject",
    "load_subject",
]
