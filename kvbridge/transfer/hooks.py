"""What a one-sided backend (nixl.py, ucx.py) implements for ``LifecycleTransceiver``
(lifecycle.py), and ``_Req``, the record of one request that both work on.

The lifecycle calls these hooks; a backend overrides the ones that raise and may override
the others (their defaults do nothing, or the obvious thing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvbridge.transfer.base import FailureCause, Msg, PeerInfo, Role


@dataclass
class _Req:
    """One request on one side, from ``receive()``/``send()`` to its event."""

    request_id: str
    role: Role
    block_ids: list[int]
    peer: str | None = None  # agent name
    peer_block_ids: list[int] = field(default_factory=list)
    started: float | None = None  # when the transfer started (timeout clock)
    xfer: Any = None  # in-flight operation handle (ours)
    xfer_done: bool = False  # ``_post`` saw our operation complete (``_progress`` need not ask)
    notif: bytes = b""  # encoded message for after our op: WriteDone (push sender), ReadDone (pull receiver)
    checksums: list[int] = field(default_factory=list)
    ending: FailureCause | None = None  # terminating with this cause
    ending_msg: str = ""
    ending_since: float = 0.0
    need_ack: bool = False  # waiting for the peer's AbortAck before the blocks are safe
    ack_to: str | None = None  # the peer that aborted: answer AbortAck once we are safe
    num_bytes: int = 0
    prepared: Any = None  # ``_prepare`` of our ids (from ``_check_new``)
    packed: list[int] | None = None  # pull sender: our ids as BlocksReady carries them (``pack_ids``)
    peer_prepared: Any = None  # ``_prepare`` of the peer's ids (push sender, pull receiver)
    landed_after: float = 0.0  # push receiver: WriteDone arrived after this (the poll before the one that took it)


class TransportHooks:
    """The transport side of a request's life; every method is called from the engine's thread."""

    def _add_peer(self, info: PeerInfo) -> None:
        raise NotImplementedError

    def _post(self, op: str, local_ids: list[int], peer: str, remote_ids: list[int], notif: bytes, req: _Req) -> Any:
        """Post our one-sided ``op`` ("WRITE"/"READ"); the handle, or raise TransferError."""
        raise NotImplementedError

    def _notify(self, peer: str, msg: Msg | bytes) -> None:
        """Send a control message (or an already encoded one)."""
        raise NotImplementedError

    def _wake_peer(self, peer: str) -> None:
        """Wake ``peer``'s ``wait()`` for a message that went without ``_notify``."""

    def _release(self, handle: Any) -> bool:
        """Cancel/free an operation of ours: whether it is gone (its blocks are safe)."""
        raise NotImplementedError

    def _xfer_state(self, handle: Any) -> str:
        """"PROC", "DONE" or "ERR"."""
        raise NotImplementedError

    def _xfer_completed(self, req: _Req) -> None:
        """Our operation is DONE: drop the handle (``req.xfer = None``)."""
        raise NotImplementedError

    def _xfer_failed(self, req: _Req) -> None:
        """Our operation is ERR: drop the handle; end the request unless it is ending."""
        raise NotImplementedError

    def _start_write(self, req: _Req, peer: str, dst: list[int]) -> None:
        """Push: announce and post the WRITE of ``req`` into ``dst`` on ``peer``."""
        raise NotImplementedError

    def _prepare(self, block_ids: list[int], peer: str | None, packed: list[int] | None = None) -> Any:
        """What ``_post`` needs of ``block_ids`` (ours, or ``peer``'s; ``packed``: the same as
        they came in a message), made once they are known, not after the prefill step:
        ``_post`` finds it in ``req.prepared``/``req.peer_prepared``."""

    def _answer_peers(self) -> None:
        """Progress the transport, so that it answers its peers' flushes, handling no
        message: the mid-step hook (safe in the middle of an engine step)."""

    def _write_complete(self, req: _Req) -> None:
        """Push, sender: our WRITE completed (before the DONE event)."""

    def _peer_usable(self, p: Any) -> bool:
        return bool(p.alive)

    def _peer_transferred(self, peer: str) -> None:
        """The peer reported its one-sided operation with us done (WriteDone/ReadDone)."""

    def _finished_ok(self, req: _Req) -> None:
        """A request with a peer ended DONE (before its event is queued)."""

    def _ending_stuck(self, req: _Req, now: float) -> None:
        """An ending request still waits for its operation or the peer's AbortAck."""

    def _drop_peer(self, name: str, p: Any) -> None:
        """The peer is gone and its requests are ending: free what the transport holds."""
