"""``kvbridge bench transfer``: the transceiver against bare NIXL and memcpy, in one run.

Two spawned processes (prefill, decode) each own one KV region of ``--max-size`` bytes
(4 layers, 16 KiB blocks), registered once. For each mode (push, pull), each backend and
each size, after warm-up:

    transceiver   decode reserves and calls receive() for every request first (as at
                  admission), and the prefill side takes them in (as its engine loop
                  does while computing), not timed; then the prefill side sends them one
                  after the other, and each is timed from send() to its initiator's DONE,
                  where bare NIXL's time ends too: push, the prefill's (WRITE complete);
                  pull, the decode's (READ complete, ReadDone posted: the decode side can
                  run the request). That is the part of a request's critical path the
                  transceiver owns. ``src+ us``: the same to the source's DONE (pull: one
                  notification later, when the prefill may free its blocks)
    bare NIXL     make_prepped_xfer + transfer + busy-poll to DONE, and the notification the
                  transceiver also needs (push: WRITE with notif; pull: READ then notif),
                  on the NIXL transceiver's agents, registrations and prepared lists (for
                  another backend, on a NIXL pair of its own), each round right after the
                  transceiver's round
    memcpy        one thread, numpy copy of the same number of bytes, in this process;
                  with ``--device cuda`` a device-to-device copy (cudaMemcpy) on that GPU

Each side runs on a core of its own (``--no-pin``: wherever the scheduler puts it), the
transceiver and bare NIXL alike. A round's time per transfer is the median of its transfers,
the same for both: on a shared VM one transfer preempted for a few ms moves a mean of 32 by
more than the transceiver's whole overhead.

Prints a table (GB/s, ratios, µs added per transfer), writes JSON and a PNG plot.
Targets: ≥ 0.9× bare NIXL from 16 MiB up; ≤ 200 µs added per transfer at 64 KiB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvbridge.bench import out_folder

KiB, MiB = 1024, 1024 * 1024
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M,256M,512M"
NUM_LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, DTYPE = 4, 16, 2, 64, "float32"
BLOCK_BYTES = 2 * KV_HEADS * BLOCK_SIZE * HEAD_DIM * 4  # 16 KiB per (layer, block)
REQ_UNIT = NUM_LAYERS * BLOCK_BYTES  # one block of every layer: 64 KiB


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1024 * MiB}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)


def human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


@dataclass
class Row:
    backend: str
    mode: str
    size: int
    iters: int
    trx_s: float  # seconds per transfer, transceiver
    bare_s: float  # seconds per transfer, bare NIXL (same mode)
    memcpy_s: float
    paired_ratio: float = float("nan")  # median over rounds of bare / transceiver, each round side by side
    source_s: float = float("nan")  # seconds per transfer to the source's DONE (pull: one notification later)
    device: str = "cpu"  # where both KV regions were; memcpy_s is a device copy on a GPU

    @property
    def trx_gbs(self) -> float:
        return self.size / self.trx_s / 1e9

    @property
    def bare_gbs(self) -> float:
        return self.size / self.bare_s / 1e9 if self.bare_s else float("nan")

    @property
    def memcpy_gbs(self) -> float:
        return self.size / self.memcpy_s / 1e9

    @property
    def ratio(self) -> float:
        return self.bare_s / self.trx_s if self.bare_s else float("nan")

    @property
    def added_us(self) -> float:
        return (self.trx_s - self.bare_s) * 1e6 if self.bare_s else float("nan")

    @property
    def source_added_us(self) -> float:
        return (self.source_s - self.bare_s) * 1e6 if self.bare_s else float("nan")


# --------------------------------------------------------------------------- peer process


def _peer(conn: Any, role: str, num_blocks: int, device: str, cpu: int | None = None) -> None:
    if cpu is not None:  # its own core: the scheduler moving a copy onto its peer's core
        os.sched_setaffinity(0, {cpu})  # made whole rounds 1.5x slower, now one side, now the other
    import torch

    from kvbridge.config import CacheTransceiverConfig
    from kvbridge.engine.kv_cache import KVCache, KVLayout
    from kvbridge.transfer.select import create_transceiver

    torch.set_num_threads(1)
    kv = KVCache(KVLayout(NUM_LAYERS, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, DTYPE), device)
    kv.as_bytes().copy_(torch.randint(0, 256, (kv.layout.total_bytes,), dtype=torch.uint8))
    t: Any = None
    peer = ""
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                if t is not None:
                    t.close()
                conn.send(("ok", None))
                return
            if cmd == "setup":  # (backend, mode): a fresh transceiver on the same KV region
                if t is not None:
                    t.close()
                backend, mode = args
                cfg = CacheTransceiverConfig(backend=backend, transfer_mode=mode, kv_transfer_timeout_ms=60000)
                t = create_transceiver(cfg, kv, model_id="bench", name=f"bench-{role}")
                res: Any = t.bootstrap_address
            elif cmd == "connect":
                peer = t.connect(args[0])
                res = peer
            elif cmd == "receive_all":  # decode: (prefix, nblocks, iters) reserve and ask for every request
                # up front, as a decode worker does at admission, long before the prefill finishes
                prefix, nb, iters = args
                for i in range(iters):
                    t.receive(f"{prefix}-{i}", peer, list(range(nb)))
                res = None
            elif cmd == "collect":  # decode: wait for (iters) DONE events → {request id: when it came}
                res = {}
                deadline = time.monotonic() + 300.0
                while len(res) < args[0] and time.monotonic() < deadline:
                    evs = t.wait(deadline - time.monotonic(), min_events=1)
                    now = time.perf_counter()  # CLOCK_MONOTONIC: one clock for both processes
                    for e in evs:
                        if not e.ok:
                            raise RuntimeError(f"decode: transfer {e.request_id} failed: {e}")
                        res[e.request_id] = now
                if len(res) < args[0]:
                    raise RuntimeError(f"decode: {len(res)}/{args[0]} transfers done")
            elif cmd == "send_all":  # prefill: (prefix, nblocks, iters) → [(request id, send() called, DONE)]
                prefix, nb, iters = args
                ids = list(range(nb))
                # first take in the receivers' requests (not timed), as a worker's engine
                # loop does between steps while it computes the prefill
                deadline = time.monotonic() + 10.0
                while len(t._asked) < iters and time.monotonic() < deadline:
                    t.poll()
                    time.sleep(0)
                if len(t._asked) < iters:
                    raise RuntimeError(f"prefill: {len(t._asked)}/{iters} receive requests arrived")
                res = []
                for i in range(iters):
                    t0 = time.perf_counter()
                    t.send(f"{prefix}-{i}", ids)
                    evs = t.wait(120.0)
                    if not evs or not evs[0].ok:
                        raise RuntimeError(f"transfer {prefix}-{i} failed: {evs}")
                    res.append((f"{prefix}-{i}", t0, time.perf_counter()))
            elif cmd == "bare_init":  # (op, nblocks, iters): initiator loop on the same agent and lists
                res = _bare_initiator(t, args[0], args[1], args[2])
            elif cmd == "bare_target":  # (iters): wait for that many notifications
                res = _bare_target(t, args[0])
            else:
                raise ValueError(cmd)
            conn.send(("ok", res))
        except Exception as e:  # report, keep serving
            conn.send(("exc", f"{type(e).__name__}: {e}"))


def _bare_initiator(t: Any, op: str, nb: int, iters: int) -> list[float]:
    import numpy as np

    agent, peer = t.agent, next(iter(t._peers))
    remote = t._peers[peer]
    lay = t.kv.layout
    layers = np.arange(lay.num_layers, dtype=np.int64)[:, None]
    ids = np.arange(nb, dtype=np.int64)[None, :]
    local_idx = (layers * lay.num_blocks + ids).ravel().astype(np.int32)
    remote_idx = (layers * remote.info.num_blocks + ids).ravel().astype(np.int32)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        notif = f"bare-{i}".encode()
        h = agent.make_prepped_xfer(op, t._local_dlist, local_idx, remote.dlist, remote_idx, notif_msg=notif if op == "WRITE" else b"")
        state = agent.transfer(h)
        while state == "PROC":  # busy poll: the best NIXL can do
            state = agent.check_xfer_state(h)
        if state != "DONE":
            raise RuntimeError(f"bare {op} failed: {state}")
        h.release()
        if op == "READ":
            agent.send_notif(peer, notif)
        times.append(time.perf_counter() - t0)
    return times


def _bare_target(t: Any, iters: int) -> float:
    agent = t.agent
    got = 0
    t0 = time.perf_counter()
    while got < iters:  # busy poll: the best NIXL can do
        got += sum(len(v) for v in agent.get_new_notifs().values())
        if time.perf_counter() - t0 > 300:
            raise RuntimeError("bare target timed out")
    return (time.perf_counter() - t0) / iters


def peer_cpus(pin: bool) -> dict[str, int | None]:
    """The core each side runs on: with ``pin`` and two cores or more, prefill on the first
    this process may use and decode on the second (as ``kvbridge serve`` gives each worker
    cores of its own); else wherever the scheduler puts them."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return {"prefill": None, "decode": None}
    return {"prefill": cpus[0], "decode": cpus[1]}


class _Proc:
    def __init__(self, role: str, num_blocks: int, device: str, cpu: int | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer, args=(child, role, num_blocks, device, cpu), daemon=True)
        self.proc.start()
        child.close()

    def start(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def result(self, timeout: float = 600) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("bench peer did not answer")
        status, res = self.conn.recv()
        if status != "ok":
            raise RuntimeError(res)
        return res

    def call(self, cmd: str, *args: Any) -> Any:
        self.start(cmd, *args)
        return self.result()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.start("stop")
                self.result(10)
            except Exception:
                pass
            self.proc.join(5)
        if self.proc.is_alive() and self.proc.pid:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(5)


def _both(a: _Proc, acmd: tuple, b: _Proc, bcmd: tuple) -> tuple[Any, Any]:
    a.start(*acmd)
    b.start(*bcmd)
    return a.result(), b.result()


def _trx(decode: _Proc, prefill: _Proc, mode: str, prefix: str, nb: int, iters: int) -> tuple[float, float]:
    """Median seconds per transfer through the transceiver, (to the initiator's DONE, to the
    source's DONE): decode asks for every request first (not timed), then the prefill side
    sends them one after the other. A transfer starts at send() and, like bare NIXL's, ends
    at its initiator's DONE: the prefill's in push (its WRITE is complete), the decode's in
    pull (its READ is complete, ReadDone posted). The source's DONE comes one notification
    later in pull; it frees the prefill's blocks and is off the path to the first token."""
    decode.call("receive_all", prefix, nb, iters)
    arrived, sent = _both(decode, ("collect", iters), prefill, ("send_all", prefix, nb, iters))
    to_source = statistics.median(end - start for _, start, end in sent)
    if mode == "push":
        return to_source, to_source
    return statistics.median(arrived[rid] - start for rid, start, _ in sent), to_source


def _bare(init: _Proc, target: _Proc, op: str, nb: int, iters: int) -> float:
    """Median seconds per bare NIXL transfer (make, post, poll to DONE, notification)."""
    return statistics.median(_both(init, ("bare_init", op, nb, iters), target, ("bare_target", iters))[0])


def _iters(size: int, budget_bytes: int) -> int:
    return max(3, min(300, budget_bytes // size))


def _memcpy_s(size: int, iters: int, device: str) -> float:
    if device != "cpu":
        return _device_copy_s(size, iters, device)
    import numpy as np

    src = np.full(size, 7, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    t0 = time.perf_counter()
    for _ in range(iters):
        np.copyto(dst, src)
    return (time.perf_counter() - t0) / iters


def _device_copy_s(size: int, iters: int, device: str) -> float:
    """Seconds per device-to-device copy of ``size`` bytes on ``device`` (one GPU)."""
    import torch

    src = torch.full((size,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def _pair(backend: str, mode: str, num_blocks: int, device: str, cpus: dict[str, int | None]) -> tuple[_Proc, _Proc]:
    """A fresh (prefill, decode) pair with connected transceivers of ``backend``: a
    transport left behind by another backend (a second UCX context, old registrations)
    skews the next (NIXL READ ran 3-5x slower after UCX-direct had run in the same
    processes)."""
    prefill, decode = _Proc("prefill", num_blocks, device, cpus["prefill"]), _Proc("decode", num_blocks, device, cpus["decode"])
    try:
        addr = prefill.call("setup", backend.upper(), mode)
        decode.call("setup", backend.upper(), mode)
        decode.call("connect", addr)
    except Exception:
        prefill.stop()
        decode.stop()
        raise
    return prefill, decode


def run(
    sizes: list[int], modes: list[str], backends: list[str], budget_bytes: int, rounds: int, device: str = "cpu",
    cpus: dict[str, int | None] | None = None,
) -> list[Row]:  # fmt: skip
    """Each cell is the best of ``rounds`` measurements, each round the transceiver then
    bare NIXL, in alternation: on a shared 2-core machine a measurement swings by 2x from
    one minute to the next, so a ratio compares only rounds taken side by side. ``ratio`` is
    best against best; ``paired`` the median of each round's own ratio, which a lucky or
    unlucky round alone does not move. Bare NIXL
    runs on its own NIXL pair, alive beside the backend's (idle, blocked on its pipe)."""
    num_blocks = -(-max(sizes) // REQ_UNIT)
    cpus = cpus or peer_cpus(pin=True)  # ``peer_cpus``: where each side runs
    rows: list[Row] = []
    memcpy: dict[int, float] = {}
    for mode in modes:
        op = "WRITE" if mode == "push" else "READ"
        for backend in backends:
            base = pair = _pair("nixl", mode, num_blocks, device, cpus)  # the bare NIXL baseline (and the NIXL transceiver)
            try:
                if backend != "nixl":
                    pair = _pair(backend, mode, num_blocks, device, cpus)
                    _trx(base[1], base[0], mode, f"meet-{mode}-{backend}", 1, 1)  # the base pair's prefill takes its peer in
                prefill, decode = pair
                init, target = (base[0], base[1]) if mode == "push" else (base[1], base[0])
                for size in sizes:
                    nb, iters = size // REQ_UNIT, _iters(size, budget_bytes)
                    key = f"{mode}-{backend}-{size}"
                    _trx(decode, prefill, mode, f"w-{key}", nb, 3)  # warm-up
                    _bare(init, target, op, nb, 3)
                    trxs, sources, bares = [], [], []
                    for r in range(rounds):
                        trx, source = _trx(decode, prefill, mode, f"m{r}-{key}", nb, iters)
                        trxs.append(trx)
                        sources.append(source)
                        bares.append(_bare(init, target, op, nb, iters))
                    trx_s, bare_s = min(trxs), min(bares)
                    paired = statistics.median(b / t for b, t in zip(bares, trxs, strict=True))
                    if size not in memcpy:
                        memcpy[size] = min(_memcpy_s(size, iters, device) for _ in range(rounds))
                    row = Row(backend, mode, size, iters, trx_s, bare_s, memcpy[size], paired, min(sources), device)
                    rows.append(row)
                    print(_fmt(row), flush=True)
            finally:
                for proc in {*base, *pair}:
                    proc.stop()
    return rows


HEADER = f"{'backend':7} {'mode':4} {'size':>8} {'iters':>5} {'trx GB/s':>9} {'bare NIXL':>9} {'ratio':>6} {'paired':>6} {'added us':>9} {'src+ us':>8} {'memcpy':>7}"


def _fmt(r: Row) -> str:
    return (
        f"{r.backend:7} {r.mode:4} {human(r.size):>8} {r.iters:5d} {r.trx_gbs:9.2f} {r.bare_gbs:9.2f} "
        f"{r.ratio:6.2f} {r.paired_ratio:6.2f} {r.added_us:9.0f} {r.source_added_us:8.0f} {r.memcpy_gbs:7.2f}"
    )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, ("push", "pull"), strict=True):
        mrows = [r for r in rows if r.mode == mode]
        if not mrows:
            continue
        for backend in sorted({r.backend for r in mrows}):
            br = [r for r in mrows if r.backend == backend]
            ax.plot([r.size for r in br], [r.trx_gbs for r in br], "o-", label=f"transceiver ({backend})")
        nr = [r for r in mrows if r.backend == "nixl"]
        if nr:
            ax.plot([r.size for r in nr], [r.bare_gbs for r in nr], "s--", label="bare NIXL")
        copy_label = "memcpy (1 thread)" if mrows[0].device == "cpu" else "device copy (same GPU)"
        ax.plot([r.size for r in nr or mrows], [r.memcpy_gbs for r in nr or mrows], "k:", label=copy_label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r.size for r in mrows})
        ax.set_xticks(sizes, [human(x).replace(" ", "") for x in sizes], rotation=45)
        ax.set_xlabel("KV bytes per transfer")
        ax.set_title(f"{mode} ({'WRITE' if mode == 'push' else 'READ'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("GB/s (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvbridge bench transfer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"KV bytes per transfer (default {DEFAULT_SIZES})")
    ap.add_argument("--modes", default="push,pull")
    ap.add_argument("--backends", default="", help="nixl,ucx (default: every one that loads)")
    ap.add_argument("--budget", default="512M", help="bytes moved per measurement (sets the iterations)")
    ap.add_argument("--rounds", type=int, default=9, help="best of this many measurements per cell")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot from a transfer.json")
    ap.add_argument("--device", default="cpu", help="where both KV regions live: cpu (DRAM) or cuda[:N] (VRAM, one GPU)")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place both sides (default: each on its own core)")
    ap.add_argument("--out", type=out_folder, default="bench-out", help="folder for transfer.json and transfer.png")
    a = ap.parse_args(argv)
    if a.replot:
        fields = {f for f in Row.__dataclass_fields__}
        rows = [Row(**{k: v for k, v in d.items() if k in fields}) for d in json.loads(Path(a.replot).read_text())]
        plot(rows, Path(a.replot).with_suffix(".png"))
        return 0
    sizes = sorted(parse_size(s) for s in a.sizes.split(","))
    bad = [s for s in sizes if s % REQ_UNIT]
    if bad:
        ap.error(f"sizes must be multiples of {human(REQ_UNIT)} (one 16 KiB block in each of 4 layers): {bad}")
    backends = [b for b in a.backends.split(",") if b] or _available_backends()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # local benchmark: loopback (children inherit it)
    print(HEADER, flush=True)
    cpus = peer_cpus(not a.no_pin)
    where = f"prefill on core {cpus['prefill']}, decode on core {cpus['decode']}" if cpus["prefill"] is not None else "not pinned"
    print(f"KV regions in {'DRAM' if a.device == 'cpu' else f'VRAM ({a.device})'}; {where}", flush=True)
    rows = run(sizes, [m for m in a.modes.split(",") if m], backends, parse_size(a.budget), a.rounds, a.device, cpus)
    (out / "transfer.json").write_text(json.dumps([{**asdict(r), "trx_gbs": r.trx_gbs, "bare_gbs": r.bare_gbs, "ratio": r.ratio, "added_us": r.added_us, "source_added_us": r.source_added_us, "memcpy_gbs": r.memcpy_gbs} for r in rows], indent=1))
    plot(rows, out / "transfer.png")
    for backend in backends:
        big = [r for r in rows if r.size >= 16 * MiB and r.backend == backend]
        small = [r for r in rows if r.size == min(sizes) and r.backend == backend]
        if big:
            print(
                f"{backend}: target ≥0.9x bare NIXL from 16 MiB: worst {min(r.ratio for r in big):.2f}x best against best, "
                f"{min(r.paired_ratio for r in big):.2f}x paired"
            )
        if small:
            print(f"{backend}: target ≤200 us added at {human(min(sizes))}: worst {max(r.added_us for r in small):.0f} us")
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")
    return 0


def _available_backends() -> list[str]:
    import importlib.util

    out = ["nixl"]
    if importlib.util.find_spec("kvbridge.transfer.ucx") and importlib.util.find_spec("ucxx"):
        out.append("ucx")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
