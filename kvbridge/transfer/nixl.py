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
blocks on one layer → 2 descriptors). ``integrity.runs()`` computes the same runs for checksums.

Messages ride NIXL notifications (``send_notif``, and the one attached to the WRITE in
push or the READ in pull, which NIXL delivers once the operation completes). Liveness
rides the bootstrap TCP connection.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kvbridge.config import CacheTransceiverConfig, TransferMode, ucx_defaults
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
from kvbridge.transfer.integrity import pack_ids
from kvbridge.transfer.lifecycle import LAYOUT, LifecycleTransceiver
from kvbridge.transfer.nixl_index import block_descs, block_indices, index_grid, stretch_indices
from kvbridge.transfer.waiting import WATCH_S

__all__ = ["LAYOUT", "NixlTransceiver"]

log = logging.getLogger("kvbridge.transfer.nixl")

# An idle wait sleeps until a peer's nudge, bootstrap news or wake(); it re-polls this often
# anyway (a safety net: every poll of an idle worker takes a slice of a core that a
# co-located prefill's threads are using).
_IDLE_POLL_S = 0.05
_DRIVE_CAP_S = 0.1  # a WRITE's _post waits this long at most for the peer (about one decode step)
_READ_DRIVE_S = 1e-3  # a READ's: the decode side's streams wait for it (see _post)


@dataclass
class _Peer:
    info: PeerInfo
    dlist: Any = None  # prepared remote descriptor list
    grid: Any = None  # index in ``dlist`` of every (layer, block): see index_grid
    alive: bool = True
    transports_logged: bool = False
    transports_since: float | None = None  # first completed transfer (then the log line is due)
    transports_want: bool = False  # we ran the one-sided op: wait for its table
    transports_read: float = 0.0



class NixlTransceiver(LifecycleTransceiver):
    backend_name = "nixl"
    _log = log
    # ReadDone rides the READ as its notification: NIXL sends it once the READ completes,
    # without a trip through our Python first (a sender sees it ~50 µs sooner)
    _read_notifies = True

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
        self._init_lifecycle()
        self._ucx_log = None
        if self.nixl_backend == "UCX":  # both before the backend creates its UCX context
            self._ucx_log = probe.setup_ucx_log()
            ucx_defaults(kv.is_cuda)
        self._ucx_log_pos = 0
        self._ucx_text = ""
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
        self._grid = index_grid(lay.num_layers, lay.num_blocks)
        self._local_dlist = self.agent.prep_xfer_dlist(
            "", block_descs(kv.base_address, lay.num_layers, lay.num_blocks, lay.block_bytes, self.device_id), self.mem_type
        )
        self._info = self._make_info(model_id, f"nixl/{self.nixl_backend}", self.agent.get_agent_metadata())
        self._wake = threading.Event()
        self._spent: list[Any] = []  # handles of completed transfers, released at the next poll
        self._stashed: dict[Any, list[bytes]] = {}  # notifications taken mid-step (_answer_peers)
        self._broken_by: str | None = None  # the request whose uncancellable op broke us
        self._server = handshake.BootstrapServer(
            host, port, config.shared_token, lambda: self._info, self._news(self._accepted), self._news(self._lost), self._wake.set
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

    def _news(self, into: list) -> Any:
        """A bootstrap-thread callback: queue the item for ``poll`` and wake ``wait``."""

        def put(item: Any) -> None:
            into.append(item)
            self._wake.set()

        return put

    def wake(self) -> None:
        super().wake()
        self._wake.set()

    # ----------------------------------------------------------------- connection
    def _add_peer(self, info: PeerInfo) -> None:
        name = self.agent.add_remote_agent(info.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        descs = block_descs(info.region_bases[0], int(info.fingerprint_fields["num_layers"]), info.num_blocks, info.block_bytes, info.device_id)
        dlist = self.agent.prep_xfer_dlist(info.agent_name, descs, info.mem_type)
        self._peers[info.agent_name] = _Peer(info, dlist, index_grid(int(info.fingerprint_fields["num_layers"]), info.num_blocks))
        try:  # bring the connection up now: the first transfer is 2-5x slower otherwise
            self.agent.make_connection(info.agent_name)
        except Exception as e:
            log.debug("make_connection to %s: %s", info.agent_name, e)


    def _check_new(self, request_id: str, block_ids: list[int], own_op: bool, packed: list[int] | None = None) -> Any:
        """Checks the ids; for our own op it prepares them at once (checking them on the way:
        it costs about what the check alone would); ``packed`` ones are checked already."""
        super()._check_new(request_id, block_ids, own_op, packed)
        if not block_ids:
            raise ValueError(f"request {request_id}: no blocks to transfer")
        nb = self.kv.layout.num_blocks
        if own_op:
            idx = block_indices(self._grid, block_ids)
            if idx is not None:
                return idx
        elif packed is not None or (min(block_ids) >= 0 and max(block_ids) < nb):
            return None
        raise ValueError(f"request {request_id}: block ids must be in 0..{nb - 1}")

    # ----------------------------------------------------------------- transfers
    def _start_write(self, req: _Req, peer: str, dst: list[int]) -> None:
        # wake the receiver first: where the messages go over tcp, UCX completes our WRITE
        # only once the receiver's worker answers its flush (see _post), and an idle
        # receiver sleeps until nudged
        self._notify(peer, WriteStarted(request_id=req.request_id))
        done = WriteDone(request_id=req.request_id, checksums=req.checksums, block_runs=pack_ids(req.block_ids) if req.checksums else [])
        try:
            req.xfer = self._post("WRITE", req.block_ids, peer, dst, encode(done), req)
        except TransferError as e:
            self._end(req, e.cause, str(e))
            return
        self._server.nudge(peer)  # for WriteDone (sends nothing: WriteStarted just went)
        if req.xfer_done:  # complete already (a CMA copy is done in the call): end it now
            self._progress(req, time.monotonic())

    def _prepare(self, block_ids: list[int], peer: str | None, packed: list[int] | None = None) -> Any:
        """The prepared-list indices of every (layer, block) of ``block_ids``, layer-major,
        in our list (``peer`` None) or the peer's; None for a peer not connected (``_post``
        refuses it) or an id out of range. Made when the ids arrive, not after the step;
        one stretch of ids as it came packed is one slice, with no pass over the ids."""
        if peer is None:
            grid = self._grid
        else:
            p = self._peers.get(peer)
            if p is None:
                return None
            grid = p.grid
        if packed is not None and len(packed) == 2:
            return stretch_indices(grid, *packed)
        return block_indices(grid, block_ids)

    def _post(self, op: str, local_ids: list[int], peer: str, remote_ids: list[int], notif: bytes, req: _Req) -> Any:
        p = self._peers[peer]
        lay = self.kv.layout
        local_idx = req.prepared  # made by _check_new: this op is ours
        remote_idx = req.peer_prepared if req.peer_prepared is not None else self._prepare(remote_ids, peer)
        if remote_idx is None:
            raise TransferError(FailureCause.BACKEND, f"{peer} named block ids outside its {p.info.num_blocks} blocks")
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
        # The endpoints have error handling; where their messages go over tcp (between
        # hosts, or UCX_MM_ERROR_HANDLING=n: config.ucx_defaults), UCX completes a
        # WRITE/READ (and sends its notification) only after the peer's worker answers a
        # flush: a peer busy in an engine step answers at its next poll (the copy itself
        # is done in transfer()).
        # The prefill side (WRITE) drives until then, spinning 1 ms and then sleeping
        # between checks, at most _DRIVE_CAP_S (a decode side in a step answers between
        # layers: ``mid_step_hook``): left to its next poll, the op would wait for its
        # next engine step (a whole prefill) and the decode side with it. The
        # decode side (READ) spins 1 ms at most, for a peer that is polling: its engine
        # steps are short and every stream waits for them, while a busy prefill answers
        # only after its step (8 concurrent chats: waiting up to 100 ms here stalled
        # decoding 45 ms per transfer at the median); its polls, one per step, finish it.
        now = time.monotonic()
        spin_until, deadline = now + 1e-3, now + (_DRIVE_CAP_S if op == "WRITE" else _READ_DRIVE_S)
        while state == "PROC" and now < deadline:
            if now > spin_until:
                time.sleep(100e-6)
            state = self._xfer_state(handle)
            now = time.monotonic()
        self._own_op_since = now
        req.xfer_done = state == "DONE"
        return handle

    def _release(self, handle: Any) -> bool:
        try:
            handle.release()
            return True
        except Exception:
            return False

    def _release_spent(self) -> None:
        spent, self._spent = self._spent, []
        for handle in spent:
            self._release(handle)

    def _wake_peer(self, peer: str) -> None:
        self._server.nudge(peer)

    def _notify(self, peer: str, msg: Msg | bytes) -> None:
        try:
            self.agent.send_notif(peer, msg if isinstance(msg, bytes) else encode(msg))
        except Exception as e:
            log.warning("notification to %s failed: %s", peer, e)
        self._server.nudge(peer)

    # ----------------------------------------------------------------- poll
    def poll(self) -> list[TransferEvent]:
        now = time.monotonic()
        self._begin_poll(now)
        self._release_spent()
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
        if self._stashed:  # taken mid-step: they came first
            self._stash(notifs)
            notifs, self._stashed = self._stashed, {}
        if notifs:
            self._last_activity = now
        for sender, msgs in notifs.items():
            sender = sender.decode() if isinstance(sender, bytes) else sender
            for raw in msgs:
                try:
                    self._on_msg(sender, decode(raw))
                except ProtocolError as e:
                    log.error("bad notification from %s: %s", sender, e)
        self._progress_active(now)
        for name, p in self._peers.items():
            if p.transports_since is not None and not p.transports_logged:
                self._log_transports(name)
        return self._take_events(now)

    def _answer_peers(self) -> None:
        """NIXL progresses its UCX worker when asked for notifications: keep them for poll."""
        try:
            self._stash(self.agent.get_new_notifs())
        except Exception:
            pass  # poll reports it

    def _watch_briefly(self) -> None:
        """``get_new_notifs`` in a loop (~1 µs each; a poll is tens): a notification is seen
        within a microsecond of its arrival, not half a poll later."""
        get, until = self.agent.get_new_notifs, time.perf_counter() + WATCH_S
        try:
            while time.perf_counter() < until:
                if notifs := get():
                    self._stash(notifs)
                    return
        except Exception:
            pass  # poll reports it
        os.sched_yield()

    def _stash(self, notifs: dict[Any, list[bytes]]) -> None:
        for sender, msgs in notifs.items():
            self._stashed.setdefault(sender, []).extend(msgs)

    def _xfer_state(self, handle: Any) -> str:
        try:
            return self.agent.check_xfer_state(handle)
        except Exception:  # NIXL raises for some failures instead of answering ERR
            return "ERR"

    def _xfer_completed(self, req: _Req) -> None:
        # released at the next poll: ~7 µs here, right after a copy, that the request's
        # event would otherwise wait for (a completed handle holds nothing of the peer's)
        self._spent.append(req.xfer)
        req.xfer = None
        self._log_transports(req.peer, initiator=True)

    def _xfer_failed(self, req: _Req) -> None:
        self._release(req.xfer)
        req.xfer = None
        if req.ending is None:
            self._end(req, FailureCause.BACKEND, "NIXL reported a transfer error")

    def _ending_stuck(self, req: _Req, now: float) -> None:
        if req.xfer is not None and now - req.ending_since > self.timeout_s and self._broken is None:
            # NIXL can neither finish nor cancel it: the blocks stay held (freeing them could
            # let the op write into reused blocks) and health reports the transceiver broken
            self._broken = f"NIXL cannot cancel the transfer of {req.request_id}; its blocks stay held"
            self._broken_by = req.request_id
            log.error("kv transceiver broken: %s", self._broken)

    def _finish(self, req: _Req, cause: FailureCause | None = None, message: str = "") -> None:
        super()._finish(req, cause, message)
        if self._broken_by == req.request_id:  # the stuck operation ended after all
            log.warning("kv transceiver healthy again: the transfer of %s ended", req.request_id)
            self._broken = self._broken_by = None

    def _finished_ok(self, req: _Req) -> None:
        self._log_transports(req.peer)

    def _drop_peer(self, name: str, p: _Peer) -> None:
        self._release_spent()  # before its agent goes
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

    def _arm_sleep(self) -> None:
        self._wake.clear()

    def _sleep(self, left: float) -> None:
        """On the event set by the bootstrap thread when a peer nudges us (a message for us
        arrived) or a peer connects or goes, or by ``wake()``; ``_IDLE_POLL_S`` at most."""
        self._wake.wait(min(left, _IDLE_POLL_S))

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._release_spent()
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
