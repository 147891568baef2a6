"""UCX directly (through ucxx): one-sided PUT (push) or GET (pull), same contract as nixl.py.

Set-up (once):
  - one UCX context and worker (ucxx) in blocking-progress mode, no progress thread:
    ``poll()`` progresses the worker once per engine step; ``wait()`` sleeps in
    ``epoll_wait`` on the worker's event fd (UCX wakes it when a message arrives), so an
    idle wait costs no CPU; while our own copies are in flight (cma copies run inside our
    progress, and raise no event) it polls with a backoff from 20 µs to 1 ms
  - the whole KV region mapped once (``ucp_mem_map``); its packed rkey goes to every peer
    in the handshake (``UcxBlob`` inside ``PeerInfo.agent_metadata``)
  - one endpoint per peer, from its worker address, with error handling PEER: a dead peer
    fails the operations in flight (an error status) instead of aborting this process.
    UCX 1.21 gives a PEER endpoint a ``cma`` RMA lane only when the cma memory domain
    promises invalidation, so the context sets UCX's own option ``CMA_MEMORY_INVALIDATE=y``
    (without it RMA falls back to software emulation over tcp: ~0.5 GB/s instead of ~3)

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
import re
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvbridge.config import CacheTransceiverConfig, TransferMode
from kvbridge.engine.kv_cache import KVCache
from kvbridge.transfer import handshake
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

log = logging.getLogger("kvbridge.transfer.ucx")

LAYOUT = "layer_block"
_TAG_KIND = 0x6B << 56  # top byte of every kvbridge tag
_TAG_KIND_MASK = 0xFF << 56
_TAG_SENDER_MASK = (1 << 56) - 1


class UcxError(RuntimeError):
    """A UCP call failed."""


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Runs consecutive on both sides: [(src_first, dst_first, length), ...]."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def _sender_tag(agent_name: str) -> int:
    return int.from_bytes(hashlib.blake2b(agent_name.encode(), digest_size=7).digest(), "little")


class UcxBlob(msgspec.Struct, kw_only=True):
    """``PeerInfo.agent_metadata`` of the UCX backend: how to reach and address this side."""

    worker_address: bytes
    rkey: bytes  # packed rkey of the KV region
    ucx_version: str


_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(UcxBlob)

# --------------------------------------------------------------------------- UCP through ctypes
#
# ucxx 0.52's Python API has endpoints, workers, tags and progress, but no remote memory
# access (its C++ core has MemoryHandle/RemoteKey/memPut, not exposed to Python). The
# handles ucxx owns are plain ucp_*_h pointers (``.handle``), so RMA goes straight to the
# libucp that ucxx itself loaded: ucp_mem_map / ucp_rkey_pack / ucp_ep_rkey_unpack /
# ucp_put_nbx / ucp_get_nbx / ucp_ep_flush_nbx, and ucp_ep_print_info for the transports.


class _MemMapParams(ctypes.Structure):  # ucp_mem_map_params_t (ucp.h, UCX 1.21)
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("address", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("flags", ctypes.c_uint),
        ("prot", ctypes.c_uint),
        ("memory_type", ctypes.c_int),
        ("exported_memh_buffer", ctypes.c_void_p),
    ]


class _RequestParam(ctypes.Structure):  # ucp_request_param_t (ucp.h, UCX 1.21)
    _fields_ = [
        ("op_attr_mask", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("request", ctypes.c_void_p),
        ("cb", ctypes.c_void_p),
        ("datatype", ctypes.c_uint64),
        ("user_data", ctypes.c_void_p),
        ("reply_buffer", ctypes.c_void_p),
        ("memory_type", ctypes.c_int),
        ("recv_info", ctypes.c_void_p),
        ("memh", ctypes.c_void_p),
    ]


_UCS_OK, _UCS_INPROGRESS, _UCS_ERR_LAST = 0, 1, -100
_MEM_MAP_FIELDS = 1 | 2 | 16  # ADDRESS | LENGTH | MEMORY_TYPE
_OP_ATTR_FIELD_MEMORY_TYPE = 1 << 6
_MEMORY_TYPE_HOST, _MEMORY_TYPE_CUDA = 0, 1


class _Ucp:
    """The few libucp calls ucxx does not expose, bound with ctypes to the libucp ucxx loaded."""

    def __init__(self) -> None:
        path = self._loaded_libucp()
        lib = ctypes.CDLL(path)
        vp, sz, u64, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
        st = ctypes.c_int8  # ucs_status_t is a packed (one byte) enum

        def fn(name: str, res: Any, *args: Any) -> Any:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.path = path
        self.mem_map_ = fn("ucp_mem_map", st, vp, ctypes.POINTER(_MemMapParams), ctypes.POINTER(vp))
        self.mem_unmap = fn("ucp_mem_unmap", st, vp, vp)
        self.rkey_pack_ = fn("ucp_rkey_pack", st, vp, vp, ctypes.POINTER(vp), ctypes.POINTER(sz))
        self.rkey_buffer_release = fn("ucp_rkey_buffer_release", None, vp)
        self.ep_rkey_unpack = fn("ucp_ep_rkey_unpack", st, vp, ctypes.c_char_p, ctypes.POINTER(vp))
        self.rkey_destroy = fn("ucp_rkey_destroy", None, vp)
        self.put_nbx = fn("ucp_put_nbx", vp, vp, vp, sz, u64, vp, ctypes.POINTER(_RequestParam))
        self.get_nbx = fn("ucp_get_nbx", vp, vp, vp, sz, u64, vp, ctypes.POINTER(_RequestParam))
        self.ep_flush_nbx = fn("ucp_ep_flush_nbx", vp, vp, ctypes.POINTER(_RequestParam))
        self.request_check_status = fn("ucp_request_check_status", st, vp)
        self.request_free = fn("ucp_request_free", None, vp)
        self.ep_print_info = fn("ucp_ep_print_info", None, vp, vp)
        libucs = ctypes.CDLL(os.path.join(os.path.dirname(path), "libucs.so.0"))
        self.status_string_ = libucs.ucs_status_string
        self.status_string_.restype, self.status_string_.argtypes = ctypes.c_char_p, [i]
        libc = ctypes.CDLL(None)
        self.tmpfile, self.fflush, self.fclose, self.fileno = libc.tmpfile, libc.fflush, libc.fclose, libc.fileno
        self.tmpfile.restype = vp
        self.fflush.argtypes = self.fclose.argtypes = self.fileno.argtypes = [vp]

    @staticmethod
    def _loaded_libucp() -> str:
        """The libucp.so.0 that ucxx linked against (libucx wheel), never another copy
        (NIXL bundles its own UCX under mangled names)."""
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libucp.so" in line}
        import libucx  # the wheel ucxx depends on

        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        for p in sorted(paths):
            if os.path.dirname(p) == libdir:
                return p
        return os.path.join(libdir, "libucp.so.0")

    def status_string(self, status: int) -> str:
        return self.status_string_(status).decode()

    def check(self, status: int, what: str) -> None:
        if status != _UCS_OK:
            raise UcxError(f"{what} failed: {self.status_string(status)}")

    @staticmethod
    def split(ptr: int | None) -> tuple[int, int | None]:
        """A ucs_status_ptr_t as (status, request or None)."""
        if not ptr:
            return _UCS_OK, None
        if ptr >= (1 << 64) + _UCS_ERR_LAST:
            return ptr - (1 << 64), None
        return _UCS_INPROGRESS, ptr

    def mem_map(self, context: int, address: int, length: int, memory_type: int) -> int:
        params = _MemMapParams(field_mask=_MEM_MAP_FIELDS, address=address, length=length, memory_type=memory_type)
        memh = ctypes.c_void_p()
        self.check(self.mem_map_(context, ctypes.byref(params), ctypes.byref(memh)), "ucp_mem_map")
        return int(memh.value)

    def rkey_pack(self, context: int, memh: int) -> bytes:
        buf, n = ctypes.c_void_p(), ctypes.c_size_t()
        self.check(self.rkey_pack_(context, memh, ctypes.byref(buf), ctypes.byref(n)), "ucp_rkey_pack")
        try:
            return ctypes.string_at(buf, n.value)
        finally:
            self.rkey_buffer_release(buf)

    def rkey_unpack(self, ep: int, packed: bytes) -> int:
        rkey = ctypes.c_void_p()
        self.check(self.ep_rkey_unpack(ep, packed, ctypes.byref(rkey)), "ucp_ep_rkey_unpack")
        return int(rkey.value)

    def ep_info(self, ep: int) -> str:
        f = self.tmpfile()
        try:
            self.ep_print_info(ep, f)
            self.fflush(f)
            fd = self.fileno(f)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
        finally:
            self.fclose(f)


# --------------------------------------------------------------------------- transfers


class _Xfer:
    """One PUT or GET of a request: a UCP operation per (layer, run), then one flush of the
    endpoint. The operations' requests are handed back to UCP at once (``ucp_request_free``
    lets an operation complete internally); the flush completes only when every operation
    before it is complete, at the peer too. So a transfer of thousands of runs is tracked by
    one request. ``state()`` is "PROC", "DONE" or "ERR"."""

    def __init__(self, ucp: _Ucp, ep: int) -> None:
        self.ucp = ucp
        self.ep = ep
        self.flush: int | None = None
        self.flushed = False
        self.error: str | None = None

    def add(self, ptr: int | None, what: str) -> None:
        status, request = self.ucp.split(ptr)
        if request is not None:
            self.ucp.request_free(request)  # completes internally; the flush covers it
        elif status != _UCS_OK and self.error is None:
            self.error = f"{what}: {self.ucp.status_string(status)}"

    def start_flush(self) -> None:
        status, request = self.ucp.split(self.ucp.ep_flush_nbx(self.ep, ctypes.byref(_RequestParam())))
        self.flush = request
        if request is None:
            self.flushed = True
            if status != _UCS_OK and self.error is None:
                self.error = f"ucp_ep_flush_nbx: {self.ucp.status_string(status)}"

    def state(self) -> str:
        if self.flush is not None:
            status = self.ucp.request_check_status(self.flush)
            if status == _UCS_INPROGRESS:
                return "PROC"
            self.ucp.request_free(self.flush)
            self.flush, self.flushed = None, True
            if status != _UCS_OK and self.error is None:
                self.error = f"UCP flush: {self.ucp.status_string(status)}"
        if not self.flushed:
            return "PROC"
        return "ERR" if self.error is not None else "DONE"

    def release(self) -> bool:
        """UCP cannot cancel a PUT/GET in flight: released only once the flush completed."""
        self.state()
        return self.flush is None


@dataclass
class _Peer:
    info: PeerInfo
    blob: UcxBlob
    ep: Any  # UCXEndpoint, error handling PEER (None: unreachable)
    rkey: int  # the peer's region, unpacked on ``ep`` (0: none)
    alive: bool = True
    transports_logged: bool = False


@dataclass
class _Req:
    request_id: str
    role: Role
    block_ids: list[int]
    peer: str | None = None  # agent name
    peer_block_ids: list[int] = field(default_factory=list)
    started: float | None = None  # when the transfer started (timeout clock)
    xfer: Any = None  # in-flight _Xfer (ours)
    notif: bytes = b""  # push: WriteDone, sent once the PUT is complete at the peer
    checksums: list[int] = field(default_factory=list)
    ending: FailureCause | None = None  # terminating with this cause
    ending_msg: str = ""
    ending_since: float = 0.0
    need_ack: bool = False  # waiting for the peer's AbortAck before the blocks are safe
    ack_to: str | None = None  # the peer that aborted: answer AbortAck once we are safe
    num_bytes: int = 0


class UcxTransceiver(KVTransceiver):
    backend_name = "ucx"
    metrics_label = "UCX"

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
        self.mode = config.mode
        self.timeout_s = config.kv_transfer_timeout_ms / 1000.0
        try:
            import ucxx
            import ucxx._lib.libucxx as ucx_api
            from ucxx._lib.arr import Array
        except ImportError as e:
            raise BackendUnavailable(f"cache_transceiver_config.backend UCX needs ucxx ({e}): pip install ucxx-cu12==0.52") from None
        self._api, self._Array = ucx_api, Array
        self._ucp = _Ucp()
        self.ucx_version = ".".join(map(str, ucx_api.get_ucx_version()))
        self.ucxx_version = getattr(ucxx, "__version__", "?")
        # UCX's own option (not an environment read): lets cma carry RMA on endpoints with
        # error handling PEER (see the module docstring)
        self._context = ucx_api.UCXContext(config_dict={"CMA_MEMORY_INVALIDATE": "y"})
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
        self._bytes_np = kv.as_bytes().numpy() if not kv.is_cuda else None
        fields = {k: str(v) for k, v in lay.fingerprint_fields(model_id).items()}
        self._info = PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            backend=self.backend_name,
            agent_name=self.agent_name,
            agent_metadata=_blob_encoder.encode(blob),
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
        self._by_tag: dict[int, str] = {}  # sender tag → agent name
        self._reqs: dict[str, _Req] = {}
        self._asked: dict[str, tuple[str, list[int]]] = {}  # rid → (peer, dst ids) before send()
        self._tombstones: OrderedDict[str, FailureCause] = OrderedDict()  # rids ended early, for late messages
        self._events: list[TransferEvent] = []
        self._sends: list[tuple[Any, bytearray, str]] = []  # in-flight messages (request, buffer, peer)
        self._recvs: list[tuple[Any, bytearray, int]] = []  # probed messages being received
        self._accepted: list[PeerInfo] = []  # from the bootstrap thread (list.append is atomic)
        self._lost: list[str] = []
        self._broken: str | None = None
        self._closed = False
        self.last_transports: str | None = None
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

    # ----------------------------------------------------------------- decode side
    def receive(self, request_id: str, peer: str, block_ids: list[int]) -> None:
        # 1) the caller reserved block_ids; 2) tell the peer where to put the KV
        if request_id in self._reqs:
            raise ValueError(f"request {request_id} is already being transferred")
        req = _Req(request_id, Role.RECEIVER, list(block_ids), peer=peer)
        self._reqs[request_id] = req
        p = self._peers.get(peer)
        if p is None or not p.alive:
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is not connected")
            return
        self._notify(peer, ReceiveRequest(request_id=request_id, block_ids=req.block_ids))

    # ----------------------------------------------------------------- prefill side
    def send(self, request_id: str, block_ids: list[int]) -> None:
        if request_id in self._reqs:
            raise ValueError(f"request {request_id} is already being transferred")
        req = _Req(request_id, Role.SENDER, list(block_ids), started=time.monotonic())
        self._reqs[request_id] = req
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
        p = self._peers.get(peer)
        if p is None or not self._usable(p):
            self._end(req, FailureCause.PEER_DEAD, f"peer {peer} is gone")
            return
        if self.config.verify_checksums:
            req.checksums = self._checksums(req.block_ids, dst)
        if self.mode is TransferMode.PUSH:
            self._notify(peer, WriteStarted(request_id=req.request_id))
            req.notif = encode(WriteDone(request_id=req.request_id, checksums=req.checksums, block_ids=req.block_ids if req.checksums else []))
            try:
                req.xfer = self._post("WRITE", req.block_ids, peer, dst, req.notif, req)
            except TransferError as e:
                self._end(req, e.cause, str(e))
        else:
            self._notify(peer, BlocksReady(request_id=req.request_id, block_ids=req.block_ids, checksums=req.checksums))

    # ----------------------------------------------------------------- transfers
    def _post(self, op: str, local_ids: list[int], peer: str, remote_ids: list[int], notif: bytes, req: _Req) -> _Xfer:
        """Post one PUT (WRITE) or GET (READ) per (layer, run of ids consecutive on both
        sides). ``notif`` (push) is sent by ``_progress`` once the PUT is complete there."""
        p = self._peers[peer]
        if not self._usable(p):
            raise TransferError(FailureCause.PEER_DEAD, f"peer {peer} is gone")
        lay = self.kv.layout
        bb = lay.block_bytes
        base, rbase, rnb = self.kv.base_address, p.info.region_bases[0], p.info.num_blocks
        # a PUT/GET is not bounded by the region (cma reaches the whole process): check ids
        if any(not 0 <= b < lay.num_blocks for b in local_ids) or any(not 0 <= b < rnb for b in remote_ids):
            raise TransferError(FailureCause.BACKEND, f"block ids out of range (this side {lay.num_blocks} blocks, peer {rnb})")
        fn = self._ucp.put_nbx if op == "WRITE" else self._ucp.get_nbx
        name = "ucp_put_nbx" if op == "WRITE" else "ucp_get_nbx"
        ep, rkey, param = p.ep.handle, p.rkey, ctypes.byref(self._op_param)
        x = _Xfer(self._ucp, ep)
        spans = runs(local_ids, remote_ids)
        for layer in range(lay.num_layers):
            for s, d, n in spans:
                x.add(fn(ep, base + lay.offset(layer, s), n * bb, rbase + (layer * rnb + d) * bb, rkey, param), name)
        x.start_flush()
        req.num_bytes = lay.num_layers * len(local_ids) * bb
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

    # ----------------------------------------------------------------- messages
    def _notify(self, peer: str, msg: Msg | bytes) -> None:
        """Send a message (or an already encoded one) on the peer's control endpoint."""
        p = self._peers.get(peer)
        if p is None or not p.alive:
            log.debug("not sending a message to %s: not connected", peer)
            return
        buf = bytearray(msg if isinstance(msg, bytes) else encode(msg))
        try:
            request = p.ep.tag_send(self._Array(buf), self._api.UCXXTag(self._my_tag))
        except Exception as e:
            log.warning("message to %s failed: %s", peer, e)
            return
        self._sends.append((request, buf, peer))

    def _reap_sends(self) -> None:
        still = []
        for request, buf, peer in self._sends:
            if not request.completed:
                still.append((request, buf, peer))
                continue
            try:
                request.check_error()
            except Exception as e:
                if self._ep_failed(peer):
                    log.debug("message to %s failed: %s", peer, e)
                    self._lost.append(peer)  # handled by the next poll, not inside this loop
                else:
                    log.warning("message to %s failed: %s", peer, e)
        self._sends = still

    def _ep_failed(self, peer: str | None) -> bool:
        """UCX reported the peer's endpoint failed (with error handling PEER it does so
        when the peer's process or connection goes away)."""
        p = self._peers.get(peer) if peer else None
        return p is not None and p.ep is not None and not p.ep.alive

    def _receive_messages(self) -> None:
        api = self._api
        while True:
            probe = self.worker.tag_probe(api.UCXXTag(_TAG_KIND), api.UCXXTagMask(_TAG_KIND_MASK), remove=True)
            if not probe.matched:
                break
            buf = bytearray(max(1, probe.length))
            request = self.worker.tag_recv_with_handle(self._Array(buf), probe)
            self._recvs.append((request, buf, probe.sender_tag.value & _TAG_SENDER_MASK))
        while self._recvs and self._recvs[0][0].completed:  # in arrival order
            request, buf, tag = self._recvs.pop(0)
            if tag not in self._by_tag:  # accepted a moment ago, after this poll began
                self._add_accepted()
            sender = self._by_tag.get(tag)
            try:
                request.check_error()
                msg = decode(bytes(buf))
            except ProtocolError as e:
                log.error("bad message from %s: %s", sender or "an unknown peer", e)
                continue
            except Exception as e:
                log.warning("receiving a message from %s failed: %s", sender or "an unknown peer", e)
                continue
            if sender is None:
                log.warning("dropped %s from an unknown peer", type(msg).__name__)
                continue
            self._on_msg(sender, msg)

    # ----------------------------------------------------------------- abort
    def abort(self, request_id: str) -> None:
        req = self._reqs.get(request_id)
        if req is None:
            return
        self._end(req, FailureCause.ABORTED, "aborted by the caller")

    # ----------------------------------------------------------------- poll
    def poll(self) -> list[TransferEvent]:
        if self._closed:
            return []
        now = time.monotonic()
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
        for req in list(self._reqs.values()):
            self._progress(req, now)
        out, self._events = self._events, []
        for ev in out:
            record(self.metrics_label, ev)
        return out

    def wait(self, timeout_s: float, min_events: int = 1) -> list[TransferEvent]:
        """Poll until ``min_events`` events arrived or ``timeout_s`` passed; between polls
        sleep in ``epoll_wait`` on the worker's event fd (UCX wakes it when a message
        arrives), at most 2 ms so the bootstrap thread's news is seen soon."""
        deadline = time.monotonic() + timeout_s
        events: list[TransferEvent] = []
        while True:
            events.extend(self.poll())
            left = deadline - time.monotonic()
            if len(events) >= min_events or left <= 0 or self._closed:
                return events
            # sleeps only while UCX has nothing to do: ucp_worker_arm refuses (BUSY) while
            # copies of ours are pending, so this returns at once and polls again
            self.worker.progress_worker_event(max(1, min(2, int(left * 1000))))

    def _progress(self, req: _Req, now: float) -> None:
        if req.xfer is not None:
            state = self._state(req.xfer)
            if state == "DONE":
                req.xfer = None
                self._log_transports(req.peer)
                if req.ending is None:
                    self._xfer_done(req)
                    return
            elif state == "ERR":
                err = getattr(req.xfer, "error", "")
                req.xfer = None
                if req.ending is None:
                    if self._ep_failed(req.peer):  # the peer died under the operation
                        self._peer_lost(req.peer)  # type: ignore[arg-type]
                    else:
                        self._end(req, FailureCause.BACKEND, f"UCX reported a transfer error: {err}")
                    return
            elif req.ending is not None and self._release(req.xfer):  # PROC, ending: cancel it
                req.xfer = None
        if req.ending is not None:
            if req.xfer is None and (not req.need_ack or now - req.ending_since > self.timeout_s):
                self._finish(req, req.ending, req.ending_msg)
            return
        if req.started is not None and now - req.started > self.timeout_s:
            self._end(req, FailureCause.TIMEOUT, f"not done {self.config.kv_transfer_timeout_ms} ms after the transfer started")

    def _xfer_done(self, req: _Req) -> None:
        assert req.peer is not None
        if req.role is Role.SENDER:  # push: the PUT is complete at the peer: say so
            self._notify(req.peer, req.notif)
            self._finish(req)
            return
        # pull: our GET completed: check, then let the sender free its blocks
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
        if req is not None and req.peer is not None and req.peer != sender:
            log.warning("ignored %s for %s from %s (its peer is %s)", type(msg).__name__, rid, sender, req.peer)
            return
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
        elif isinstance(msg, WriteDone):
            if req is not None and req.role is Role.RECEIVER:
                req.num_bytes = self.kv.layout.num_layers * len(req.block_ids) * self.kv.layout.block_bytes
                self._log_transports(sender)
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
                self._log_transports(sender)
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
        """Begin ending a request: stop our op, tell the peer; the event follows once no
        one can touch the blocks any more (see ``_progress``)."""
        if req.ending is not None:
            return
        req.ending, req.ending_msg, req.ending_since = cause, message, time.monotonic()
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
        if cause is not None:
            log.warning("kv transfer %s (%s) failed: %s: %s", req.request_id, req.role.value, cause.value, message)
        self._events.append(ev)

    def _peer_lost(self, name: str) -> None:
        p = self._peers.get(name)
        if p is None or not p.alive:
            return
        p.alive = False  # its endpoints and rkey are kept until close(): an op may still be in flight
        log.warning("kv transfer peer %s (%s) is gone", name, p.info.bootstrap)
        for rid, (peer, _) in list(self._asked.items()):
            if peer == name:
                del self._asked[rid]
        for req in list(self._reqs.values()):
            if req.peer == name:
                self._end(req, FailureCause.PEER_DEAD, f"peer {name} died", tell_peer=False)
                req.need_ack = False

    # ----------------------------------------------------------------- reporting
    def _log_transports(self, peer: str | None) -> None:
        """After the first transfer with a peer: the transports UCX chose for it, read from
        UCX itself (the lanes ``ucp_ep_print_info`` lists for its endpoint)."""
        p = self._peers.get(peer) if peer else None
        if p is None or p.transports_logged or p.ep is None:
            return
        p.transports_logged = True
        try:
            lanes = _lanes(self._ucp.ep_info(p.ep.handle))
        except Exception as e:
            log.warning("could not read UCX transports for %s: %s", peer, e)
            return
        rma = sorted({tl for tl, roles in lanes if any(r.startswith("rma") for r in roles)})
        am = sorted({tl for tl, roles in lanes if "am" in roles})
        self.last_transports = "; ".join(
            [
                f"rma: {', '.join(rma)}" if rma else f"rma: {', '.join(am) or '?'} (software emulation)",
                f"am: {', '.join(am) or '?'}",
            ]
        )
        log.info("UCX transports to peer %s (%s): %s", peer, p.info.bootstrap, self.last_transports)

    @property
    def num_pending(self) -> int:
        return len(self._reqs)

    @property
    def broken_reason(self) -> str | None:
        return self._broken

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
        self._recvs.clear()
        try:
            self._ucp.mem_unmap(self._context.handle, self._memh)
        except Exception as e:
            log.debug("mem_unmap: %s", e)


_LANE = re.compile(r"lane\[\d+\]:\s+\d+:(\S+?)(?:\.\d+)?\s+md\[\d+\].*?seg\s+\d+\s*(.*)$")


def _lanes(info: str) -> list[tuple[str, list[str]]]:
    """[(transport/device, [roles])] from ``ucp_ep_print_info``: e.g. ("cma/memory", ["rma_bw#0"])."""
    out = []
    for line in info.splitlines():
        m = _LANE.search(line)
        if m:
            out.append((m.group(1), m.group(2).split()))
    return out
