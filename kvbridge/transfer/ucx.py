"""UCX directly (through ucxx): one-sided PUT (push) or GET (pull), same contract as nixl.py.

Set-up (once):
  - one UCX context and worker (ucxx) in blocking-progress mode, no progress thread:
    ``poll()`` progresses the worker once per engine step; ``wait()`` sleeps in
    ``epoll_wait`` on the worker's event fd (UCX wakes it when a message arrives), so an
    idle wait costs no CPU; cma copies run inside our progress (4 MiB per call) and
    raise no event: ``_post`` drives them in a tight loop (bounded), as NIXL's transfer()
    does, and ``wait`` re-polls without sleeping while something is due soon
  - the whole KV region mapped once (``ucp_mem_map``); its packed rkey goes to every peer
    in the handshake (``UcxBlob`` inside ``PeerInfo.agent_metadata``)
  - one endpoint per peer, from its worker address, with error handling PEER: a dead peer
    fails the operations in flight (an error status) instead of aborting this process.
    UCX 1.21 gives a PEER endpoint a ``cma`` RMA lane only when the cma memory domain
    promises invalidation, so the context sets UCX's own option ``CMA_MEMORY_INVALIDATE=y``
    (without it RMA falls back to software emulation over tcp: ~0.5 GB/s instead of ~3);
    kvbridge's UCX defaults (``config.ucx_defaults``) also let UCX's shared memory (sysv)
    carry such an endpoint's messages, with a keepalive that checks the peer's process

RMA, not tagged send/receive: decode reserves, prefill writes (push) or decode reads (pull)
with nothing posted on the other side; one PUT/GET per (layer, run of ids consecutive on
both sides). Tagged send/receive moved 64 MiB at ~1 GB/s here against ~3 GB/s for cma RMA,
and would need the other side to post a receive per run.

ucxx 0.52's Python API has workers, endpoints, tags and progress but no RMA (its C++ core
has ``MemoryHandle``/``RemoteKey``/``memPut``, not exposed); the handles it owns are plain
``ucp_*_h`` pointers, so the few RMA calls go to the same libucp through ctypes (``_Ucp``).

Completion: the request of every PUT/GET is handed back to UCP at once; one
``ucp_ep_flush_nbx`` per transfer completes when all of them are complete, at the peer too.
Only then is ``WriteDone`` (push) or ``ReadDone`` (pull) sent. Messages are tagged sends on
the same endpoint; the tag's low 56 bits name the sender (a hash of its
agent name), the top byte marks kvbridge traffic. Liveness rides the bootstrap TCP
connection (handshake.py), and UCX's own keepalive on the endpoint.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from kvbridge.config import CacheTransceiverConfig, ucx_defaults
from kvbridge.engine.kv_cache import KVCache
from kvbridge.transfer import handshake, probe
from kvbridge.transfer.base import (
    BackendUnavailable,
    FailureCause,
    Msg,
    PeerInfo,
    ProtocolError,
    TransferError,
    TransferEvent,
    WriteDone,
    WriteStarted,
    decode,
    encode,
)
from kvbridge.transfer.hooks import _Req
from kvbridge.transfer.integrity import joint_runs, pack_ids, runs, runs_in_range, segments
from kvbridge.transfer.lifecycle import LAYOUT, LifecycleTransceiver
from kvbridge.transfer.ucp import (
    _MEMORY_TYPE_CUDA,
    _MEMORY_TYPE_HOST,
    _OP_ATTR_FIELD_MEMORY_TYPE,
    TagRecv,
    TagSend,
    UcxError,
    _RequestParam,
    _TagRecvInfo,
    _Ucp,
    _Xfer,
)

__all__ = ["LAYOUT", "UcxBlob", "UcxError", "UcxTransceiver", "runs"]

log = logging.getLogger("kvbridge.transfer.ucx")

_SYNC_COPY_S = 0.05  # _post drives its copy to completion for at most this long
_PEER_GRACE_S = 1e-3  # a GET's _post, its copies done, waits this long for the peer's answer
_SEGMENTS_MAX = 32  # a side's ids in more stretches than this: runs() finds the joint runs
_TAG_KIND = 0x6B << 56  # top byte of every kvbridge tag
_TAG_KIND_MASK = 0xFF << 56
_TAG_SENDER_MASK = (1 << 56) - 1


def _sender_tag(agent_name: str) -> int:
    return int.from_bytes(hashlib.blake2b(agent_name.encode(), digest_size=7).digest(), "little")


class UcxBlob(msgspec.Struct, kw_only=True):
    """``PeerInfo.agent_metadata`` of the UCX backend: how to reach and address this side."""

    worker_address: bytes
    rkey: bytes  # packed rkey of the KV region
    ucx_version: str


_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(UcxBlob)


@dataclass
class _Peer:
    info: PeerInfo
    blob: UcxBlob
    ep: Any  # UCXEndpoint, error handling PEER (None: unreachable)
    rkey: int  # the peer's region, unpacked on ``ep`` (0: none)
    alive: bool = True
    transports_logged: bool = False



class UcxTransceiver(LifecycleTransceiver):
    backend_name = "ucx"
    metrics_label = "UCX"
    _log = log
    _check_sender = True  # a message about a request counts only from its peer

    def __init__(
        self,
        kv: KVCache,
        config: CacheTransceiverConfig,
        *,
        model_id: str,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "kvbridge",
    ) -> None:
        super().__init__(kv, config, model_id=model_id)
        self._init_lifecycle()
        ours = "UCX_MEMTYPE_CACHE" not in os.environ
        try:
            import ucxx
            import ucxx._lib.libucxx as ucx_api
        except ImportError as e:
            raise BackendUnavailable(f"cache_transceiver_config.backend UCX needs ucxx ({e}): pip install ucxx-cu12==0.52") from None
        # ucxx sets UCX_MEMTYPE_CACHE for old UCX; the UCX it brings (1.21) no longer reads it
        # and warns "unused environment variable" in this process and its children
        if ours:
            os.environ.pop("UCX_MEMTYPE_CACHE", None)
        self._api = ucx_api
        self._ucp = _Ucp()
        self.ucx_version = ".".join(map(str, ucx_api.get_ucx_version()))
        self.ucxx_version = getattr(ucxx, "__version__", "?")
        # UCX's own option (not an environment read): lets cma carry RMA on endpoints with
        # error handling PEER (see the module docstring)
        self._context = ucx_api.UCXContext(config_dict={"CMA_MEMORY_INVALIDATE": "y", **ucx_defaults(kv.is_cuda)})
        self.worker = ucx_api.UCXWorker(self._context)
        self.worker.init_blocking_progress_mode()  # wait() sleeps on the worker's event fd
        self.agent_name = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._my_tag = _TAG_KIND | _sender_tag(self.agent_name)

        # register the region once
        lay = kv.layout
        self.mem_type = "VRAM" if kv.is_cuda else "DRAM"
        self.device_id = (kv.device.index or 0) if kv.is_cuda else 0
        ucs_mem = _MEMORY_TYPE_CUDA if kv.is_cuda else _MEMORY_TYPE_HOST
        self._memh = self._ucp.mem_map(self._context.handle, kv.base_address, lay.total_bytes, ucs_mem)
        self._op_param = _RequestParam(op_attr_mask=_OP_ATTR_FIELD_MEMORY_TYPE, memory_type=ucs_mem)
        blob = UcxBlob(
            worker_address=bytes(self.worker.address),
            rkey=self._ucp.rkey_pack(self._context.handle, self._memh),
            ucx_version=self.ucx_version,
        )
        self._info = self._make_info(model_id, self.backend_name, _blob_encoder.encode(blob))
        self._by_tag: dict[int, str] = {}  # sender tag → agent name
        self._sends: list[tuple[TagSend, str]] = []  # messages UCP has not completed yet, and their peer
        self._send_param = _RequestParam()  # contiguous bytes, no callback
        self._recvs: list[TagRecv] = []  # probed messages being received, in arrival order
        self._recv_info, self._recv_param = _TagRecvInfo(), _RequestParam()
        self._recvs_count = self._recvs_seen = 0  # messages probed, and as of the last poll
        self._server = handshake.BootstrapServer(
            host, port, config.shared_token, lambda: self._info, self._accepted.append, self._lost.append
        )
        self._info.bootstrap = self._server.address
        log.info(
            "kv transceiver: backend UCX (direct, ucxx %s), UCX %s (%s), %s memory, mode %s, bootstrap %s",
            self.ucxx_version,
            self.ucx_version,
            self._ucp.path,
            self.mem_type,
            self.mode.value,
            self._server.address,
        )

    # ----------------------------------------------------------------- connection
    def _add_peer(self, info: PeerInfo, *, keep_if_unreachable: bool = False) -> None:
        """Endpoints and rkey for a peer. A peer that accepted our handshake but cannot be
        reached (it died meanwhile) is kept as dead when ``keep_if_unreachable``: its
        messages still name it, and requests with it fail as PEER_DEAD."""
        try:
            blob = _blob_decoder.decode(info.agent_metadata)
        except msgspec.DecodeError as e:
            raise TransferError(FailureCause.BACKEND, f"peer {info.agent_name} sent unreadable UCX metadata: {e}") from None
        api = self._api
        try:
            address = api.UCXAddress.create_from_buffer(blob.worker_address)
            ep = api.UCXEndpoint.create_from_worker_address(self.worker, address, True)  # error handling PEER
            rkey = self._ucp.rkey_unpack(ep.handle, blob.rkey)
        except Exception as e:
            if not keep_if_unreachable:
                raise TransferError(FailureCause.PEER_DEAD, f"cannot reach UCX peer {info.agent_name}: {e}") from None
            log.error("kv transfer peer %s (%s) is unreachable: %s", info.agent_name, info.bootstrap, e)
            self._peers[info.agent_name] = _Peer(info, blob, None, 0, alive=False)
        else:
            self._peers[info.agent_name] = _Peer(info, blob, ep, rkey)
            # bring the connection up now (a flush waits for UCX's wireup): the first
            # transfer to a new peer is several times slower otherwise
            _, request = self._ucp.split(self._ucp.ep_flush_nbx(ep.handle, ctypes.byref(_RequestParam())))
            if request is not None:
                self._ucp.request_free(request)
        self._by_tag[_sender_tag(info.agent_name)] = info.agent_name

    def _add_accepted(self) -> None:
        """Peers whose handshake the bootstrap thread accepted (it never touches UCX)."""
        while self._accepted:
            info = self._accepted.pop(0)
            try:
                self._add_peer(info, keep_if_unreachable=True)
            except Exception as e:
                log.error("could not add peer %s: %s", info.agent_name, e)

    def _usable(self, p: _Peer) -> bool:
        """Worth posting to: its liveness channel is open and its endpoint has not failed."""
        while self._lost:  # the bootstrap thread may have seen it go just now
            self._peer_lost(self._lost.pop(0))
        return p.alive and p.ep is not None and p.ep.alive


    def _peer_usable(self, p: _Peer) -> bool:
        return self._usable(p)

    # ----------------------------------------------------------------- transfers
    def _check_new(self, request_id: str, block_ids: list[int], own_op: bool, packed: list[int] | None = None) -> Any:
        """For our own op, the stretches of our ids, found now: in pull that is when the
        receiver reserves its blocks, long before the prefill is done (see ``_post``)."""
        super()._check_new(request_id, block_ids, own_op, packed)
        return self._prepare(block_ids, None) if own_op else None

    def _prepare(self, block_ids: list[int], peer: str | None, packed: list[int] | None = None) -> Any:
        if packed is not None and len(packed) <= 2 * _SEGMENTS_MAX:  # the stretches, as they came
            out, pos = [], 0
            for i in range(0, len(packed), 2):
                out.append((pos, packed[i], packed[i + 1]))
                pos += packed[i + 1]
            return out
        return segments(block_ids, _SEGMENTS_MAX)

    def _start_write(self, req: _Req, peer: str, dst: list[int]) -> None:
        self._notify(peer, WriteStarted(request_id=req.request_id))
        req.notif = encode(WriteDone(request_id=req.request_id, checksums=req.checksums, block_runs=pack_ids(req.block_ids) if req.checksums else []))
        try:
            req.xfer = self._post("WRITE", req.block_ids, peer, dst, req.notif, req)
        except TransferError as e:
            self._end(req, e.cause, str(e))

    def _post(self, op: str, local_ids: list[int], peer: str, remote_ids: list[int], notif: bytes, req: _Req) -> _Xfer:
        """Post one PUT (WRITE) or GET (READ) per (layer, run of ids consecutive on both
        sides). ``notif`` (push) is sent by ``_progress`` once the PUT is complete there."""
        p = self._peers[peer]
        if not self._usable(p):
            raise TransferError(FailureCause.PEER_DEAD, f"peer {peer} is gone")
        lay = self.kv.layout
        bb = lay.block_bytes
        base, rbase, rnb = self.kv.base_address, p.info.region_bases[0], p.info.num_blocks
        # joint runs from each side's stretches, found when the ids arrived (the peer's
        # just now in pull, when they came in BlocksReady): right after a copy a pass over
        # two cold lists of ids costs ~50 µs; with many stretches runs() is cheaper
        mine = req.prepared if req.prepared is not None else self._prepare(local_ids, None)
        theirs = req.peer_prepared if req.peer_prepared is not None else self._prepare(remote_ids, peer)
        if mine is not None and theirs is not None and len(local_ids) == len(remote_ids):
            spans = joint_runs(mine, theirs)
        else:
            spans = runs(local_ids, remote_ids)
        # a PUT/GET is not bounded by the region (cma reaches the whole process): check ids
        if not runs_in_range(spans, lay.num_blocks, rnb):
            raise TransferError(FailureCause.BACKEND, f"block ids out of range (this side {lay.num_blocks} blocks, peer {rnb})")
        fn = self._ucp.put_nbx if op == "WRITE" else self._ucp.get_nbx
        name = "ucp_put_nbx" if op == "WRITE" else "ucp_get_nbx"
        ep, rkey, param = p.ep.handle, p.rkey, ctypes.byref(self._op_param)
        x = _Xfer(self._ucp, ep)
        for layer in range(lay.num_layers):
            for s, d, n in spans:
                x.add(fn(ep, base + lay.offset(layer, s), n * bb, rbase + (layer * rnb + d) * bb, rkey, param), name)
        x.start_flush()
        req.num_bytes = lay.num_layers * len(local_ids) * bb
        # cma copies run inside our progress, 4 MiB per call: drive them here, in a tight
        # loop, as NIXL's transfer() does (bounded; a longer one goes on in poll()). Where
        # the flush needs the peer's answer (messages over tcp: between hosts, or with
        # UCX_MM_ERROR_HANDLING=n), UCX progresses nothing more once the copies are done,
        # until the peer's next poll: the prefill side (PUT) keeps driving, its next engine
        # step being a whole prefill; the decode side (GET) gives the peer _PEER_GRACE_S and
        # leaves the rest to its polls, one per decode step, instead of stalling every stream
        deadline = time.monotonic() + _SYNC_COPY_S
        progress = self.worker.progress_once  # True while UCX did something
        idle_since = None
        while (state := x.state()) == "PROC" and (now := time.monotonic()) < deadline:
            if progress():
                idle_since = None
            elif op == "READ":
                if idle_since is None:
                    idle_since = now
                elif now - idle_since > _PEER_GRACE_S:
                    break
        self._own_op_since = time.monotonic()
        req.xfer_done = state == "DONE"  # then _progress need not ask again
        return x

    @staticmethod
    def _state(handle: Any) -> str:
        state = getattr(handle, "state", None)
        return state() if state is not None else "PROC"  # a foreign handle (fault injection) never completes

    @staticmethod
    def _release(handle: Any) -> bool:
        try:
            return handle.release() is not False
        except Exception:
            return False

    def _xfer_state(self, handle: Any) -> str:
        return self._state(handle)

    def _xfer_completed(self, req: _Req) -> None:
        req.xfer = None
        self._log_transports(req.peer)

    def _xfer_failed(self, req: _Req) -> None:
        err = getattr(req.xfer, "error", "")
        req.xfer = None
        if req.ending is None:
            if self._ep_failed(req.peer):  # the peer died under the operation
                self._peer_lost(req.peer)  # type: ignore[arg-type]
            else:
                self._end(req, FailureCause.BACKEND, f"UCX reported a transfer error: {err}")

    def _write_complete(self, req: _Req) -> None:
        assert req.peer is not None
        self._notify(req.peer, req.notif)  # push: the PUT is complete at the peer: say so

    def _peer_transferred(self, peer: str) -> None:
        self._log_transports(peer)

    # ----------------------------------------------------------------- messages
    def _notify(self, peer: str, msg: Msg | bytes) -> None:
        """Send a message (or an already encoded one) on the peer's control endpoint."""
        p = self._peers.get(peer)
        if p is None or not p.alive:
            log.debug("not sending a message to %s: not connected", peer)
            return
        send = TagSend(self._ucp, p.ep.handle, msg if isinstance(msg, bytes) else encode(msg), self._my_tag, self._send_param)
        if send.request is not None:
            self._sends.append((send, peer))
        elif send.error is not None:
            self._send_failed(peer, send.error)

    def _reap_sends(self) -> None:
        still = []
        for send, peer in self._sends:
            state = send.state()
            if state == "PROC":
                still.append((send, peer))
            elif state == "ERR":
                self._send_failed(peer, send.error)
        self._sends = still

    def _send_failed(self, peer: str, error: str | None) -> None:
        if self._ep_failed(peer):
            log.debug("message to %s failed: %s", peer, error)
            self._lost.append(peer)  # handled by the next poll, not inside a loop over requests
        else:
            log.warning("message to %s failed: %s", peer, error)

    def _ep_failed(self, peer: str | None) -> bool:
        """UCX reported the peer's endpoint failed (with error handling PEER it does so
        when the peer's process or connection goes away)."""
        p = self._peers.get(peer) if peer else None
        return p is not None and p.ep is not None and not p.ep.alive

    def _receive_messages(self) -> None:
        ucp, worker = self._ucp, self.worker.handle
        while (r := TagRecv.probe(ucp, worker, _TAG_KIND, _TAG_KIND_MASK, self._recv_info, self._recv_param)) is not None:
            self._recvs.append(r)
            self._recvs_count += 1
        while self._recvs and (state := self._recvs[0].state()) != "PROC":  # in arrival order
            r = self._recvs.pop(0)
            tag = r.sender_tag & _TAG_SENDER_MASK
            if tag not in self._by_tag:  # accepted a moment ago, after this poll began
                self._add_accepted()
            sender = self._by_tag.get(tag)
            if state == "ERR":
                log.warning("receiving a message from %s failed: %s", sender or "an unknown peer", r.error)
                continue
            try:
                msg = decode(r.buf)
            except ProtocolError as e:
                log.error("bad message from %s: %s", sender or "an unknown peer", e)
                continue
            if sender is None:
                log.warning("dropped %s from an unknown peer", type(msg).__name__)
                continue
            self._on_msg(sender, msg)

    # ----------------------------------------------------------------- poll
    def poll(self) -> list[TransferEvent]:
        if self._closed:
            return []
        now = time.monotonic()
        self._begin_poll(now)
        self._add_accepted()
        while self._lost:
            self._peer_lost(self._lost.pop(0))
        try:
            self.worker.progress()
            self._reap_sends()
            self._receive_messages()
        except Exception as e:
            self._broken = f"UCX progress failed: {e}"
            log.error("kv transceiver broken: %s", self._broken)
        self._progress_active(now)
        if self._recvs_seen != self._recvs_count:  # messages count as activity too
            self._last_activity = now
            self._recvs_seen = self._recvs_count
        return self._take_events(now)

    def _answer_peers(self) -> None:
        """Progress the worker; messages stay queued in UCX until poll probes them."""
        try:
            self.worker.progress()
        except Exception:
            pass  # poll reports it

    def _sleep(self, left: float) -> None:
        """In ``epoll_wait`` on the worker's event fd (UCX wakes it when a message arrives),
        2 ms at most so the bootstrap thread's news and ``wake()`` are seen soon. It sleeps
        only while UCX has nothing to do: ucp_worker_arm refuses (BUSY) while copies of ours
        are pending, so this returns at once and ``wait`` polls again."""
        self.worker.progress_worker_event(max(1, min(2, int(left * 1000))))

    # ----------------------------------------------------------------- reporting
    def _log_transports(self, peer: str | None) -> None:
        """After the first transfer with a peer: the transports UCX chose for it, read from
        UCX itself (the lanes ``ucp_ep_print_info`` lists for its endpoint)."""
        p = self._peers.get(peer) if peer else None
        if p is None or p.transports_logged or p.ep is None:
            return
        p.transports_logged = True
        try:
            self.last_transports = probe.summarize_ep_lanes(self._ucp.ep_info(p.ep.handle))
        except Exception as e:
            log.warning("could not read UCX transports for %s: %s", peer, e)
            return
        log.info("UCX transports to peer %s (%s): %s", peer, p.info.bootstrap, self.last_transports)

    def close(self) -> None:
        if self._closed:
            return
        for req in list(self._reqs.values()):
            self._end(req, FailureCause.ABORTED, "transceiver closed")
            deadline = time.monotonic() + 5.0
            while req.xfer is not None and not self._release(req.xfer) and time.monotonic() < deadline:
                self.worker.progress()  # a PUT/GET in flight must finish before the region goes
            req.xfer = None
            self._finish(req, FailureCause.ABORTED, "transceiver closed")
        self._closed = True
        self._server.close()
        deadline = time.monotonic() + 1.0
        while self._sends and time.monotonic() < deadline:  # let the last messages (aborts) leave
            self.worker.progress()
            self._reap_sends()
        for p in self._peers.values():
            if not p.rkey:
                continue
            try:
                self._ucp.rkey_destroy(p.rkey)
            except Exception as e:
                log.debug("rkey_destroy %s: %s", p.info.agent_name, e)
        self._peers.clear()
        self._sends.clear()
        self._recvs = [r for r in self._recvs if r.state() == "PROC"]  # UCP may still write into these
        try:
            self._ucp.mem_unmap(self._context.handle, self._memh)
        except Exception as e:
            log.debug("mem_unmap: %s", e)

