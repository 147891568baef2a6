"""``kvbridge doctor --self-test``: a real KV transfer between two local transceivers.

Two spawned processes (a prefill and a decode peer), each with its own ``KVCache`` and a
transceiver built by ``transfer.select.create_transceiver`` for the configured backend, talk
over 127.0.0.1 exactly as two workers would: handshake, a warm-up transfer, then timed
transfers of the whole region. Reported: the transports UCX chose (the transceiver's own
transport line), whether the bytes arrived intact, and the bandwidth against a memcpy of the
same size in this process. Children are stopped by their pid, never by name.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kvbridge.config import ucx_protocol_log
from kvbridge.doctor_checks import Finding, Status

# 2 layers x 256 blocks x 64 KiB = 32 MiB per peer; a transfer of all blocks is one run
LAYOUT = dict(num_layers=2, num_blocks=256, block_size=16, num_kv_heads=8, head_dim=128, dtype="float16")
RUNS = 5


@dataclass
class SelfTestResult:
    backend: str
    ok: bool
    error: str = ""
    transports: str = ""
    plugin_dir: str = ""
    num_bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    gbps: float = 0.0
    memcpy_gbps: float = 0.0
    intact: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- child


def _child(conn: Any, role: str, backend: dict[str, Any], seed: int) -> None:
    # our own UCX log file (the parent's is in the inherited environment)
    log_file = str(ucx_protocol_log())
    try:
        _serve(conn, role, backend, seed)
    finally:
        if os.path.exists(log_file):
            os.unlink(log_file)


def _serve(conn: Any, role: str, backend: dict[str, Any], seed: int) -> None:
    # stdout belongs to the report (--json): NIXL's and UCX's prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"[doctor {role} %(process)d] %(name)s %(message)s")
    try:
        import torch

        from kvbridge.config import CacheTransceiverConfig
        from kvbridge.engine.kv_cache import KVCache, KVLayout
        from kvbridge.transfer import probe
        from kvbridge.transfer.select import create_transceiver

        torch.set_num_threads(1)
        kv = KVCache(KVLayout(**LAYOUT))
        g = torch.Generator().manual_seed(seed)
        kv.as_bytes().copy_(torch.randint(0, 256, (kv.layout.total_bytes,), dtype=torch.uint8, generator=g))
        cfg = CacheTransceiverConfig(**backend)
        t = create_transceiver(cfg, kv, model_id="kvbridge-doctor", host="127.0.0.1", port=0, name=f"doctor-{role}")
        assert t is not None
    except Exception as e:  # reported by the parent as the self-test's failure
        conn.send(("exc", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", t.bootstrap_address))
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                t.close()
                conn.send(("ok", None))
                return
            if cmd == "connect":
                res: Any = t.connect(args[0], timeout_s=10)
            elif cmd == "receive":
                res = t.receive(*args)
            elif cmd == "send":
                res = t.send(*args)
            elif cmd == "wait":
                res = [
                    (e.status.value, e.cause.value if e.cause else None, e.message, e.num_bytes, e.seconds)
                    for e in t.wait(args[0])
                ]
            elif cmd == "digest":
                res = hashlib.sha256(kv.as_bytes().numpy().tobytes()).hexdigest()
            elif cmd == "report":
                res = (getattr(t, "last_transports", "") or "", probe.loaded_plugin_dir() or "")
            else:
                raise ValueError(cmd)
            conn.send(("ok", res))
        except Exception as e:
            conn.send(("exc", f"{type(e).__name__}: {e}"))


# --------------------------------------------------------------------------- parent


class _Peer:
    def __init__(self, role: str, backend: dict[str, Any], seed: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, role, backend, seed), daemon=True)
        self.proc.start()
        child.close()
        self.role = role

    def start(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def result(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the {self.role} peer did not answer within {timeout:g} s")
        status, res = self.conn.recv()
        if status == "exc":
            raise RuntimeError(f"{self.role} peer: {res}")
        return res

    def call(self, cmd: str, *args: Any, timeout: float = 30.0) -> Any:
        self.start(cmd, *args)
        return self.result(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", timeout=5)
            except Exception:
                pass
            self.proc.join(3)
        if self.proc.is_alive() and self.proc.pid is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(3)


def memcpy_gbps(num_bytes: int, runs: int = RUNS) -> float:
    import numpy as np

    src = np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times) / 1e9


def run_self_test(backend: dict[str, Any], label: str, timeout_s: float = 120.0) -> SelfTestResult:
    """Transfer the whole KV region prefill → decode ``RUNS`` times (after one warm-up) with
    the transceiver config ``backend`` (CacheTransceiverConfig fields)."""
    res = SelfTestResult(backend=label, ok=False)
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    prefill = _Peer("prefill", backend, seed=1)
    decode = _Peer("decode", backend, seed=2)
    try:
        addr = prefill.result(left())
        decode.result(left())
        name = decode.call("connect", addr, timeout=left())
        ids = list(range(LAYOUT["num_blocks"]))
        for i in range(RUNS + 1):
            rid = f"doctor-{i}"
            decode.call("receive", rid, name, ids, timeout=left())
            prefill.call("send", rid, ids, timeout=left())
            wait_s = min(30.0, left())
            prefill.start("wait", wait_s)
            decode.start("wait", wait_s)
            (pev, dev) = (prefill.result(wait_s + 10), decode.result(wait_s + 10))
            for side, evs in (("prefill", pev), ("decode", dev)):
                if not evs or evs[0][0] != "done":
                    raise RuntimeError(
                        f"transfer {i} on the {side} side: "
                        + (f"{evs[0][1]}: {evs[0][2]}" if evs else f"no event within {wait_s:g} s")
                    )
            if i > 0:  # the first one warms the connection up
                res.seconds.append(max(pev[0][4], 1e-9))
                res.num_bytes = pev[0][3]
        res.intact = prefill.call("digest", timeout=left()) == decode.call("digest", timeout=left())
        # the transports of the side that runs the one-sided operation: WRITE (push) / READ (pull)
        initiator = decode if backend.get("transfer_mode") == "pull" else prefill
        res.transports, res.plugin_dir = initiator.call("report", timeout=left())
        res.gbps = res.num_bytes / statistics.median(res.seconds) / 1e9
        res.memcpy_gbps = memcpy_gbps(res.num_bytes or 1 << 20)
        res.ok = res.intact
        if not res.intact:
            res.error = "the decode side's KV differs from the prefill side's after the transfer"
    except Exception as e:
        res.error = str(e)
    finally:
        prefill.stop()
        decode.stop()
    return res


def findings(res: SelfTestResult) -> list[Finding]:
    if not res.ok:
        return [
            Finding(
                "self-test",
                Status.FAIL,
                f"{res.backend}: {res.error}",
                "fix the failures above; run with UCX_LOG_LEVEL=info for UCX's view",
            )
        ]
    mib = res.num_bytes / 2**20
    out = [
        Finding("self-test", Status.OK, f"{res.backend}: {RUNS} x {mib:.0f} MiB prefill → decode, bytes intact"),
        Finding(
            "self-test transports",
            Status.OK if res.transports else Status.INFO,
            (res.transports or "(the backend reported no transport line)")
            + (f"; NIXL plugins loaded from {res.plugin_dir}" if res.plugin_dir else ""),
        ),
    ]
    ratio = res.gbps / res.memcpy_gbps if res.memcpy_gbps else 0.0
    bw = f"{res.gbps:.2f} GB/s (median of {RUNS}), memcpy {res.memcpy_gbps:.2f} GB/s: {ratio:.0%} of memcpy"
    rma = next((part for part in res.transports.split(";") if part.strip().startswith("rma")), "")
    slow = "tcp/" in rma  # one-sided operations emulated over TCP
    out.append(
        Finding(
            "self-test bandwidth",
            Status.WARN if slow else Status.INFO,
            bw,
            "UCX moves the data over TCP: check UCX_TLS / UCX_NET_DEVICES" if slow else "",
        )
    )
    return out
