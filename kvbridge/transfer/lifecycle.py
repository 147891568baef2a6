"""The transport-independent part of the one-sided transceivers (nixl.py, ucx.py).

A request's life: decode ``receive()``s (reserves blocks, sends ``ReceiveRequest``),
prefill ``send()``s once its KV is ready; then one side runs the one-sided operation
(push: the sender WRITEs, then ``WriteDone``; pull: ``BlocksReady``, the receiver READs,
then ``ReadDone``; NIXL attaches both to the operation, delivered after its data). Ending
early (abort, timeout, peer loss, errors) tells the peer and waits for its ``AbortAck``
while the peer may still touch our blocks; tombstones answer late messages for requests
already gone.

``LifecycleTransceiver`` holds this bookkeeping and message state machine; a backend
implements the transport hooks (hooks.py): ``_post`` (start a WRITE/READ), ``_notify`` (send a
control message), ``_xfer_state``/``_release`` (check/cancel an operation of ours),
``_xfer_completed``/``_xfer_failed`` (what a finished operation means to the transport),
``_sleep`` (an idle ``wait``'s sleep, waiting.py), plus ``poll``, ``close`` and the peer set-up.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kvbridge.config import TransferMode
from kvbridge.transfer import handshake
from kvbridge.transfer.base import (
    PROTOCOL_VERSION,
    Abort,
    AbortAck,
    BlocksReady,
    FailureCause,
    KVTransceiver,
    PeerInfo,
    ReadDone,
    ReceiveRequest,
    Role,
    TransferError,
    TransferEvent,
    TransferStatus,
    WriteDone,
    WriteStarted,
    encode,
    record,
)
from kvbridge.transfer.hooks import TransportHooks, _Req
from kvbridge.transfer.integrity import RunChecksums, pack_ids, packed_in_pool, unpack_ids
from kvbridge.transfer.waiting import WaitLoop

LAYOUT = "layer_block"


class LifecycleTransceiver(WaitLoop, TransportHooks, KVTransceiver):
    """Request bookkeeping and the message state machine shared by the backends."""

    _log = logging.getLogger("kvbridge.transfer.lifecycle")  # each backend sets its own
    _check_sender = False  # ignore messages about a request from a peer other than its own
    _read_notifies = False  # pull: the READ itself delivers ReadDone to the peer once complete
    metrics_label = ""  # the backend label of the transfer metrics (default: backend_name)

    def _init_lifecycle(self) -> None:
        self.mode = self.config.mode
        self.timeout_s = self.config.kv_transfer_timeout_ms / 1000.0
        self.last_transports: str | None = None
        self._peers: dict[str, Any] = {}
        self._reqs: dict[str, _Req] = {}
        self._active: set[str] = set()  # requests a poll must look at (timer running, op in flight, ending)
        self._asked: dict[str, tuple[str, list[int], Any]] = {}  # rid → (peer, dst ids, prepared) before send()
        self._tombstones: OrderedDict[str, FailureCause] = OrderedDict()  # rids ended early, for late messages
        self._events: list[TransferEvent] = []
        self._accepted: list[PeerInfo] = []  # from the bootstrap thread (list.append is atomic)
        self._lost: list[str] = []
        self._broken: str | None = None
        self._closed = False
        self._poll_at = self._prev_poll_at = 0.0  # when this poll and the one before it began
        self._init_waiting()
        self._checksums = RunChecksums(self.kv)  # (local ids, remote ids) → crc32 per joint run

    def _make_info(self, model_id: str, backend: str, agent_metadata: bytes) -> PeerInfo:
        lay = self.kv.layout
        return PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            backend=backend,
            agent_name=self.agent_name,
            agent_metadata=agent_metadata,
            region_bases=[self.kv.base_address],
            mem_type=self.mem_type,
            device_id=self.device_id,
            num_blocks=lay.num_blocks,
            block_bytes=lay.block_bytes,
            layout=LAYOUT,
            fingerprint=lay.fingerprint(model_id),
            fingerprint_fields={k: str(v) for k, v in lay.fingerprint_fields(model_id).items()},
            bootstrap="",
        )

    def _begin_poll(self, now: float) -> None:
        """Each backend's ``poll`` starts here (message times are known to within a poll)."""
        self._prev_poll_at, self._poll_at = self._poll_at, now

    def _take_events(self, now: float) -> list[TransferEvent]:
        """The events ended since the last call, counted in the metrics (end of ``poll``)."""
        out, self._events = self._events, []
        if out:
            self._last_activity = now
            label = self.metrics_label or self.backend_name
            for ev in out:
                record(label, ev)
        return out

    def _ready_events(self, min_events: int) -> list[TransferEvent] | None:
        """``wait``: events already ended (a send whose copy completed in the call) are
        returned without another poll: right after a large copy every call costs 5-15 µs."""
        if len(self._events) < min_events:
            return None
        return self._take_events(time.monotonic())

    # ----------------------------------------------------------------- connection
    @property
    def bootstrap_address(self) -> str:
        return self._server.address

    @property
    def refusals(self) -> list[tuple[str, str]]:
        """Handshakes this side's endpoint refused: (field, reason)."""
        return list(self._server.refusals)

    def connect(self, address: str, timeout_s: float = 10.0) -> str:
        for p in self._peers.values():
            if p.info.bootstrap == address and p.alive:
                return p.info.agent_name
        info, sock = handshake.handshake(address, self.config.shared_token, self._info, timeout_s)
        try:
            self._add_peer(info)
        except Exception:
            sock.close()
            raise
        self._server.watch(sock, info.agent_name)
        return info.agent_name

    def _check_new(self, request_id: str, block_ids: list[int], own_op: bool, packed: list[int] | None = None) -> Any:
        """Refuse a request id in use, and ids outside our pool when they come ``packed``
        (a pull sender's, as ``BlocksReady`` carries them) (ValueError); a backend checks
        the ids too and, when our own op will move them (``own_op``: push sender, pull
        receiver), may return its ``_prepare`` of them (``req.prepared``)."""
        if request_id in self._reqs:
            raise ValueError(f"request {request_id} is already being transferred")
        if packed is not None and not packed_in_pool(packed, self.kv.layout.num_blocks):
            raise ValueError(f"request {request_id}: block ids must be in 0..{self.kv.layout.num_blocks - 1}")
        return None

    # ----------------------------------------------------------------- decode side
    def receive(self, request_id: str, peer: str, block_ids: list[int]) -> None:
        # 1) the caller reserved block_ids; 2) tell the peer where to put the KV
        prepared = self._check_new(request_id, block_ids, own_op=self.mode is TransferMode.PULL)
        req = _Req(request_id, Role.RECEIVER, list(block_ids), peer=peer, prepared=prepared)
        if self.mode is TransferMode.PULL:  # encoded now, off the transfer's path
            req.notif = encode(ReadDone(request_id=request_id))
        self._reqs[request_id] = req
        p = self._peers.get(peer)
        if p is None or not p.alive:
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is not connected")
            return
        self._notify(peer, ReceiveRequest(request_id=request_id, block_runs=pack_ids(req.block_ids)))

    # ----------------------------------------------------------------- prefill side
    def send(self, request_id: str, block_ids: list[int]) -> None:
        push = self.mode is TransferMode.PUSH
        # pull: packed once, for BlocksReady and the range check (on the transfer's critical
        # path: a min/max pass and a packing each cost ~13 µs for 256 ids, caches cold)
        packed = None if push else pack_ids(block_ids)
        prepared = self._check_new(request_id, block_ids, own_op=push, packed=packed)
        req = _Req(request_id, Role.SENDER, list(block_ids), started=time.monotonic(), prepared=prepared, packed=packed)
        self._reqs[request_id] = req
        self._active.add(request_id)
        if request_id in self._tombstones:  # the receiver gave up before the KV was ready
            self._tombstones.pop(request_id)
            self._finish(req, FailureCause.ABORTED, "the receiver aborted before the KV was ready")
            return
        if request_id in self._asked:
            self._start_send(req, *self._asked.pop(request_id))

    def _start_send(self, req: _Req, peer: str, dst: list[int], prepared: Any = None) -> None:
        req.peer, req.peer_block_ids, req.peer_prepared = peer, dst, prepared
        if len(dst) != len(req.block_ids):
            self._end(req, FailureCause.BACKEND, f"receiver reserved {len(dst)} blocks, sender has {len(req.block_ids)}")
            return
        p = self._peers.get(peer)
        if p is None or not self._peer_usable(p):
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is gone")
            return
        if self.config.verify_checksums:
            req.checksums = self._checksums(req.block_ids, dst)
        if self.mode is TransferMode.PUSH:
            self._start_write(req, peer, dst)
        else:
            self._notify(peer, BlocksReady(request_id=req.request_id, block_runs=req.packed, checksums=req.checksums))

    # ----------------------------------------------------------------- checksums
    def _verify_and_finish(self, req: _Req, checksums: list[int], src_ids: list[int]) -> None:
        if checksums:
            mine = self._checksums(req.block_ids, src_ids)
            if mine != checksums:
                bad = [i for i, (a, b) in enumerate(zip(mine, checksums, strict=False)) if a != b]
                self._finish(req, FailureCause.CHECKSUM, f"checksum mismatch in run(s) {bad} of {len(checksums)}")
                return
        self._finish(req)

    # ----------------------------------------------------------------- abort
    def abort(self, request_id: str) -> None:
        req = self._reqs.get(request_id)
        if req is None:
            return
        self._end(req, FailureCause.ABORTED, "aborted by the caller")

    # ----------------------------------------------------------------- progress
    def _progress(self, req: _Req, now: float) -> None:
        if req.xfer is not None:
            state = "DONE" if req.xfer_done else self._xfer_state(req.xfer)
            if state == "DONE":
                self._xfer_completed(req)
                if req.ending is None:
                    self._xfer_done(req)
                    return
            elif state == "ERR":
                live = req.ending is None
                self._xfer_failed(req)
                if live:
                    return
            elif req.ending is not None and self._release(req.xfer):  # PROC, ending: cancel it
                req.xfer = None
        if req.ending is not None:
            if req.xfer is None and (not req.need_ack or now - req.ending_since > self.timeout_s):
                self._finish(req, req.ending, req.ending_msg)
            else:
                self._ending_stuck(req, now)
            return
        if req.started is not None and now - req.started > self.timeout_s:
            self._end(req, FailureCause.TIMEOUT, f"not done {self.config.kv_transfer_timeout_ms} ms after the transfer started")

    def _progress_active(self, now: float) -> None:
        """``_progress`` the requests that need it (``_active``), not every one reserved:
        a decode worker may hold dozens that wait for their prefill, and each costs a poll
        0.5-1 µs (more right after a copy)."""
        for rid in list(self._active):
            req = self._reqs.get(rid)
            if req is None:
                self._active.discard(rid)
            else:
                self._progress(req, now)

    def _xfer_done(self, req: _Req) -> None:
        if req.role is Role.SENDER:  # push: the WRITE is complete at the peer
            self._write_complete(req)
            self._finish(req)
            return
        # pull: our READ completed: let the sender free its blocks, then check ours
        assert req.peer is not None
        if self._read_notifies:
            self._wake_peer(req.peer)  # for the ReadDone that the READ delivered
        else:
            self._notify(req.peer, req.notif)
        self._verify_and_finish(req, req.checksums, req.peer_block_ids)

    # ----------------------------------------------------------------- messages
    def _on_msg(self, sender: str, msg: Any) -> None:
        rid = getattr(msg, "request_id", None)
        req = self._reqs.get(rid) if rid is not None else None
        if self._check_sender and req is not None and req.peer is not None and req.peer != sender:
            self._log.warning("ignored %s for %s from %s (its peer is %s)", type(msg).__name__, rid, sender, req.peer)
            return
        if isinstance(msg, ReceiveRequest):  # prefill: a receiver asks
            ids = self._peer_ids(sender, msg.block_runs, msg.request_id)
            if ids is None:
                self._notify(sender, Abort(request_id=msg.request_id, cause=FailureCause.BACKEND.value))
            elif req is not None and req.role is Role.SENDER and req.peer is None:
                self._start_send(req, sender, ids)
            elif msg.request_id in self._tombstones:  # we already gave up on it: say so
                self._notify(sender, Abort(request_id=msg.request_id, cause=self._tombstones[msg.request_id].value))
            else:
                prepared = self._prepare(ids, sender, msg.block_runs) if self.mode is TransferMode.PUSH else None
                self._asked[msg.request_id] = (sender, ids, prepared)
        elif isinstance(msg, WriteStarted):
            if req is not None and req.started is None:
                req.started = time.monotonic()
                self._active.add(req.request_id)
        elif isinstance(msg, WriteDone):
            if req is not None and req.role is Role.RECEIVER:
                req.num_bytes = self.kv.layout.num_layers * len(req.block_ids) * self.kv.layout.block_bytes
                self._peer_transferred(sender)
                if req.ending is not None:  # the data landed after we began ending: blocks are safe now
                    req.need_ack = False
                else:
                    # the data landed after the previous poll began: when an engine step ran
                    # between that poll and this one, the step is not transfer time
                    req.landed_after = self._prev_poll_at
                    # checksums are per joint run; joint runs are the same seen from either side
                    src = self._peer_ids(sender, msg.block_runs, req.request_id) if msg.checksums else []
                    if src is None:
                        self._end(req, FailureCause.BACKEND, f"malformed block ids from {sender}")
                    else:
                        self._verify_and_finish(req, list(msg.checksums), src)
        elif isinstance(msg, BlocksReady):  # decode, pull: read them now
            if req is None or req.role is not Role.RECEIVER or req.ending is not None:
                self._notify(sender, Abort(request_id=msg.request_id, cause=FailureCause.ABORTED.value))
                return
            req.started = time.monotonic()
            self._active.add(req.request_id)
            src = self._peer_ids(sender, msg.block_runs, req.request_id)
            if src is None:
                self._end(req, FailureCause.BACKEND, f"malformed block ids from {sender}")
                return
            req.peer_block_ids, req.checksums = src, list(msg.checksums)
            if len(req.peer_block_ids) != len(req.block_ids):
                self._end(req, FailureCause.BACKEND, f"sender offers {len(req.peer_block_ids)} blocks, {len(req.block_ids)} reserved")
                return
            req.peer_prepared = self._prepare(req.peer_block_ids, sender, msg.block_runs)
            try:
                req.xfer = self._post("READ", req.block_ids, sender, req.peer_block_ids, req.notif if self._read_notifies else b"", req)
            except TransferError as e:
                self._end(req, e.cause, str(e))
                return
            self._progress(req, time.monotonic())  # a READ done in _post: finish it now
        elif isinstance(msg, ReadDone):
            if req is not None and req.role is Role.SENDER:
                self._peer_transferred(sender)
                if req.ending is not None:
                    req.need_ack = False  # the reader is done with our blocks
                else:
                    req.num_bytes = self.kv.layout.num_layers * len(req.block_ids) * self.kv.layout.block_bytes
                    self._finish(req)
        elif isinstance(msg, Abort):
            cause = FailureCause(msg.cause) if msg.cause in FailureCause._value2member_map_ else FailureCause.ABORTED
            self._asked.pop(msg.request_id, None)
            if req is None:
                self._tombstones[msg.request_id] = FailureCause.ABORTED
                self._notify(sender, AbortAck(request_id=msg.request_id))
            elif req.ending is None:
                req.ack_to = sender
                self._end(req, cause, f"the peer ended the transfer ({cause.value})", tell_peer=False)
            else:
                req.need_ack = False
                req.ack_to = sender
        elif isinstance(msg, AbortAck):
            if req is not None:
                req.need_ack = False

    def _peer_ids(self, sender: str, packed: list[int], request_id: str) -> list[int] | None:
        """A peer's block ids from a message (``pack_ids``); None, logged, when malformed."""
        p = self._peers.get(sender)
        try:
            return unpack_ids(packed, p.info.num_blocks if p is not None else self.kv.layout.num_blocks)
        except ValueError as e:
            self._log.error("bad block ids from %s for %s: %s", sender, request_id, e)
            return None

    # ----------------------------------------------------------------- ending
    def _end(self, req: _Req, cause: FailureCause, message: str, tell_peer: bool = True) -> None:
        """Begin ending a request: cancel our op, tell the peer; the event follows once no
        one can touch the blocks any more (see ``_progress``)."""
        if req.ending is not None:
            return
        req.ending, req.ending_msg, req.ending_since = cause, message, time.monotonic()
        self._active.add(req.request_id)
        peer_may_touch = req.peer is not None and (
            (req.role is Role.RECEIVER and self.mode is TransferMode.PUSH)
            or (req.role is Role.SENDER and self.mode is TransferMode.PULL and bool(req.peer_block_ids))
        )
        p = self._peers.get(req.peer) if req.peer is not None else None
        if tell_peer and p is not None and p.alive:
            self._notify(p.info.agent_name, Abort(request_id=req.request_id, cause=cause.value))
            req.need_ack = bool(peer_may_touch)
        if req.xfer is not None and self._release(req.xfer):
            req.xfer = None
        if req.xfer is None and not req.need_ack:
            self._finish(req, cause, message)

    def _finish(self, req: _Req, cause: FailureCause | None = None, message: str = "") -> None:
        if self._reqs.pop(req.request_id, None) is None:
            return
        self._active.discard(req.request_id)
        if req.ack_to is not None:
            self._notify(req.ack_to, AbortAck(request_id=req.request_id))
        if cause is not None:
            self._tombstones[req.request_id] = cause
            while len(self._tombstones) > 10000:
                self._tombstones.popitem(last=False)
        now = time.monotonic()
        ev = TransferEvent(
            request_id=req.request_id,
            role=req.role,
            status=TransferStatus.DONE if cause is None else TransferStatus.FAILED,
            block_ids=tuple(req.block_ids),
            cause=cause,
            message=message,
            num_bytes=req.num_bytes if cause is None else 0,
            seconds=self._transfer_seconds(req, now),
        )
        if cause is None and req.peer is not None:
            self._finished_ok(req)
        if cause is not None:
            self._log.warning("kv transfer %s (%s) failed: %s: %s", req.request_id, req.role.value, cause.value, message)
        self._events.append(ev)

    @staticmethod
    def _transfer_seconds(req: _Req, now: float) -> float:
        """From the start of the transfer to the data being there. A push receiver knows
        only that WriteDone landed after its previous poll began: it counts to then (a lower
        bound), so an engine step that ran between the two polls is not transfer time."""
        if req.started is None:
            return 0.0
        end = max(req.landed_after, req.started) if req.landed_after else now
        return end - req.started

    def _peer_lost(self, name: str) -> None:
        p = self._peers.get(name)
        if p is None or not p.alive:
            return
        p.alive = False
        self._log.warning("kv transfer peer %s (%s) is gone", name, p.info.bootstrap)
        for rid, (peer, _, _) in list(self._asked.items()):
            if peer == name:
                del self._asked[rid]
        for req in list(self._reqs.values()):
            if req.peer == name:
                req.need_ack = False
                self._end(req, FailureCause.PEER_DEAD, f"peer {name} died", tell_peer=False)
                req.need_ack = False
        self._drop_peer(name, p)

    # ----------------------------------------------------------------- mid-step answers
    def mid_step_hook(self) -> Callable[[], None] | None:
        return self._answer_peers if self._peer_may_wait() else None

    def _peer_may_wait(self) -> bool:
        """A peer's op on our blocks may be waiting for our transport's answer: push, a
        receive not done (its WRITE may start any time); pull, BlocksReady sent, no ReadDone."""
        push = self.mode is TransferMode.PUSH
        return any(r.ending is None and r.peer is not None and (r.role is Role.RECEIVER) == push for r in self._reqs.values())

    # ----------------------------------------------------------------- state
    @property
    def num_pending(self) -> int:
        return len(self._reqs)

    @property
    def broken_reason(self) -> str | None:
        return self._broken
