"""The cache transceiver interface, its typed messages, errors and metrics.

A transceiver moves KV blocks between the KV caches of two engines. It works on a
``KVCache`` (registered once) and lists of block ids; it knows nothing of the scheduler.
Every backend (``nixl.py``, ``ucx.py``) implements ``KVTransceiver``.

Roles, per request (one process can play both for different requests):

    decode side (receiver)                      prefill side (sender)
    ----------------------                      ---------------------
    ids = pool.allocate(n)        # 1) reserve
    t.receive(rid, peer, ids)     # 2) ask  ──▶  (request id, block ids)
                                                 t.send(rid, src_ids)   # 3) KV ready
             push: ◀── WRITE src→ids, then notification(rid, checksums)
             pull: ──▶ READ  src→ids, then notification(rid) so the sender frees
    t.poll() → TransferEvent(rid, DONE)          t.poll() → TransferEvent(rid, DONE)

Block lifetime contract (the transceiver never allocates or frees pool blocks; it only
*holds* the ids it was given until it reports exactly one terminal event per request):

    outcome                     receiver (decode) owner does        sender (prefill) owner does
    -------------------------   ---------------------------------   ---------------------------
    DONE                        keeps the blocks: they are the      frees its blocks
                                request's computed KV
    FAILED TIMEOUT              frees the reserved blocks           frees its blocks
    FAILED ABORTED              frees (after abort(), wait for      frees (after abort() or the
                                the FAILED event, never before)     peer's abort)
    FAILED PEER_DEAD            frees                               frees
    FAILED CHECKSUM             frees (the KV is not usable)        (gets DONE: its part worked)
                                                                    frees
    FAILED BACKEND              frees                               frees
    handshake refused           ``connect()`` raised HandshakeRefused before any request was
                                handed over: nothing is held by the transceiver; the caller
                                frees what it reserved for that peer (the peer logs it too)

"Frees" means the owner calls ``BlockPool.free(ids)`` when the event arrives. The event is
only emitted once no remote agent can still write into or read from those blocks (an
in-flight one-sided op is completed or cancelled first), so freeing on the event is safe.

Metadata exchange: every transceiver listens on a bootstrap endpoint (``bootstrap_address``,
publish it with the worker's etcd record). The decode side calls ``connect(address)`` once
per prefill worker; one round trip exchanges versioned ``PeerInfo`` both ways (token first,
then protocol, layout and fingerprint fields) and keeps a TCP connection open for liveness.

Polling: ``poll()`` is non-blocking and is called once per engine step; it drives the
backend's progress (no progress thread, no background busy-polling). ``wait()`` blocks
until an event arrives or a deadline passes, sleeping between polls (never spinning).
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import Counter

from kvbridge.transfer.stats import STATS

if TYPE_CHECKING:
    from kvbridge.config import CacheTransceiverConfig
    from kvbridge.engine.kv_cache import KVCache

PROTOCOL_VERSION = 2  # 2: block ids travel packed (integrity.pack_ids)


# --------------------------------------------------------------------------- states, errors


class Role(enum.Enum):
    SENDER = "sender"  # prefill: owns the source blocks
    RECEIVER = "receiver"  # decode: owns the destination blocks


class TransferStatus(enum.Enum):
    DONE = "done"
    FAILED = "failed"


class FailureCause(enum.Enum):
    TIMEOUT = "timeout"  # kv_transfer_timeout_ms passed since the transfer started
    PEER_DEAD = "peer_dead"  # the peer's process or connection went away
    ABORTED = "aborted"  # abort() here or on the peer (client cancelled)
    HANDSHAKE_REFUSED = "handshake_refused"  # token, protocol or fingerprint mismatch
    CHECKSUM = "checksum"  # a transferred run does not match its checksum
    BACKEND = "backend"  # the transport reported an error


class TransferError(RuntimeError):
    """A transfer or connection failed; ``cause`` says why."""

    def __init__(self, cause: FailureCause, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class HandshakeRefused(TransferError):
    """The peer (or we) refused the handshake; ``field`` names what did not match."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(FailureCause.HANDSHAKE_REFUSED, message)
        self.field = field


class BackendUnavailable(RuntimeError):
    """A configured backend cannot load on this machine (names what is missing)."""


@dataclass(frozen=True)
class TransferEvent:
    """The one terminal event of a request on one side (in-process, not a wire message)."""

    request_id: str
    role: Role
    status: TransferStatus
    block_ids: tuple[int, ...]
    cause: FailureCause | None = None
    message: str = ""
    num_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.DONE


# --------------------------------------------------------------------------- wire messages
# Every message that crosses a process boundary is one of these Structs, tagged by type and
# carrying the protocol version; ``encode``/``decode`` below are the only serializer.


class Msg(msgspec.Struct, tag=True, kw_only=True):
    v: int = PROTOCOL_VERSION


class Hello(Msg):
    """Handshake, client → server: who I am and what my KV looks like."""

    token: str
    info: PeerInfo


class Welcome(Msg):
    """Handshake, server → client: accepted; here is my metadata."""

    info: PeerInfo


class Refused(Msg):
    """Handshake refused; ``field`` names what did not match (or ``token``)."""

    field: str
    reason: str


class PeerInfo(msgspec.Struct, kw_only=True):
    """What a peer needs to address our KV region, and what must match to exchange KV."""

    protocol_version: int
    backend: str  # "nixl" | "ucx"
    agent_name: str
    agent_metadata: bytes  # the backend's connection blob (NIXL agent metadata, UCX worker address)
    region_bases: list[int]  # base address of each registered region (one region today)
    mem_type: str  # DRAM | VRAM
    device_id: int
    num_blocks: int
    block_bytes: int
    layout: str  # "layer_block": offset = (layer * num_blocks + block) * block_bytes
    fingerprint: str
    fingerprint_fields: dict[str, str]
    bootstrap: str  # host:port of its bootstrap endpoint


class ReceiveRequest(Msg):
    """decode → prefill: for ``request_id``, here are the blocks I reserved."""

    request_id: str
    block_runs: list[int]  # the ids, packed: [first, count, ...] (integrity.pack_ids)


class WriteStarted(Msg):
    """prefill → decode (push): I start writing; your timeout clock starts now."""

    request_id: str


class WriteDone(Msg):
    """prefill → decode (push), delivered with the WRITE: data is in your blocks."""

    request_id: str
    checksums: list[int]  # one per run consecutive on both sides, empty when not verifying
    block_runs: list[int] = []  # the sender's ids, packed (to find those runs), empty when not verifying


class BlocksReady(Msg):
    """prefill → decode (pull): read these blocks (the clock starts now)."""

    request_id: str
    block_runs: list[int]  # the ids, packed
    checksums: list[int]


class ReadDone(Msg):
    """decode → prefill (pull): I have read your blocks; free them."""

    request_id: str


class Abort(Msg):
    """Either way: stop this request (cause given); the peer answers AbortAck once no
    operation of its own can still touch the blocks."""

    request_id: str
    cause: str  # FailureCause value


class AbortAck(Msg):
    request_id: str


AnyMsg = Hello | Welcome | Refused | ReceiveRequest | WriteStarted | WriteDone | BlocksReady | ReadDone | Abort | AbortAck

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMsg)


class ProtocolError(ValueError):
    pass


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> AnyMsg:
    try:
        msg = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable transceiver message: {e}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.v} from peer, this side speaks {PROTOCOL_VERSION}")
    return msg


# --------------------------------------------------------------------------- metrics

TRANSFER_FAILURES = Counter("kvbridge_kv_transfer_failures", "Failed KV transfers by cause", ["backend", "role", "cause"])


def record(backend: str, ev: TransferEvent) -> None:
    """Count a finished transfer."""
    if ev.ok:
        STATS.add(backend, ev.role.value, ev.num_bytes, ev.seconds)  # cheap: see stats.py
    else:
        TRANSFER_FAILURES.labels(backend, ev.role.value, ev.cause.value if ev.cause else "unknown").inc()


# --------------------------------------------------------------------------- interface


class KVTransceiver(ABC):
    """Moves KV blocks between this engine's ``KVCache`` and peers' caches.

    Construction registers the KV region once and starts the bootstrap endpoint (a small
    TCP listener bound to ``host``; see handshake.py). Methods are called from the engine's
    thread only; none blocks except ``connect`` (one handshake round trip) and ``wait``.
    """

    backend_name: str = "?"

    def __init__(self, kv: KVCache, config: CacheTransceiverConfig, *, model_id: str) -> None:
        self.kv = kv
        self.config = config
        self.model_id = model_id

    # ----------------------------------------------------------------- connection
    @property
    @abstractmethod
    def bootstrap_address(self) -> str:
        """``host:port`` of this side's bootstrap endpoint: publish it (etcd) for peers."""

    @abstractmethod
    def connect(self, address: str, timeout_s: float = 10.0) -> str:
        """Handshake with the peer at ``address`` (its bootstrap endpoint); returns the
        peer's name for ``receive``. Idempotent. Raises ``HandshakeRefused`` naming the
        mismatching field (the peer refuses too and logs it), or ``TransferError``."""

    # ----------------------------------------------------------------- decode side
    @abstractmethod
    def receive(self, request_id: str, peer: str, block_ids: list[int]) -> None:
        """Decode side: ``block_ids`` (reserved by the caller) are to be filled with the KV
        of ``request_id`` (the same id the prefill side uses) from ``peer`` (a name from
        ``connect``). Ends with one event for this request. The timeout clock starts when
        the sender starts the transfer; until then the request waits for the prefill (it
        ends early only on peer death or ``abort``), so a caller that gives up aborts it."""

    # ----------------------------------------------------------------- prefill side
    @abstractmethod
    def send(self, request_id: str, block_ids: list[int]) -> None:
        """Prefill side: the KV of ``request_id`` is ready in ``block_ids``; deliver it to
        whichever peer asked (or will ask) for it. The timeout clock starts now. Ends with
        one event for this request."""

    # ----------------------------------------------------------------- both
    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request (client gone). Its FAILED(ABORTED) event follows once nothing can
        touch its blocks any more; free them then. Unknown ids are ignored."""

    @abstractmethod
    def poll(self) -> list[TransferEvent]:
        """Drive progress; return the terminal events that happened since the last call.
        Non-blocking; call once per engine step."""

    def mid_step_hook(self) -> Callable[[], None] | None:
        """What the engine calls between the layers of its next step, or None: a peer's
        WRITE into our blocks (push) or READ out of them (pull) may complete only once our
        transport answered it (UCX, where the messages go over tcp: between hosts), and an
        engine step holds that answer back for its length (a whole prefill, for a pull
        sender). The hook answers without handling any
        message, so it is safe in the middle of a step. Called once per step."""
        return None

    def wait(self, timeout_s: float, min_events: int = 1) -> list[TransferEvent]:
        """Poll until ``min_events`` events arrived or ``timeout_s`` passed. Sleeps between
        polls with a growing delay (50 µs → 1 ms), so an idle wait costs almost no CPU."""
        deadline = time.monotonic() + timeout_s
        events: list[TransferEvent] = []
        delay = 20e-6
        while True:
            got = self.poll()
            if got:
                events.extend(got)
                delay = 20e-6
                if len(events) >= min_events:
                    return events
            if time.monotonic() >= deadline:
                return events
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def wake(self) -> None:
        """Make a ``wait`` in progress return soon (any thread may call it): the engine has
        something else to do. Backends whose ``wait`` sleeps long implement it."""
        return None  # the default wait() above sleeps at most 1 ms at a time

    @property
    @abstractmethod
    def num_pending(self) -> int:
        """Requests that have not had their terminal event yet."""

    @property
    def healthy(self) -> bool:
        """False while the transceiver is broken (a worker's /health reports it)."""
        return self.broken_reason is None

    @property
    def broken_reason(self) -> str | None:
        return None

    @abstractmethod
    def close(self) -> None:
        """Stop the bootstrap endpoint, cancel in-flight operations, release handles and
        registrations. Pending requests are aborted (peers are told); no more events come:
        a caller shutting down owns all its blocks again."""

    def __enter__(self) -> KVTransceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
