"""NIXL backend (UCX by default, LIBFABRIC selectable): one-sided WRITE (push) or READ (pull).

Set-up (once):
  - one NIXL agent, progress thread off: progress is driven by ``poll()`` from the engine
    loop (a progress thread busy-polls a core; on two cores that halves throughput)
  - the whole KV region registered once (DRAM on CPU, VRAM on CUDA)
  - a prepared descriptor list with one descriptor per (layer, block), addressed by index
    ``layer * num_blocks + block``; one per peer for its region (from the handshake)

A transfer of block ids ``src → dst`` is ``make_prepped_xfer`` with the indices of every
(layer, block) in layer-major order. Runs of ids consecutive on *both* sides are adjacent
in memory on both sides, and NIXL merges adjacent descriptors of a prepared transfer into
one: a run costs one descriptor per layer (checked with NIXL's telemetry: 4+2 scattered
blocks on one layer → 2 descriptors). ``runs()`` computes the same runs for checksums.

Messages ride NIXL notifications (``send_notif``, and the notification attached to the
WRITE in push, delivered only after the data). Liveness rides the bootstrap TCP connection.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbridge.config import CacheTransceiverConfig, TransferMode
from kvbridge.engine.kv_cache import KVCache
from kvbridge.transfer import handshake, probe
from kvbridge.transfer.base import (
    PROTOCOL_VERSION,
    Abort,
    AbortAck,
    BackendUnavailable,
    BlocksReady,
    FailureCause,
    KVTransceiver,
    Msg,
    PeerInfo,
    ProtocolError,
    ReadDone,
    ReceiveRequest,
    Role,
    TransferError,
    TransferEvent,
    TransferStatus,
    WriteDone,
    WriteStarted,
    decode,
    encode,
    record,
)

log = logging.getLogger("kvbridge.transfer.nixl")

LAYOUT = "layer_block"
_OWN_OP_CAP = 50e-6  # poll interval while our own op is in flight
_SPIN_S = 200e-6  # after posting, re-poll without sleeping this long (sleeps are >= ~60 µs)
_HOT_S = 2e-3  # after a message or event, poll every 50 µs this long before relying on nudges


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Runs consecutive on both sides: [(src_first, dst_first, length), ...]."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


@dataclass
class _Peer:
    info: PeerInfo
    dlist: Any = None  # prepared remote descriptor list
    alive: bool = True
    transports_logged: bool = False
    transports_since: float | None = None  # first completed transfer (then the log line is due)
    transports_want: bool = False  # we ran the one-sided op: wait for its table
    transports_read: float = 0.0


@dataclass
class _Req:
    request_id: str
    role: Role
    block_ids: list[int]
    peer: str | None = None  # agent name
    peer_block_ids: list[int] = field(default_factory=list)
    started: float | None = None  # when the transfer started (timeout clock)
    xfer: Any = None  # in-flight NIXL handle (ours)
    checksums: list[int] = field(default_factory=list)
    ending: FailureCause | None = None  # terminating with this cause
    ending_msg: str = ""
    ending_since: float = 0.0
    need_ack: bool = False  # waiting for the peer's AbortAck before the blocks are safe
    ack_to: str | None = None  # the peer that aborted: answer AbortAck once we are safe
    num_bytes: int = 0


class NixlTransceiver(KVTransceiver):
    backend_name = "nixl"

    def __init__(
        self,
        kv: KVCache,
        config: CacheTransceiverConfig,
        *,
        model_id: str,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "kvbridge",
        nixl_backend: str | None = None,
    ) -> None:
        super().__init__(kv, config, model_id=model_id)
        self.nixl_backend = (nixl_backend or config.nixl_backend).upper()
        self.mode = config.mode
        self.timeout_s = config.kv_transfer_timeout_ms / 1000.0
        self._ucx_log = probe.setup_ucx_log() if self.nixl_backend == "UCX" else None
        self._ucx_log_pos = 0
        self._ucx_text = ""
        self.last_transports: str | None = None
        inst = probe.nixl_install()
        api = __import__(f"{inst.module}._api", fromlist=["nixl_agent"])
        self.agent_name = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        conf = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
        self.agent = api.nixl_agent(self.agent_name, conf)
        try:
            self.agent.create_backend(self.nixl_backend, {})
        except Exception as e:  # NIXL raises its own error types
            st = probe.plugin_status(self.nixl_backend)
            raise BackendUnavailable(
                f"NIXL backend {self.nixl_backend} cannot start: {st.describe() if not st.loads else e}"
            ) from None

        # register the region once; one descriptor per (layer, block)
        lay = kv.layout
        self.mem_type = "VRAM" if kv.is_cuda else "DRAM"
        self.device_id = (kv.device.index or 0) if kv.is_cuda else 0
        self._reg = self.agent.register_memory([(kv.base_address, lay.total_bytes, self.device_id, "")], self.mem_type)
        self._local_dlist = self.agent.prep_xfer_dlist(
            "", _block_descs(kv.base_address, lay.num_layers, lay.num_blocks, lay.block_bytes, self.device_id), self.mem_type
        )
        self._bytes_np = kv.as_bytes().numpy() if not kv.is_cuda else None
        fields = {k: str(v) for k, v in lay.fingerprint_fields(model_id).items()}
        self._info = PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            backend=f"nixl/{self.nixl_backend}",
            agent_name=self.agent_name,
            agent_metadata=self.agent.get_agent_metadata(),
            region_bases=[kv.base_address],
            mem_type=self.mem_type,
            device_id=self.device_id,
            num_blocks=lay.num_blocks,
            block_bytes=lay.block_bytes,
            layout=LAYOUT,
            fingerprint=lay.fingerprint(model_id),
            fingerprint_fields=fields,
            bootstrap="",
        )
        self._peers: dict[str, _Peer] = {}
        self._reqs: dict[str, _Req] = {}
        self._active: set[str] = set()  # requests a poll must look at (timer running, op in flight, ending)
        self._asked: dict[str, tuple[str, list[int]]] = {}  # rid → (peer, dst ids) before send()
        self._tombstones: OrderedDict[str, FailureCause] = OrderedDict()  # rids ended early, for late messages
        self._events: list[TransferEvent] = []
        self._accepted: list[PeerInfo] = []  # from the bootstrap thread (list.append is atomic)
        self._lost: list[str] = []
        self._broken: str | None = None
        self._wake = threading.Event()
        self._own_op_since = 0.0  # when we last posted a one-sided op (wait() spins briefly after)
        self._last_activity = 0.0  # last message or event (wait() stays quick for a while after)
        self._server = handshake.BootstrapServer(
            host, port, config.shared_token, lambda: self._info, self._accepted.append, self._lost.append, self._wake.set
        )
        self._info.bootstrap = self._server.address
        if len(inst.copies) > 1:
            log.warning("more than one NIXL is installed (%s); this process uses %s", ", ".join(inst.copies), inst.module)
        log.info(
            "kv transceiver: backend NIXL/%s, NIXL %s (%s), UCX %s, plugin dir %s, %s memory, mode %s, bootstrap %s",
            self.nixl_backend,
            inst.version,
            inst.module,
            probe.ucx_version(),
            probe.loaded_plugin_dir() or "?",
            self.mem_type,
            self.mode.value,
            self._server.address,
        )

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
        self._add_peer(info)
        self._server.watch(sock, info.agent_name)
        return info.agent_name

    def _add_peer(self, info: PeerInfo) -> None:
        name = self.agent.add_remote_agent(info.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        descs = _block_descs(info.region_bases[0], int(info.fingerprint_fields["num_layers"]), info.num_blocks, info.block_bytes, info.device_id)
        dlist = self.agent.prep_xfer_dlist(info.agent_name, descs, info.mem_type)
        self._peers[info.agent_name] = _Peer(info, dlist)
        try:  # bring the connection up now: the first transfer is 2-5x slower otherwise
            self.agent.make_connection(info.agent_name)
        except Exception as e:
            log.debug("make_connection to %s: %s", info.agent_name, e)

    def _check_new(self, request_id: str, block_ids: list[int]) -> None:
        if request_id in self._reqs:
            raise ValueError(f"request {request_id} is already being transferred")
        if not block_ids:
            raise ValueError(f"request {request_id}: no blocks to transfer")
        nb = self.kv.layout.num_blocks
        if min(block_ids) < 0 or max(block_ids) >= nb:
            raise ValueError(f"request {request_id}: block ids must be in 0..{nb - 1}")

    # ----------------------------------------------------------------- decode side
    def receive(self, request_id: str, peer: str, block_ids: list[int]) -> None:
        # 1) the caller reserved block_ids; 2) tell the peer where to put the KV
        self._check_new(request_id, block_ids)
        req = _Req(request_id, Role.RECEIVER, list(block_ids), peer=peer)
        self._reqs[request_id] = req
        p = self._peers.get(peer)
        if p is None or not p.alive:
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is not connected")
            return
        self._notify(peer, ReceiveRequest(request_id=request_id, block_ids=req.block_ids))

    # ----------------------------------------------------------------- prefill side
    def send(self, request_id: str, block_ids: list[int]) -> None:
        self._check_new(request_id, block_ids)
        req = _Req(request_id, Role.SENDER, list(block_ids), started=time.monotonic())
        self._reqs[request_id] = req
        self._active.add(request_id)
        if request_id in self._tombstones:  # the receiver gave up before the KV was ready
            self._tombstones.pop(request_id)
            self._finish(req, FailureCause.ABORTED, "the receiver aborted before the KV was ready")
            return
        if request_id in self._asked:
            self._start_send(req, *self._asked.pop(request_id))

    def _start_send(self, req: _Req, peer: str, dst: list[int]) -> None:
        req.peer, req.peer_block_ids = peer, dst
        if len(dst) != len(req.block_ids):
            self._end(req, FailureCause.BACKEND, f"receiver reserved {len(dst)} blocks, sender has {len(req.block_ids)}")
            return
        if peer not in self._peers or not self._peers[peer].alive:
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is gone")
            return
        if self.config.verify_checksums:
            req.checksums = self._checksums(req.block_ids, dst)
        if self.mode is TransferMode.PUSH:
            self._notify(peer, WriteStarted(request_id=req.request_id), nudge=False)
            done = WriteDone(request_id=req.request_id, checksums=req.checksums, block_ids=req.block_ids if req.checksums else [])
            try:
                req.xfer = self._post("WRITE", req.block_ids, peer, dst, encode(done), req)
            except TransferError as e:
                self._end(req, e.cause, str(e))
                return
            # wake the receiver once the write is posted (with cma the bytes are already
            # there): its poll() takes both messages, and our WRITE completes with it
            self._server.nudge(peer)
        else:
            self._notify(peer, BlocksReady(request_id=req.request_id, block_ids=req.block_ids, checksums=req.checksums))

    # ----------------------------------------------------------------- transfers
    def _post(self, op: str, local_ids: list[int], peer: str, remote_ids: list[int], notif: bytes, req: _Req) -> Any:
        p = self._peers[peer]
        lay = self.kv.layout
        layers = np.arange(lay.num_layers, dtype=np.int64)[:, None]
        local_idx = (layers * lay.num_blocks + np.asarray(local_ids, dtype=np.int64)[None, :]).ravel().astype(np.int32)
        remote_idx = (layers * p.info.num_blocks + np.asarray(remote_ids, dtype=np.int64)[None, :]).ravel().astype(np.int32)
        req.num_bytes = lay.num_layers * len(local_ids) * lay.block_bytes
        try:
            handle = self.agent.make_prepped_xfer(op, self._local_dlist, local_idx, p.dlist, remote_idx, notif_msg=notif)
        except Exception as e:  # NIXL's own error types
            raise TransferError(FailureCause.BACKEND, f"NIXL {op} to {peer} could not be prepared: {e}") from None
        try:
            state = self.agent.transfer(handle)
        except Exception as e:
            state = f"ERR ({e})"
        if state.startswith("ERR"):
            self._release(handle)
            raise TransferError(FailureCause.BACKEND, f"NIXL {op} to {peer} failed to post: {state}")
        self._own_op_since = time.monotonic()
        return handle

    def _release(self, handle: Any) -> bool:
        try:
            handle.release()
            return True
        except Exception:
            return False

    def _checksums(self, local: list[int], remote: list[int]) -> list[int]:
        """crc32 per run (consecutive on both sides), over the run's span in every layer."""
        lay = self.kv.layout
        out = []
        for s, _, n in runs(local, remote):
            crc = 0
            for layer in range(lay.num_layers):
                off = lay.offset(layer, s)
                crc = zlib.crc32(self._span(off, n * lay.block_bytes), crc)
            out.append(crc)
        return out

    def _span(self, off: int, n: int) -> memoryview | bytes:
        if self._bytes_np is not None:
            return memoryview(self._bytes_np[off : off + n])
        return self.kv.as_bytes()[off : off + n].cpu().numpy().tobytes()  # CUDA: checksum on host

    def _notify(self, peer: str, msg: Msg, nudge: bool = True) -> None:
        try:
            self.agent.send_notif(peer, encode(msg))
        except Exception as e:
            log.warning("notification to %s failed: %s", peer, e)
        if nudge:
            self._server.nudge(peer)

    # ----------------------------------------------------------------- abort
    def abort(self, request_id: str) -> None:
        req = self._reqs.get(request_id)
        if req is None:
            return
        self._end(req, FailureCause.ABORTED, "aborted by the caller")

    # ----------------------------------------------------------------- poll
    def poll(self) -> list[TransferEvent]:
        now = time.monotonic()
        while self._accepted:
            info = self._accepted.pop(0)
            try:
                self._add_peer(info)
            except Exception as e:
                log.error("could not add peer %s: %s", info.agent_name, e)
        while self._lost:
            self._peer_lost(self._lost.pop(0))
        try:
            notifs = self.agent.get_new_notifs()
        except Exception as e:
            self._broken = f"NIXL notification check failed: {e}"
            notifs = {}
        if notifs:
            self._last_activity = now
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else sender
            for raw in msgs:
                try:
                    self._on_msg(sender, decode(raw))
                except ProtocolError as e:
                    log.error("bad notification from %s: %s", sender, e)
        for rid in list(self._active):
            req = self._reqs.get(rid)
            if req is None:
                self._active.discard(rid)
            else:
                self._progress(req, now)
        for name, p in self._peers.items():
            if p.transports_since is not None and not p.transports_logged:
                self._log_transports(name)
        out, self._events = self._events, []
        if out:
            self._last_activity = now
        for ev in out:
            record(self.backend_name, ev)
        return out

    def _progress(self, req: _Req, now: float) -> None:
        if req.xfer is not None:
            try:
                state = self.agent.check_xfer_state(req.xfer)
            except Exception:  # NIXL raises for some failures instead of answering ERR
                state = "ERR"
            if state == "DONE":
                self._release(req.xfer)
                req.xfer = None
                self._log_transports(req.peer, initiator=True)
                if req.ending is None:
                    self._xfer_done(req)
                    return
            elif state == "ERR":
                self._release(req.xfer)
                req.xfer = None
                if req.ending is None:
                    self._end(req, FailureCause.BACKEND, "NIXL reported a transfer error")
                    return
            elif req.ending is not None and self._release(req.xfer):  # PROC, ending: cancel it
                req.xfer = None
        if req.ending is not None:
            if req.xfer is None and (not req.need_ack or now - req.ending_since > self.timeout_s):
                self._finish(req, req.ending, req.ending_msg)
            elif req.xfer is not None and now - req.ending_since > self.timeout_s and self._broken is None:
                # NIXL can neither finish nor cancel it: the blocks stay held (freeing them could
                # let the op write into reused blocks) and health reports the transceiver broken
                self._broken = f"NIXL cannot cancel the transfer of {req.request_id}; its blocks stay held"
                log.error("kv transceiver broken: %s", self._broken)
            return
        if req.started is not None and now - req.started > self.timeout_s:
            self._end(req, FailureCause.TIMEOUT, f"not done {self.config.kv_transfer_timeout_ms} ms after the transfer started")

    def _xfer_done(self, req: _Req) -> None:
        if req.role is Role.SENDER:  # push: the WRITE and its notification are delivered
            self._finish(req)
            return
        # pull: our READ completed: check, then let the sender free its blocks
        assert req.peer is not None
        self._notify(req.peer, ReadDone(request_id=req.request_id))
        self._verify_and_finish(req, req.checksums, req.peer_block_ids)

    def _verify_and_finish(self, req: _Req, checksums: list[int], src_ids: list[int]) -> None:
        if checksums:
            mine = self._checksums(req.block_ids, src_ids)
            if mine != checksums:
                bad = [i for i, (a, b) in enumerate(zip(mine, checksums, strict=False)) if a != b]
                self._finish(req, FailureCause.CHECKSUM, f"checksum mismatch in run(s) {bad} of {len(checksums)}")
                return
        self._finish(req)

    def _on_msg(self, sender: str, msg: Any) -> None:
        rid = getattr(msg, "request_id", None)
        req = self._reqs.get(rid) if rid is not None else None
        if isinstance(msg, ReceiveRequest):  # prefill: a receiver asks
            if req is not None and req.role is Role.SENDER and req.peer is None:
                self._start_send(req, sender, list(msg.block_ids))
            elif msg.request_id in self._tombstones:  # we already gave up on it: say so
                self._notify(sender, Abort(request_id=msg.request_id, cause=self._tombstones[msg.request_id].value))
            else:
                self._asked[msg.request_id] = (sender, list(msg.block_ids))
        elif isinstance(msg, WriteStarted):
            if req is not None and req.started is None:
                req.started = time.monotonic()
                self._active.add(req.request_id)
        elif isinstance(msg, WriteDone):
            if req is not None and req.role is Role.RECEIVER:
                req.num_bytes = self.kv.layout.num_layers * len(req.block_ids) * self.kv.layout.block_bytes
                if req.ending is not None:  # the data landed after we began ending: blocks are safe now
                    req.need_ack = False
                else:
                    # checksums are per joint run; joint runs are the same seen from either side
                    self._verify_and_finish(req, list(msg.checksums), list(msg.block_ids))
        elif isinstance(msg, BlocksReady):  # decode, pull: read them now
            if req is None or req.role is not Role.RECEIVER or req.ending is not None:
                self._notify(sender, Abort(request_id=msg.request_id, cause=FailureCause.ABORTED.value))
                return
            req.started = time.monotonic()
            self._active.add(req.request_id)
            req.peer_block_ids, req.checksums = list(msg.block_ids), list(msg.checksums)
            if len(req.peer_block_ids) != len(req.block_ids):
                self._end(req, FailureCause.BACKEND, f"sender offers {len(req.peer_block_ids)} blocks, {len(req.block_ids)} reserved")
                return
            try:
                req.xfer = self._post("READ", req.block_ids, sender, req.peer_block_ids, b"", req)
            except TransferError as e:
                self._end(req, e.cause, str(e))
        elif isinstance(msg, ReadDone):
            if req is not None and req.role is Role.SENDER:
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
            or (req.role is Role.SENDER and self.mode is TransferMode.PULL and req.peer_block_ids)
        )
        peer = self._peers.get(req.peer) if req.peer is not None else None
        if tell_peer and peer is not None and peer.alive:
            self._notify(peer.info.agent_name, Abort(request_id=req.request_id, cause=cause.value))
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
            seconds=(now - req.started) if req.started is not None else 0.0,
        )
        if cause is None and req.peer is not None:
            self._log_transports(req.peer)
        if cause is not None:
            log.warning("kv transfer %s (%s) failed: %s: %s", req.request_id, req.role.value, cause.value, message)
        self._events.append(ev)

    def _peer_lost(self, name: str) -> None:
        p = self._peers.get(name)
        if p is None or not p.alive:
            return
        p.alive = False
        log.warning("kv transfer peer %s (%s) is gone", name, p.info.bootstrap)
        for rid, (peer, _) in list(self._asked.items()):
            if peer == name:
                del self._asked[rid]
        for req in list(self._reqs.values()):
            if req.peer == name:
                req.need_ack = False
                self._end(req, FailureCause.PEER_DEAD, f"peer {name} died", tell_peer=False)
                req.need_ack = False
        try:
            if p.dlist is not None:
                p.dlist.release()
            self.agent.remove_remote_agent(name)
        except Exception as e:
            log.debug("removing peer %s: %s", name, e)

    # ----------------------------------------------------------------- reporting
    def _log_transports(self, peer: str | None, initiator: bool = False) -> None:
        """After the first completed transfer with a peer, log the transports UCX chose,
        read from UCX's own protocol tables (see probe.py). UCX writes them through a
        buffered stdio file: we fflush it first. The side that ran the one-sided operation
        (``initiator``) waits, re-reading every 100 ms for up to 2 s, until the table of
        that operation is there; the other side only sends messages and logs at once."""
        p = self._peers.get(peer) if peer else None
        if p is None or p.transports_logged:
            return
        now = time.monotonic()
        if p.transports_since is None:
            p.transports_since, p.transports_want = now, initiator
        elif now - p.transports_read < 0.1:
            return
        p.transports_read = now
        if self._ucx_log is not None and self._ucx_log.exists():
            _libc_fflush()  # UCX's log is a buffered stdio FILE: push its lines out first
            with self._ucx_log.open("r", errors="replace") as f:
                f.seek(self._ucx_log_pos)
                self._ucx_text = (self._ucx_text + f.read())[-1_000_000:]
                self._ucx_log_pos = f.tell()
        summary = probe.summarize_transports(probe.parse_proto_info(self._ucx_text))
        want = "rma write" if self.mode is TransferMode.PUSH else "rma read"
        if p.transports_want and want not in summary and now - p.transports_since < 2.0:
            return  # try again on a later poll
        p.transports_logged = True
        text = self._ucx_text
        where = "intra-node" if " intra-node " in text else ("inter-node" if " inter-node " in text else "")
        log.info("UCX transports to peer %s (%s%s): %s", peer, p.info.bootstrap, f", {where}" if where else "", summary)
        self.last_transports = summary

    def wait(self, timeout_s: float, min_events: int = 1) -> list[TransferEvent]:
        """Poll until ``min_events`` events or ``timeout_s``. Between polls it sleeps on an
        event set by the bootstrap thread when a peer nudges us (a message for us arrived),
        so an idle wait costs no CPU; completions are not announced, so while a transfer
        is under way it re-polls sooner (see ``_poll_cap``), and for 2 ms after any traffic
        it polls every 50 µs (back-to-back requests then need no wake-up)."""
        deadline = time.monotonic() + timeout_s
        events: list[TransferEvent] = []
        delay = 20e-6
        while True:
            self._wake.clear()
            got = self.poll()
            if got:
                events.extend(got)
                delay = 20e-6
                if len(events) >= min_events:
                    return events
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return events
            cap = self._poll_cap(hot=now - self._last_activity < _HOT_S)
            if cap <= _OWN_OP_CAP and now - self._own_op_since < _SPIN_S:
                time.sleep(0)  # our op just went out (a local copy ends within ~100 µs): re-poll at once
                continue
            self._wake.wait(min(delay, left))
            delay = min(delay * 2, cap)

    def _poll_cap(self, hot: bool) -> float:
        """Longest sleep between polls in ``wait``: 50 µs while our own operation is in
        flight; while the peer's operation on our blocks runs (its WRITE into them in push,
        its READ of them in pull), about a tenth of its expected time at 5 GB/s, so a long
        copy is not slowed by polls on the same cores; 50 µs for a while after traffic
        (``hot``); else 2 ms (messages for us come with a nudge)."""
        cap = 2e-3
        peer_op = False
        lay = self.kv.layout
        for rid in self._active:
            r = self._reqs.get(rid)
            if r is None or r.ending is not None:
                continue
            if r.xfer is not None:
                return _OWN_OP_CAP
            if r.started is not None and (
                (r.role is Role.RECEIVER and self.mode is TransferMode.PUSH)
                or (r.role is Role.SENDER and self.mode is TransferMode.PULL and r.peer is not None)
            ):
                peer_op = True
                cap = min(cap, max(_OWN_OP_CAP, len(r.block_ids) * lay.num_layers * lay.block_bytes / 5e9 / 10))
        if hot and not peer_op:
            cap = _OWN_OP_CAP
        return cap

    @property
    def num_pending(self) -> int:
        return len(self._reqs)

    @property
    def broken_reason(self) -> str | None:
        return self._broken

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for req in list(self._reqs.values()):
            self._end(req, FailureCause.ABORTED, "transceiver closed")
            if req.xfer is not None:
                self._release(req.xfer)
                req.xfer = None
            self._finish(req, FailureCause.ABORTED, "transceiver closed")
        self._server.close()
        if self._ucx_log is not None and self._ucx_log.name == f"kvbridge-ucx-{os.getpid()}.log":
            self._ucx_log.unlink(missing_ok=True)
        for p in self._peers.values():
            if p.dlist is not None:
                try:
                    p.dlist.release()
                except Exception:
                    pass
        try:
            self._local_dlist.release()
            self.agent.deregister_memory(self._reg)
        except Exception as e:
            log.debug("deregister: %s", e)


def _libc_fflush() -> None:
    try:
        ctypes.CDLL(None).fflush(None)  # fflush(NULL): every output stream of this process
    except (OSError, AttributeError):
        pass


def _block_descs(base: int, num_layers: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """(num_layers * num_blocks, 3) [address, length, device] for every (layer, block)."""
    n = num_layers * num_blocks
    arr = np.empty((n, 3), dtype=np.uint64)
    arr[:, 0] = base + np.arange(n, dtype=np.uint64) * np.uint64(block_bytes)
    arr[:, 1] = block_bytes
    arr[:, 2] = device_id
    return arr

