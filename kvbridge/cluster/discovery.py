"""Worker discovery in etcd: a worker keeps a key alive on a lease, the frontend watches them.

Keys: ``/kvbridge/<namespace>/workers/<worker_id>`` → ``WorkerInfo`` (messages.encode), attached
to a lease of ``ttl`` seconds (≤ 10, default 10) that the worker refreshes every ttl/3 seconds.
A worker that dies leaves the view when its lease expires; a caller that saw a call to it fail
drops it at once with ``WorkerWatcher.remove``.

etcd client: **aetcd** (PyPI ``aetcd==1.0.0``). Chosen over the others evaluated here:
- aetcd: maintained (1.0.0, 2026), asyncio-native on grpc.aio — leases, a real streaming watch,
  no thread per call; needs grpcio + protobuf, which install as wheels. Works with etcd 3.5.
- etcd3gw (OpenStack): maintained, light, but blocking (requests) over the HTTP gateway; its watch
  is a streaming HTTP response read in a thread, so every call would go through a thread pool.
- etcd-client-py (Rust bindings): maintained, but a young, thinly documented API.
- etcd3 (python-etcd3): unmaintained since 2020 and broken with protobuf ≥ 4.
Whatever the client does inside, this module never trusts it to reconnect: on any error it
closes the client, logs one line naming the endpoint, waits with capped exponential backoff, and
starts over with a fresh one (a fresh list + watch for the watcher; a refresh, or a new lease
and key if the lease is gone, for the registration).

Contracts:
- ``Registration`` never raises out of its task: etcd down at start or later means one warning
  line per attempt and retries; ``wait_registered`` tells a caller when the key is in etcd.
- ``WorkerWatcher`` keeps its last known view while etcd is unreachable (requests keep flowing
  between known workers); after reconnecting it re-lists and reconciles (callbacks fire for
  the difference only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aetcd

from .backoff import Backoff, cancel_and_wait, one_line
from .messages import ProtocolError, WorkerInfo, WorkerRole, decode, encode

log = logging.getLogger(__name__)

DEFAULT_TTL = 10
MAX_TTL = 10


def workers_prefix(namespace: str) -> str:
    return f"/kvbridge/{namespace}/workers/"


def worker_key(namespace: str, worker_id: str) -> str:
    return workers_prefix(namespace) + worker_id


def parse_etcd_endpoint(endpoint: str) -> tuple[str, int]:
    """``http://host:port`` or ``host:port`` → (host, port)."""
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if not url.hostname:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected http://host:port")
    return url.hostname, url.port or 2379


def _display(endpoint: str) -> str:
    host, port = parse_etcd_endpoint(endpoint)
    return f"{host}:{port}"


def _new_client(endpoint: str, call_timeout: float) -> aetcd.Client:
    host, port = parse_etcd_endpoint(endpoint)
    # short gRPC reconnect backoff: we recreate the client on errors anyway
    options = {
        "grpc.initial_reconnect_backoff_ms": 200,
        "grpc.min_reconnect_backoff_ms": 200,
        "grpc.max_reconnect_backoff_ms": 1000,
        "grpc.enable_http_proxy": 0,
    }
    return aetcd.Client(host=host, port=port, timeout=call_timeout, options=options)


async def _close_quietly(client: aetcd.Client | None) -> None:
    if client is None:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 2.0)


class _Outage:
    """One warning line when etcd stops answering (and one every ``repeat_s`` while it stays
    down; the other attempts log at debug), one info line when it answers again."""

    def __init__(self, endpoint: str, what: str, backoff_cap: float = 5.0, repeat_s: float = 30.0) -> None:
        self.endpoint = _display(endpoint)
        self.what = what
        self.down = False
        self.backoff = Backoff(initial=min(0.25, backoff_cap), cap=backoff_cap)
        self.repeat_s = repeat_s
        self._last_warning = 0.0

    def failed(self, error: BaseException) -> float:
        delay = self.backoff.next()
        now = time.monotonic()
        level = logging.WARNING if not self.down or now - self._last_warning >= self.repeat_s else logging.DEBUG
        if level == logging.WARNING:
            self._last_warning = now
        log.log(
            level, "etcd at %s unreachable (%s) for %s; retrying in %.1f s (attempt %d)",
            self.endpoint, one_line(error), self.what, delay, self.backoff.attempts,
        )  # fmt: skip
        self.down = True
        return delay

    def ok(self) -> None:
        if self.down:
            log.info("etcd at %s reachable again (%s)", self.endpoint, self.what)
        self.down = False
        self.backoff.reset()


# ---------------------------------------------------------------------------- registration


class Registration:
    """Keeps ``info`` registered in etcd under a lease for as long as it runs.

    ``await start()`` returns at once (the loop runs as a task); ``await wait_registered()``
    waits for the key to be in etcd. If the lease is lost (expired while etcd or this process
    was unreachable, or etcd came back without its data) a new lease and key are made by
    themselves. ``await stop()`` revokes the lease, so the worker leaves at once;
    ``stop(revoke=False)`` only stops the keepalive (what a crash looks like: gone after ttl).
    """

    def __init__(
        self,
        etcd_endpoint: str,
        info: WorkerInfo,
        namespace: str = "default",
        ttl: int = DEFAULT_TTL,
        call_timeout: float = 2.0,
    ) -> None:
        if not 1 <= ttl <= MAX_TTL:
            raise ValueError(f"lease ttl must be 1..{MAX_TTL} s, got {ttl}")
        parse_etcd_endpoint(etcd_endpoint)
        self.etcd_endpoint = etcd_endpoint
        self.namespace = namespace
        self.ttl = ttl
        self.call_timeout = min(call_timeout, ttl / 3)
        self._info = info
        self._value = encode(info)
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._registered = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._dirty = True  # the key must be (re)checked / (re)written

    @property
    def key(self) -> str:
        return worker_key(self.namespace, self._info.worker_id)

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvbridge-registration-{self._info.worker_id}")

    async def wait_registered(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._registered.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def update(self, info: WorkerInfo) -> None:
        """Announce a new value under the same key (written on the next keepalive tick)."""
        if info.worker_id != self._info.worker_id:
            raise ValueError("update() cannot change worker_id; start another Registration")
        self._info, self._value, self._dirty = info, encode(info), True

    async def stop(self, revoke: bool = True) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if revoke and self._lease_id is not None:
            await self._revoke()
        await _close_quietly(self._client)
        self._client, self._lease_id = None, None
        self._registered.clear()

    async def _revoke(self) -> None:
        """Up to three tries, the later ones on a fresh client with a longer deadline: a slow
        etcd at the moment of a clean stop must not leave the worker listed for ttl seconds."""
        timeout, error = max(2.0, self.call_timeout), None
        for attempt in range(3):
            if attempt or self._client is None:
                await _close_quietly(self._client)
                self._client = _new_client(self.etcd_endpoint, timeout)
            try:
                await asyncio.wait_for(self._client.revoke_lease(self._lease_id), timeout)
                return
            except Exception as e:
                error = e
                if _lease_gone(e):
                    return
        log.warning("could not revoke lease of %s (%s); it expires in ≤ %d s", self.key, one_line(error), self.ttl)

    async def __aenter__(self) -> Registration:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _run(self) -> None:
        # retry at least every ttl/3 so that a short outage does not cost the lease
        outage = _Outage(self.etcd_endpoint, f"registration of {self.key}", backoff_cap=max(0.25, self.ttl / 3))
        while True:
            try:
                if self._client is None:
                    self._client = _new_client(self.etcd_endpoint, self.call_timeout)
                if self._lease_id is not None:
                    reply = await self._client.refresh_lease(self._lease_id)
                    if reply is None or reply.TTL <= 0:
                        log.warning("lease of %s expired; registering again", self.key)
                        self._lease_id, self._dirty = None, True
                if self._lease_id is None:
                    lease = await self._client.lease(self.ttl)
                    self._lease_id, self._dirty = lease.id, True
                if self._dirty:
                    await self._ensure_key()
                outage.ok()
                await asyncio.sleep(self.ttl / 3)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = outage.failed(e)
                await _close_quietly(self._client)
                self._client, self._dirty = None, True  # after an outage, check that the key is there
                await asyncio.sleep(delay)

    async def _ensure_key(self) -> None:
        current = await self._client.get(self.key.encode())
        if current is None or current.lease != self._lease_id or current.value != self._value:
            await self._client.put(self.key.encode(), self._value, lease=self._lease_id)
        self._dirty = False
        if not self._registered.is_set():
            log.info("registered %s in etcd at %s (lease %x, ttl %d s)", self.key,
                     _display(self.etcd_endpoint), self._lease_id, self.ttl)  # fmt: skip
            self._registered.set()


def _lease_gone(error: BaseException) -> bool:
    """etcd's answer to revoking a lease it no longer has (an earlier try got through)."""
    return "lease not found" in str(error)


# ---------------------------------------------------------------------------- watcher


class WorkerWatcher:
    """A live view ``{worker_id: WorkerInfo}`` of the workers registered in ``namespace``.

    Initial list, then a watch from the next revision; the list is redone after any error and
    every ``resync_s`` seconds as a safety net. ``on_add(info)`` fires for a new worker and for a
    changed value; ``on_remove(worker_id)`` when it leaves (lease expired, revoked, or
    ``remove()``). Callbacks run on the event loop and must not block.

    ``remove(worker_id)`` drops a worker at once (a call to it failed); it comes back only when
    it registers again (a new lease or value), not while its old lease is still alive.
    """

    def __init__(
        self,
        etcd_endpoint: str,
        namespace: str = "default",
        *,
        on_add: Callable[[WorkerInfo], None] | None = None,
        on_remove: Callable[[str], None] | None = None,
        resync_s: float = 30.0,
        call_timeout: float = 2.0,
    ) -> None:
        parse_etcd_endpoint(etcd_endpoint)
        self.etcd_endpoint = etcd_endpoint
        self.namespace = namespace
        self.resync_s = resync_s
        self.call_timeout = call_timeout
        self._on_add = on_add
        self._on_remove = on_remove
        self._view: dict[str, WorkerInfo] = {}
        self._stamp: dict[str, tuple[int, int]] = {}  # worker_id -> (lease, mod_revision) as seen
        self._suppressed: dict[str, tuple[int, int]] = {}  # remove()d: stamp at removal
        self._changed = asyncio.Event()  # set and replaced on every change of the view
        self._synced = asyncio.Event()
        self._connected = False
        self._task: asyncio.Task | None = None
        self._client: aetcd.Client | None = None
        self._warned_bad: set[str] = set()

    # -- what callers read
    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return dict(self._view)

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._view.get(worker_id)

    def by_role(self, role: WorkerRole) -> list[WorkerInfo]:
        """Workers that can do ``role`` (a BOTH worker counts as prefill and as decode), by id."""
        if role is WorkerRole.PREFILL:
            ok = WorkerRole.can_prefill
        elif role is WorkerRole.DECODE:
            ok = WorkerRole.can_decode
        else:
            return [w for _, w in sorted(self._view.items()) if w.role is WorkerRole.BOTH]
        return [w for _, w in sorted(self._view.items()) if ok(w.role)]

    @property
    def connected(self) -> bool:
        """True while the watch on etcd is up (False: the view is the last known one)."""
        return self._connected

    def remove(self, worker_id: str) -> None:
        """Drop ``worker_id`` now, until it registers again."""
        stamp = self._stamp.get(worker_id, (0, 0))
        self._suppressed[worker_id] = stamp
        self._drop(worker_id)
        self._notify()

    # -- life cycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvbridge-watcher-{self.namespace}")

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first full list from etcd."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def wait_for(self, predicate: Callable[[dict[str, WorkerInfo]], bool], timeout: float) -> bool:
        """Wait until ``predicate(view)`` holds; False on timeout."""

        async def _wait() -> None:
            while not predicate(self._view):
                await self._changed.wait()

        try:
            await asyncio.wait_for(_wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await _close_quietly(self._client)
        self._client, self._connected = None, False

    async def __aenter__(self) -> WorkerWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- the loop
    async def _run(self) -> None:
        outage = _Outage(self.etcd_endpoint, f"watch of {workers_prefix(self.namespace)}", backoff_cap=2.0)
        prefix = workers_prefix(self.namespace).encode()
        while True:
            watch = None
            try:
                self._client = _new_client(self.etcd_endpoint, self.call_timeout)
                listing = await self._client.get_prefix(prefix)
                await self._reconcile(listing.kvs)
                watch = await self._client.watch_prefix(prefix, start_revision=listing.header.revision + 1)
                self._connected = True
                self._synced.set()
                outage.ok()
                self._notify()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_s):
                        async for event in watch:
                            await self._apply_event(event)
                        raise ConnectionError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._connected = False
                self._notify()
                delay = outage.failed(e)
                await _close_quietly(self._client)
                self._client = None
                await asyncio.sleep(delay)
                continue
            # resync: a fresh client and list (not an error)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 1.0)
            await _close_quietly(self._client)
            self._client = None

    def _worker_id(self, key: bytes) -> str:
        return key.decode()[len(workers_prefix(self.namespace)) :]

    def _decode(self, worker_id: str, value: bytes) -> WorkerInfo | None:
        try:
            info = decode(value, WorkerInfo)
        except ProtocolError as e:
            if worker_id not in self._warned_bad:
                self._warned_bad.add(worker_id)
                log.warning("ignoring worker %s: %s", worker_id, e)
            return None
        if info.worker_id != worker_id:
            log.warning("ignoring worker key %s: its value names worker %s", worker_id, info.worker_id)
            return None
        return info

    async def _reconcile(self, kvs) -> None:
        seen: set[str] = set()
        for kv in kvs:
            worker_id = self._worker_id(kv.key)
            seen.add(worker_id)
            self._put(worker_id, kv.value, (kv.lease, kv.mod_revision))
        for worker_id in [w for w in self._view if w not in seen]:
            self._drop(worker_id)
        for worker_id in [w for w in self._suppressed if w not in seen]:
            del self._suppressed[worker_id]
        self._notify()

    async def _apply_event(self, event) -> None:
        worker_id = self._worker_id(event.kv.key)
        if event.kind == "PUT":
            self._put(worker_id, event.kv.value, (event.kv.lease, event.kv.mod_revision))
        else:
            self._suppressed.pop(worker_id, None)
            self._stamp.pop(worker_id, None)
            self._drop(worker_id)
        self._notify()

    def _put(self, worker_id: str, value: bytes, stamp: tuple[int, int]) -> None:
        self._stamp[worker_id] = stamp
        if worker_id in self._suppressed:
            if self._suppressed[worker_id] == stamp:
                return  # the registration we dropped, still on its old lease
            del self._suppressed[worker_id]
        info = self._decode(worker_id, value)
        if info is None:
            self._drop(worker_id)
            return
        if self._view.get(worker_id) == info:
            return
        self._view[worker_id] = info
        log.info("worker %s (%s) at %s joined", worker_id, info.role.value, info.endpoint)
        self._callback(self._on_add, info)

    def _drop(self, worker_id: str) -> None:
        if self._view.pop(worker_id, None) is not None:
            log.info("worker %s left", worker_id)
            self._callback(self._on_remove, worker_id)

    def _callback(self, fn, arg) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception as e:
            log.error("worker watcher callback %s failed: %s", getattr(fn, "__name__", fn), one_line(e))

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
