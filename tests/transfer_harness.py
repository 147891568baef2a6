"""Two-process harness for transceiver tests, parametrizable by backend name ("nixl", "ucx").

The parent drives each peer through a pipe; every peer is a spawned process that owns a
real ``KVCache`` (random bytes), a ``BlockPool`` and a transceiver made by
``kvbridge.transfer.select.create_transceiver`` for the backend asked. The child applies
the block lifetime contract of ``base.py`` itself: on a terminal event the sender frees its
blocks, the receiver frees them on FAILED and keeps them on DONE (the test frees them).

    with Peer("nixl", mode="push") as prefill, Peer("nixl", mode="push") as decode:
        peer = decode.call("connect", prefill.call("address"))
        decode.call("hold", [3, 4, 9]); prefill.call("hold", [0, 1, 2])
        decode.call("receive", "r1", peer, [3, 4, 9]); prefill.call("send", "r1", [0, 1, 2])
        decode.call("wait", 1)  → [("r1", "done", None, "")]

Processes are stopped by their own pid (never by name), also when a test fails.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.device import DEVICE

BACKENDS = {"nixl": "NIXL", "ucx": "UCX"}


@dataclass
class PeerSpec:
    backend: str = "nixl"  # "nixl" | "ucx"
    mode: str = "push"
    num_layers: int = 4
    num_blocks: int = 32
    block_size: int = 16
    num_kv_heads: int = 2
    head_dim: int = 64
    dtype: str = "float16"
    model_id: str = "test-model"
    shared_token: str = "tok"
    timeout_ms: int = 3000
    verify_checksums: bool = True
    seed: int = 0
    device: str = DEVICE  # cpu | cuda[:N]: KV in host memory or in VRAM
    env: dict[str, str] = field(default_factory=dict)  # set in the child before its transceiver


# --------------------------------------------------------------------------- child


class _Uncancellable:
    """A transfer handle that does not complete, and refuses to be released, until the
    ``finish_stalled`` fault says so (NIXL can neither finish nor cancel the operation)."""

    finished = False

    def release(self) -> None:
        if not self.finished:
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE: transfer still in progress")


class _Stalled:
    """A transfer handle that never completes (fault injection for the timeout path)."""

    def release(self) -> None:
        pass


def _build(spec: PeerSpec) -> tuple[Any, Any, Any]:
    import torch

    from kvbridge.config import CacheTransceiverConfig
    from kvbridge.engine.block_pool import BlockPool
    from kvbridge.engine.kv_cache import KVCache, KVLayout
    from kvbridge.transfer.select import create_transceiver

    layout = KVLayout(spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype)
    kv = KVCache(layout, spec.device)
    g = torch.Generator().manual_seed(spec.seed)
    kv.as_bytes().copy_(torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8, generator=g))
    pool = BlockPool(layout.num_blocks, layout.block_size, enable_prefix_caching=False)
    cfg = CacheTransceiverConfig(
        backend=BACKENDS[spec.backend],
        transfer_mode=spec.mode,
        kv_transfer_timeout_ms=spec.timeout_ms,
        verify_checksums=spec.verify_checksums,
        shared_token=spec.shared_token,
    )
    t = create_transceiver(cfg, kv, model_id=spec.model_id, host="127.0.0.1", port=0, name=f"test-{spec.mode}")
    return kv, pool, t


def _apply_fault(t: Any, kv: Any, fault: str | None) -> None:
    from kvbridge.transfer.integrity import RunChecksums

    if fault == "corrupt":
        # the sender computes checksums, then one byte of the first source block flips, as if
        # corrupted on the way: the receiver must refuse it. Backends that verify checksums
        # compute them on the sender with ``_checksums(local_ids, remote_ids)``.
        orig = t._checksums

        def corrupt(local: list[int], remote: list[int]) -> list[int]:
            sums = orig(local, remote)
            t.kv.as_bytes()[t.kv.layout.offset(0, local[0])] ^= 0xFF
            t._checksums = orig  # only once
            return sums

        t._checksums = corrupt
    elif fault == "stall":
        # the sender's one-sided operation never completes
        t._post = lambda *a, **k: _Stalled()
        if hasattr(t, "agent"):
            orig_check = t.agent.check_xfer_state
            t.agent.check_xfer_state = lambda h: "PROC" if isinstance(h, _Stalled) else orig_check(h)
    elif fault == "stall_uncancellable":
        # the sender's one-sided operation never completes, and NIXL refuses to cancel it
        t._post = lambda *a, **k: _Uncancellable()
        orig_check = t.agent.check_xfer_state
        t.agent.check_xfer_state = lambda h: ("DONE" if h.finished else "PROC") if isinstance(h, _Uncancellable) else orig_check(h)
    elif fault == "finish_stalled":  # the stuck operations complete after all
        _Uncancellable.finished = True
    elif fault is None:  # back to normal
        _Uncancellable.finished = False
        t.__dict__.pop("_post", None)
        if not isinstance(t._checksums, RunChecksums):
            t._checksums = RunChecksums(t.kv)
        if hasattr(t, "agent"):
            t.agent.__dict__.pop("check_xfer_state", None)
    else:
        raise ValueError(f"unknown fault {fault}")


def _child(conn: Any, spec_d: dict) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{spec_d['mode']} %(process)d] %(name)s %(message)s")
    spec = PeerSpec(**spec_d)
    os.environ.update(spec.env)
    kv, pool, t = _build(spec)
    received: dict[str, list[int]] = {}

    def handle_events(events: list) -> list:
        out = []
        for ev in events:
            if ev.role.value == "sender" or not ev.ok:
                pool.free(ev.block_ids)
            else:
                received[ev.request_id] = list(ev.block_ids)
            out.append((ev.request_id, ev.role.value, ev.status.value, ev.cause.value if ev.cause else None, ev.message))
        return out

    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                t.close()
                conn.send(("ok", None))
                return
            if cmd == "address":
                res: Any = t.bootstrap_address
            elif cmd == "pid":
                res = os.getpid()
            elif cmd == "connect":
                from kvbridge.transfer.base import HandshakeRefused, TransferError

                try:
                    res = ("ok", t.connect(args[0], timeout_s=10))
                except HandshakeRefused as e:
                    res = ("refused", e.field, str(e))
                except TransferError as e:
                    res = ("error", e.cause.value, str(e))
            elif cmd == "hold":  # hold exactly these block ids
                want = set(args[0])
                ids = pool.allocate(pool.num_free)
                pool.free([b for b in ids if b not in want])
                res = sorted(want)
            elif cmd == "receive":
                t.receive(args[0], args[1], list(args[2]))
                res = None
            elif cmd == "send":
                t.send(args[0], list(args[1]))
                res = None
            elif cmd == "abort":
                t.abort(args[0])
                res = None
            elif cmd == "wait":  # wait for n events (or the deadline)
                res = handle_events(t.wait(args[1] if len(args) > 1 else 10.0, min_events=args[0]))
            elif cmd == "poll":
                res = handle_events(t.poll())
            elif cmd == "peer_may_wait":  # a poll, then: would a step get a mid-step hook?
                handle_events(t.poll())
                res = t.mid_step_hook() is not None
            elif cmd == "step":  # (seconds, hook): an engine step that does not poll; with
                # ``hook`` it runs the transceiver's mid-step hook every 2 ms, as between layers
                hook = t.mid_step_hook() if args[1] else None
                end = time.monotonic() + args[0]
                while time.monotonic() < end:
                    time.sleep(0.002)
                    if hook is not None:
                        hook()
                res = hook is not None
            elif cmd == "free_received":
                pool.free(received.pop(args[0]))
                res = None
            elif cmd == "digests":  # sha256 of each block (all layers), in the order given
                lay = kv.layout
                res = []
                for b in args[0]:
                    h = hashlib.sha256()
                    for layer in range(lay.num_layers):
                        h.update(kv.block_bytes_view(layer, b).cpu().numpy().tobytes())
                    res.append(h.hexdigest())
            elif cmd == "pool":
                res = (pool.num_free, pool.num_blocks, t.num_pending)
            elif cmd == "refusals":
                res = list(t.refusals)
            elif cmd == "fault":
                _apply_fault(t, kv, args[0])
                res = None
            elif cmd == "rebuild":  # a new transceiver (and KV) with some settings changed
                t.close()
                spec = PeerSpec(**{**asdict(spec), **args[0]})
                kv, pool, t = _build(spec)
                received.clear()
                res = t.bootstrap_address
            elif cmd == "broken":
                res = t.broken_reason
            elif cmd == "transports":
                res = getattr(t, "last_transports", None)
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", res))
        except Exception:
            conn.send(("exc", traceback.format_exc()))


# --------------------------------------------------------------------------- parent


class Peer:
    """A transceiver in its own process. ``call(cmd, *args)`` returns its answer."""

    def __init__(self, backend: str = "nixl", **spec: Any) -> None:
        self.spec = PeerSpec(backend=backend, **spec)
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, asdict(self.spec)), daemon=True)
        self.proc.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def call(self, cmd: str, *args: Any, timeout: float = 30.0) -> Any:
        self.start(cmd, *args)
        return self.result(cmd, timeout)

    def start(self, cmd: str, *args: Any) -> None:
        """Send a command without waiting for its answer (see ``result``)."""
        self._conn.send((cmd, args))

    def answered(self) -> bool:
        """Whether the answer to a ``start``ed command is already there."""
        return self._conn.poll(0)

    def result(self, cmd: str = "", timeout: float = 30.0) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer {self.pid} did not answer {cmd} within {timeout}s")
        status, res = self._conn.recv()
        if status == "exc":
            raise RuntimeError(f"peer {self.pid} failed on {cmd}:\n{res}")
        return res

    def kill(self) -> None:
        """SIGKILL this peer (by its pid) and reap it."""
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(5)

    def stop(self) -> None:
        """Graceful stop; SIGKILL by pid when it does not answer."""
        if self.proc.is_alive():
            try:
                self.call("stop", timeout=5)
            except Exception:
                pass
            self.proc.join(3)
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.join(3)

    def wait_events(self, n: int, timeout: float = 10.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        out: list[tuple] = []
        while len(out) < n and time.monotonic() < deadline:
            out += self.call("wait", n - len(out), max(0.05, deadline - time.monotonic()), timeout=timeout + 10)
        return out

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pair(backend: str, mode: str, **spec: Any) -> tuple[Peer, Peer, str]:
    """(prefill, decode, prefill's name as the decode side knows it), connected."""
    prefill = Peer(backend, mode=mode, seed=1, **spec)
    decode = Peer(backend, mode=mode, seed=2, **spec)
    try:
        res = decode.call("connect", prefill.call("address", timeout=60))
        assert res[0] == "ok", res
        return prefill, decode, res[1]
    except BaseException:
        prefill.stop()
        decode.stop()
        raise


def wait_both(a: Peer, na: int, b: Peer, nb: int, timeout: float = 10.0) -> tuple[list[tuple], list[tuple]]:
    """Both peers poll at the same time (as two engine loops would) until each has its events."""
    a.start("wait", na, timeout)
    b.start("wait", nb, timeout)
    return a.result("wait", timeout + 20), b.result("wait", timeout + 20)


def assert_pools_full(*peers: Peer) -> None:
    """Every block free and nothing pending on each peer (how every transfer test ends)."""
    for p in peers:
        free, total, pending = p.call("pool")
        assert (free, pending) == (total, 0), f"peer {p.pid}: {free}/{total} blocks free, {pending} pending"


def transfer(prefill: Peer, decode: Peer, name: str, rid: str, src: list[int], dst: list[int]):
    """One request: both sides hold their blocks, decode receives, prefill sends; the events."""
    prefill.call("hold", src)
    decode.call("hold", dst)
    decode.call("receive", rid, name, dst)
    prefill.call("send", rid, src)
    return wait_both(decode, 1, prefill, 1)
