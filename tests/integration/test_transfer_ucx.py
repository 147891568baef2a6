"""The UCX-direct transceiver (kvbridge/transfer/ucx.py) between two real processes, real
UCX (ucxx) on loopback.

The contract tests shared by every backend run in test_transfer_nixl.py (parametrized by
backend, "ucx" included); this file adds what is particular to UCX: the transports UCX chose (cma RMA between local processes), a UCX peer
refusing a NIXL peer, a peer killed in the middle of a large write, and idle waits that
sleep. Every test ends with both block pools full again and nothing pending.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.transfer_harness import Peer, assert_pools_full, pair, transfer

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # children inherit it: UCX on loopback only

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
]

TIMEOUT_MS = 1500


@pytest.fixture(scope="module", params=["push", "pull"])
def peers(request):
    mode = request.param
    prefill, decode, name = pair("ucx", mode, timeout_ms=TIMEOUT_MS)
    request.addfinalizer(decode.stop)
    request.addfinalizer(prefill.stop)
    yield prefill, decode, name, mode


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_transports_read_from_ucx(peers):
    """After the first transfer each side knows, from UCX itself, what carries the data:
    one-sided cma copies between local processes (never RMA emulated over tcp), and shared
    memory (sysv) for the messages, on an endpoint with peer failure detection."""
    prefill, decode, name, mode = peers
    (dev,), _ = transfer(prefill, decode, name, f"tp-{mode}", [0], [0])
    decode.call("free_received", dev[0])
    for p in (prefill, decode):
        line = p.call("transports")
        assert line is not None and "rma: cma/memory" in line, line
        assert "am: sysv/memory" in line, line
    assert_pools_full(prefill, decode)


def test_idle_wait_sleeps(peers):
    """wait() sleeps on the UCX worker's event fd: a second of waiting costs little CPU."""
    prefill, decode, _, mode = peers
    pid = decode.call("pid")
    before = cpu_seconds(pid)
    assert decode.call("wait", 1, 1.0) == []
    used = cpu_seconds(pid) - before
    assert used < 0.3, f"an idle wait of 1 s used {used:.2f} s of CPU"
    assert_pools_full(prefill, decode)


def test_handshake_refusals(peers):
    """A different KV shape, a wrong or missing token and a different backend (NIXL) are
    refused with the field named; then the right peer is accepted and the KV moves."""
    server, _, _, mode = peers
    addr = server.call("address")
    before = len(server.call("refusals"))
    with Peer("ucx", mode=mode, num_kv_heads=4, seed=5) as odd:
        res = odd.call("connect", addr, timeout=60)
        assert res[:2] == ("refused", "num_kv_heads"), res
        assert "num_kv_heads" in res[2]
        for token in ("wrong", ""):  # a new transceiver in the same process each time
            odd.call("rebuild", {"num_kv_heads": 2, "shared_token": token}, timeout=60)
            res = odd.call("connect", addr, timeout=60)
            assert res[:2] == ("refused", "token"), res
        with Peer("nixl", mode=mode) as nixl_peer:
            res = nixl_peer.call("connect", addr, timeout=60)
            assert res[:2] == ("refused", "backend"), res
        refused = [field for field, _ in server.call("refusals")[before:]]
        assert refused == ["num_kv_heads", "token", "token", "backend"], refused
        # the right token and shape, after all that: accepted, and the KV moves
        odd.call("rebuild", {"num_kv_heads": 2, "shared_token": "tok"}, timeout=60)
        res = odd.call("connect", addr, timeout=60)
        assert res[0] == "ok", res
        (dev,), (pev,) = transfer(server, odd, res[1], "h1", [1, 2], [3, 4])
        assert (dev[2], pev[2]) == ("done", "done"), (dev, pev)
        assert server.call("digests", [1, 2]) == odd.call("digests", [3, 4])
        odd.call("free_received", "h1")
        assert_pools_full(server, odd)


def test_killed_peer_frees_blocks():
    prefill = Peer("ucx", mode="push", seed=1, timeout_ms=60000)
    d1 = Peer("ucx", mode="push", seed=2, timeout_ms=60000)
    d2 = Peer("ucx", mode="push", seed=3, timeout_ms=60000)
    try:
        addr = prefill.call("address", timeout=60)
        name = d1.call("connect", addr, timeout=60)[1]
        assert d2.call("connect", addr, timeout=60)[0] == "ok"
        prefill.call("poll")  # its engine loop runs: both peers are added
        # 1) the decode side asked, then died before the KV was ready: the prefill side
        # fails the request as PEER_DEAD instead of writing, frees, and keeps serving
        prefill.call("hold", [0, 1, 2])
        d1.call("hold", [5, 6, 7])
        d1.call("receive", "k1", name, [5, 6, 7])
        d1.call("poll")
        d1.kill()
        prefill.call("send", "k1", [0, 1, 2])
        (pev,) = prefill.wait_events(1, timeout=10)
        assert pev[2:4] == ("failed", "peer_dead"), pev
        assert prefill.proc.is_alive()
        assert_pools_full(prefill)
        # 2) the prefill side dies while the decode side waits: the decode side frees
        d2.call("hold", [3, 4])
        d2.call("receive", "k2", name, [3, 4])
        d2.call("poll")
        t0 = time.monotonic()
        prefill.kill()
        (dev,) = d2.wait_events(1, timeout=10)
        assert dev[2:4] == ("failed", "peer_dead"), dev
        assert time.monotonic() - t0 < 5, "peer death must be noticed long before the 60 s timeout"
        assert_pools_full(d2)
    finally:
        for p in (prefill, d1, d2):
            p.stop()


def test_peer_killed_during_a_large_write():
    """The decode side dies while 128 MiB are being copied into it: the prefill process
    survives (UCX reports the failure on the endpoint, it does not abort), fails the
    request as PEER_DEAD and frees its blocks."""
    spec = dict(num_blocks=4096, timeout_ms=20000, verify_checksums=False)  # 4 layers x 4096 x 8 KiB
    prefill = Peer("ucx", mode="push", seed=1, **spec)
    decode = Peer("ucx", mode="push", seed=2, **spec)
    try:
        name = decode.call("connect", prefill.call("address", timeout=60), timeout=60)[1]
        ids = list(range(4096))
        prefill.call("hold", ids)
        decode.call("hold", ids)
        decode.call("receive", "big", name, ids)
        for _ in range(5):  # both engine loops run: the request reaches the prefill side
            decode.call("poll")
            prefill.call("poll")
            time.sleep(0.01)
        # send() posts the WRITE and drives its copy (~20 ms here, 4 MiB a call): the
        # decode side dies a few ms into it
        prefill.start("send", "big", ids)
        time.sleep(0.003)
        decode.kill()
        prefill.result("send", timeout=30)
        (pev,) = prefill.call("wait", 1, 10.0, timeout=30)
        assert pev[2:4] == ("failed", "peer_dead"), pev
        assert prefill.proc.is_alive()
        assert_pools_full(prefill)
    finally:
        prefill.stop()
        decode.stop()


def test_pull_sender_refuses_block_ids_outside_the_pool():
    """A pull sender checks its ids when it sends (from their packing, which BlocksReady
    carries), as the NIXL one does: a refused call leaves nothing pending."""
    prefill, decode, _ = pair("ucx", "pull", timeout_ms=TIMEOUT_MS)
    try:
        for bad in ([-1], [0, 32], [2**40]):
            with pytest.raises(RuntimeError, match="block ids must be in 0..31"):
                prefill.call("send", "bad-ids", bad)
        assert prefill.call("pool")[2] == 0  # nothing pending
        assert_pools_full(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def test_start_leaves_no_unknown_ucx_variable():
    """ucxx sets UCX_MEMTYPE_CACHE on import, which the UCX it brings no longer reads: UCX
    warned "unused environment variable" in every worker (and its children) using UCX."""
    code = (
        "import os\n"
        "from tests.transfer_harness import PeerSpec, _build\n"
        "kv, pool, t = _build(PeerSpec(backend='ucx'))\n"
        "print(os.environ.get('UCX_MEMTYPE_CACHE'))\n"
        "t.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "UCX_MEMTYPE_CACHE"}
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["None"], out.stdout
    assert "unused environment variable" not in out.stderr, out.stderr
