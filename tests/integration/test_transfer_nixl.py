"""The cache transceiver between two real processes over real NIXL/UCX on loopback.

Every test ends with both block pools full again (``num_free == num_blocks``) and nothing
pending in either transceiver. The harness (tests/transfer_harness.py) is parametrized by
backend name; "ucx" joins once kvbridge/transfer/ucx.py exists.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from tests.transfer_harness import Peer, assert_pools_full, pair, transfer, wait_both

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # children inherit it: UCX on loopback only

BACKENDS = ["nixl"] + (["ucx"] if importlib.util.find_spec("kvbridge.transfer.ucx") else [])
TIMEOUT_MS = 1500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module", params=[(b, m) for b in BACKENDS for m in ("push", "pull")], ids=lambda p: f"{p[0]}-{p[1]}")
def peers(request):
    backend, mode = request.param
    prefill, decode, name = pair(backend, mode, timeout_ms=TIMEOUT_MS)
    request.addfinalizer(decode.stop)
    request.addfinalizer(prefill.stop)
    yield prefill, decode, name, mode


@pytest.mark.parametrize(
    "src,dst",
    [
        (list(range(0, 8)), list(range(16, 24))),  # contiguous on both sides: one run
        ([1, 2, 3, 7, 11, 12, 30], [5, 6, 9, 10, 0, 1, 31]),  # scattered: runs differ per side
    ],
    ids=["contiguous", "scattered"],
)
def test_blocks_arrive_byte_identical(peers, src, dst):
    prefill, decode, name, mode = peers
    (dev,), (pev,) = transfer(prefill, decode, name, f"r-{mode}-{src[0]}", src, dst)
    assert dev[2:4] == ("done", None), dev
    assert pev[2:4] == ("done", None), pev
    assert prefill.call("digests", src) == decode.call("digests", dst)
    decode.call("free_received", dev[0])
    assert_pools_full(prefill, decode)


def test_many_requests_in_flight(peers):
    prefill, decode, name, mode = peers
    rids = [f"m-{mode}-{i}" for i in range(4)]
    srcs = [[i * 4 + j for j in range(4)] for i in range(4)]
    dsts = [[31 - (i * 4 + j) for j in range(4)] for i in range(4)]  # reversed: every block its own run
    prefill.call("hold", sum(srcs, []))
    decode.call("hold", sum(dsts, []))
    for rid, dst in zip(rids, dsts, strict=False):
        decode.call("receive", rid, name, dst)
    for rid, src in zip(rids, srcs, strict=False):
        prefill.call("send", rid, src)
    devs, pevs = wait_both(decode, 4, prefill, 4)
    assert sorted(e[0] for e in devs if e[2] == "done") == sorted(rids), devs
    assert sorted(e[0] for e in pevs if e[2] == "done") == sorted(rids), pevs
    for src, dst in zip(srcs, dsts, strict=False):
        assert prefill.call("digests", src) == decode.call("digests", dst)
    for rid in rids:
        decode.call("free_received", rid)
    assert_pools_full(prefill, decode)


def test_checksum_catches_corrupted_block(peers):
    prefill, decode, name, mode = peers
    prefill.call("fault", "corrupt")
    try:
        (dev,), (pev,) = transfer(prefill, decode, name, f"c-{mode}", [4, 5, 6], [7, 8, 9])
    finally:
        prefill.call("fault", None)
    assert dev[2:4] == ("failed", "checksum"), dev
    assert "checksum" in dev[4]
    assert pev[2] == "done"  # the sender's part went through; the receiver refused the data
    assert_pools_full(prefill, decode)


def test_timeout_frees_both_sides(peers):
    prefill, decode, name, mode = peers
    if mode == "pull":
        decode.call("fault", "stall")  # the reader's READ never completes
    else:
        prefill.call("fault", "stall")  # the writer's WRITE never completes
    try:
        (dev,), (pev,) = transfer(prefill, decode, name, f"t-{mode}", [0, 1], [2, 3])
    finally:
        prefill.call("fault", None)
        decode.call("fault", None)
    assert dev[2:4] == ("failed", "timeout"), dev
    assert pev[2:4] == ("failed", "timeout"), pev
    assert_pools_full(prefill, decode)


def test_abort_before_the_kv_is_ready(peers):
    prefill, decode, name, mode = peers
    decode.call("hold", [10, 11])
    decode.call("receive", f"a-{mode}", name, [10, 11])
    decode.call("abort", f"a-{mode}")
    # both engine loops run for a second (on a fresh connection the messages need both
    # sides' progress): the request and its abort reach the prefill side
    (dev,), pevs = wait_both(decode, 2, prefill, 1, timeout=1.0)
    assert dev[2:4] == ("failed", "aborted"), dev
    assert pevs == [], pevs
    prefill.call("hold", [12, 13])  # the KV becomes ready after the client left
    prefill.call("send", f"a-{mode}", [12, 13])
    (pev,) = prefill.wait_events(1)
    assert pev[2:4] == ("failed", "aborted"), pev
    assert_pools_full(prefill, decode)


def test_abort_by_the_sender_mid_transfer(peers):
    prefill, decode, name, mode = peers
    (decode if mode == "pull" else prefill).call("fault", "stall")
    try:
        prefill.call("hold", [20, 21, 22])
        decode.call("hold", [1, 2, 3])
        decode.call("receive", f"s-{mode}", name, [1, 2, 3])
        prefill.call("send", f"s-{mode}", [20, 21, 22])
        prefill.call("poll"), decode.call("poll"), prefill.call("poll")
        prefill.call("abort", f"s-{mode}")
        (dev,), (pev,) = wait_both(decode, 1, prefill, 1, timeout=5)
    finally:
        prefill.call("fault", None)
        decode.call("fault", None)
    assert pev[2:4] == ("failed", "aborted"), pev
    assert dev[2:4] == ("failed", "aborted"), dev
    assert_pools_full(prefill, decode)


def test_handshake_refused_on_both_sides(peers):
    prefill, _, _, mode = peers
    backend = prefill.spec.backend
    with Peer(backend, mode=mode) as odd:
        before = len(prefill.call("refusals"))
        # a different model shape: the fingerprint field that differs is named on both sides
        odd.call("rebuild", {"num_kv_heads": 4})
        res = odd.call("connect", prefill.call("address"))
        assert res[0] == "refused" and res[1] == "num_kv_heads", res
        assert "num_kv_heads" in res[2]
        assert prefill.call("refusals")[before][0] == "num_kv_heads"
        odd.call("rebuild", {"model_id": "another-model"})
        res = odd.call("connect", prefill.call("address"))
        assert res[:2] == ("refused", "model"), res
        # a wrong or missing shared token gets nothing but the refusal (no metadata)
        for token in ("wrong", ""):
            odd.call("rebuild", {"shared_token": token})
            res = odd.call("connect", prefill.call("address"))
            assert res[:2] == ("refused", "token"), res
            assert prefill.call("refusals")[-1][0] == "token"
        assert_pools_full(odd)


@pytest.fixture(scope="module", params=[(b, m) for b in BACKENDS for m in ("push", "pull")], ids=lambda p: f"{p[0]}-{p[1]}")
def tcp_peers(request):
    """Peers whose messages go over tcp/lo (UCX's shared memory left off), as between two
    hosts: UCX then completes a WRITE or READ only once the other side's transport answered."""
    backend, mode = request.param
    prefill, decode, name = pair(backend, mode, timeout_ms=TIMEOUT_MS, env={"UCX_MM_ERROR_HANDLING": "n"})
    request.addfinalizer(decode.stop)
    request.addfinalizer(prefill.stop)
    yield prefill, decode, name, mode


def _transfer_during_step(peers, hook: bool, rid: str) -> tuple[list, bool]:
    """One transfer while the side whose transport must answer is in a 1 s engine step (the
    decode worker in push, the prefill worker in pull), with or without the mid-step hook
    run between its layers: (events the other side got within 0.6 s, step still running
    then). Checks the data and frees everything after the step."""
    prefill, decode, name, mode = peers
    src, dst = [3, 4, 5], [20, 21, 22]
    prefill.call("hold", src)
    decode.call("hold", dst)
    decode.call("receive", rid, name, dst)
    if mode == "push":  # the decode side computes while the prefill side writes
        busy, other = decode, prefill
    else:  # the prefill side says BlocksReady, then computes while the decode side reads
        busy, other = prefill, decode
        prefill.call("send", rid, src)
    deadline = time.monotonic() + 10
    while not busy.call("peer_may_wait") and time.monotonic() < deadline:
        other.call("poll")  # as an engine loop polls between steps: its message goes out
        time.sleep(0.01)
    assert busy.call("peer_may_wait")
    busy.start("step", 1.0, hook)  # well within the 1.5 s transfer timeout
    try:
        if mode == "push":
            prefill.call("send", rid, src)  # waits up to 100 ms for the decode side's answer
        got = other.call("wait", 1, 0.6, timeout=10)
        in_step = not busy.answered()  # the step has not ended yet
    finally:
        assert busy.result("step", timeout=10) is hook
    bev, oev = wait_both(busy, 1, other, 1 - len(got), timeout=5)
    assert [e[2] for e in bev + oev + got] == ["done", "done"], (bev, oev, got)
    assert prefill.call("digests", src) == decode.call("digests", dst)
    decode.call("free_received", rid)
    assert_pools_full(prefill, decode)
    return got, in_step


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "no-hook"])
def test_a_peer_in_an_engine_step_answers_between_layers(tcp_peers, hook):
    """Messages over tcp (as between hosts): with the mid-step hook run between layers the
    transfer completes while the step still runs; without it, only after the step."""
    got, in_step = _transfer_during_step(tcp_peers, hook, f"step-{tcp_peers[3]}-{hook}")
    if hook:
        assert in_step and [e[2] for e in got] == ["done"], (in_step, got)
    else:
        assert got == [], got  # done only once the peer polls again


def test_on_one_host_a_transfer_completes_while_the_peer_computes(peers):
    """On one host (kvbridge's default: UCX's shared memory carries the messages, with peer
    failure detection) a WRITE or READ completes without the other side's transport: the
    transfer is done while that side is still in its step, without the mid-step hook.
    (The first transfer between two NIXL agents completes their connection, which needs
    both sides: it comes first.)"""
    prefill, decode, name, mode = peers
    (dev,), _ = transfer(prefill, decode, name, f"local-first-{mode}", [0], [0])  # the connection is up
    decode.call("free_received", dev[0])
    got, in_step = _transfer_during_step(peers, False, f"local-step-{mode}")
    assert in_step and [e[2] for e in got] == ["done"], (in_step, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_peer_frees_blocks(backend):
    prefill = Peer(backend, mode="push", seed=1, timeout_ms=60000)
    d1 = Peer(backend, mode="push", seed=2, timeout_ms=60000)
    d2 = Peer(backend, mode="push", seed=3, timeout_ms=60000)
    try:
        addr = prefill.call("address", timeout=60)
        name = d1.call("connect", addr)[1]
        assert d2.call("connect", addr)[0] == "ok"
        # the decode side dies mid-transfer: the prefill side frees its blocks
        prefill.call("fault", "stall")
        prefill.call("hold", [0, 1, 2])
        d1.call("hold", [5, 6, 7])
        d1.call("receive", "k1", name, [5, 6, 7])
        prefill.call("send", "k1", [0, 1, 2])
        wait_both(d1, 1, prefill, 1, timeout=0.5)  # both loops run: the (stalled) write starts
        d1.kill()
        (pev,) = prefill.wait_events(1, timeout=10)
        assert pev[2:4] == ("failed", "peer_dead"), pev
        assert_pools_full(prefill)
        # the prefill side dies while the decode side waits: the decode side frees its blocks
        d2.call("hold", [3, 4])
        d2.call("receive", "k2", name, [3, 4])
        d2.call("poll")
        prefill.kill()
        (dev,) = d2.wait_events(1, timeout=10)
        assert dev[2:4] == ("failed", "peer_dead"), dev
        assert_pools_full(d2)
    finally:
        for p in (prefill, d1, d2):
            p.stop()


def test_uncancellable_transfer_holds_its_blocks_and_breaks_health():
    """A NIXL WRITE that neither completes nor can be released: after the timeout the
    sender keeps its blocks (freeing them could let the op write into reused blocks) and
    reports the transceiver broken (the worker's /health then fails); once the operation
    ends after all, the blocks are freed and the transceiver is healthy again."""
    prefill, decode, name = pair("nixl", "push", timeout_ms=300)
    try:
        prefill.call("fault", "stall_uncancellable")
        prefill.call("hold", [0, 1])
        decode.call("hold", [2, 3])
        decode.call("receive", "u1", name, [2, 3])
        prefill.call("send", "u1", [0, 1])
        (dev,), pevs = wait_both(decode, 1, prefill, 1, timeout=2.0)
        assert dev[2:4] == ("failed", "timeout"), dev
        assert pevs == [], pevs  # the sender cannot end the request: its op is still there
        assert_pools_full(decode)
        prefill.call("wait", 1, 0.8)  # past the timeout again, while ending
        reason = prefill.call("broken")
        assert reason is not None and "cannot cancel" in reason and "u1" in reason, reason
        free, total, pending = prefill.call("pool")
        assert (free, pending) == (total - 2, 1), (free, total, pending)  # blocks 0, 1 still held
        prefill.call("fault", "finish_stalled")
        (pev,) = prefill.wait_events(1, timeout=5)
        assert pev[2] == "failed", pev
        assert prefill.call("broken") is None
        assert_pools_full(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_nixl_refuses_block_ids_outside_the_pool(mode):
    """Both calls check their ids at once, on either path (the side whose op moves the
    blocks prepares them while checking); a refused call leaves nothing pending, and a
    good transfer still goes through afterwards."""
    prefill, decode, name = pair("nixl", mode, timeout_ms=TIMEOUT_MS)
    try:
        for bad in ([-1], [0, 32], [2**40]):
            with pytest.raises(RuntimeError, match="block ids must be in 0..31"):
                decode.call("receive", f"bad-{mode}", name, bad)
            with pytest.raises(RuntimeError, match="block ids must be in 0..31"):
                prefill.call("send", f"bad-{mode}", bad)
        with pytest.raises(RuntimeError, match="no blocks to transfer"):
            prefill.call("send", f"bad-{mode}", [])
        assert prefill.call("pool")[2] == decode.call("pool")[2] == 0  # nothing pending
        (dev,), (pev,) = transfer(prefill, decode, name, f"good-{mode}", [0, 1, 31], [31, 2, 3])
        assert dev[2:4] == pev[2:4] == ("done", None), (dev, pev)
        assert prefill.call("digests", [0, 1, 31]) == decode.call("digests", [31, 2, 3])
        decode.call("free_received", dev[0])
        assert_pools_full(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()
