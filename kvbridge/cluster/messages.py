"""Every control-plane message, and the one place where they are serialized.

Values in etcd and payloads on NATS are msgspec Structs encoded as msgpack. Each carries
``version``; a message of another protocol version is refused with ``ProtocolError`` (one line
that names both versions), never half-read.
"""

from __future__ import annotations

import enum
import time
from typing import TypeVar

import msgspec

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be decoded, or was written by another protocol version."""


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # aggregated: prefills and decodes its own requests

    def can_prefill(self) -> bool:
        return self in (WorkerRole.PREFILL, WorkerRole.BOTH)

    def can_decode(self) -> bool:
        return self in (WorkerRole.DECODE, WorkerRole.BOTH)


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker announces in etcd under ``/kvbridge/<namespace>/workers/<worker_id>``."""

    worker_id: str
    role: WorkerRole
    endpoint: str  # base URL of its HTTP API, e.g. "http://127.0.0.1:8101"
    model: str
    kv_fingerprint: str  # what must match between prefill and decode (model, dtype, layout...)
    transfer_address: str  # "host:port" of the transceiver's handshake
    started_at: float = msgspec.field(default_factory=time.time)
    version: int = PROTOCOL_VERSION


class KVEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Blocks a worker's prefix cache gained (``stored``) or dropped (``removed``), by chained
    prefix hash. ``seq`` counts 1, 2, 3... per worker process; ``reset`` means "forget all you knew
    of this worker; ``stored`` is its whole cache"."""

    worker_id: str
    seq: int
    stored: list[int] = msgspec.field(default_factory=list)
    removed: list[int] = msgspec.field(default_factory=list)
    reset: bool = False
    version: int = PROTOCOL_VERSION


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's load, published periodically."""

    worker_id: str
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_blocks: int
    ts: float = msgspec.field(default_factory=time.time)
    version: int = PROTOCOL_VERSION

    @property
    def free_fraction(self) -> float:
        return self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


class _Versioned(msgspec.Struct):
    version: int = 0


M = TypeVar("M", WorkerInfo, KVEvent, LoadReport)

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {
    t: msgspec.msgpack.Decoder(t) for t in (WorkerInfo, KVEvent, LoadReport)
}
_VERSION_DECODER = msgspec.msgpack.Decoder(_Versioned)


def encode(msg: WorkerInfo | KVEvent | LoadReport) -> bytes:
    return _ENCODER.encode(msg)


def decode(data: bytes, kind: type[M]) -> M:
    try:
        msg = _DECODERS[kind].decode(data)
    except msgspec.DecodeError as e:
        version = _peek_version(data)
        if version is not None and version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"{kind.__name__} of protocol version {version}; this kvbridge speaks {PROTOCOL_VERSION}"
            ) from None
        raise ProtocolError(f"undecodable {kind.__name__}: {e}") from None
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{kind.__name__} of protocol version {msg.version}; this kvbridge speaks {PROTOCOL_VERSION}"
        )
    return msg


def _peek_version(data: bytes) -> int | None:
    try:
        return _VERSION_DECODER.decode(data).version
    except msgspec.DecodeError:
        return None
