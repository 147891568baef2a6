"""Wire messages: one serializer, a version on every message, mismatches named."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from kvbridge.transfer import base
from kvbridge.transfer.handshake import compare
from kvbridge.transfer.integrity import joint_runs, runs, segments


def info(**over) -> base.PeerInfo:
    fields = {"model": "m", "num_layers": "4", "block_size": "16", "num_kv_heads": "2", "head_dim": "64", "dtype": "float16"}
    d = dict(
        protocol_version=base.PROTOCOL_VERSION, backend="nixl/UCX", agent_name="a", agent_metadata=b"x",
        region_bases=[4096], mem_type="DRAM", device_id=0, num_blocks=8, block_bytes=8192, layout="layer_block",
        fingerprint="f", fingerprint_fields=fields, bootstrap="127.0.0.1:1",
    )
    d.update(over)
    return base.PeerInfo(**d)


@pytest.mark.parametrize(
    "msg",
    [
        base.Hello(token="t", info=info()),
        base.Welcome(info=info()),
        base.Refused(field="dtype", reason="r"),
        base.ReceiveRequest(request_id="r", block_runs=[1, 2]),
        base.WriteStarted(request_id="r"),
        base.WriteDone(request_id="r", checksums=[1], block_runs=[3, 1]),
        base.BlocksReady(request_id="r", block_runs=[1, 1], checksums=[]),
        base.ReadDone(request_id="r"),
        base.Abort(request_id="r", cause="timeout"),
        base.AbortAck(request_id="r"),
    ],
)
def test_roundtrip(msg):
    assert base.decode(base.encode(msg)) == msg


def test_version_is_checked():
    raw = msgspec.msgpack.encode({"type": "ReadDone", "v": base.PROTOCOL_VERSION + 1, "request_id": "r"})
    with pytest.raises(base.ProtocolError, match="protocol version"):
        base.decode(raw)
    with pytest.raises(base.ProtocolError):
        base.decode(b"\x00garbage")


def test_compare_names_the_field():
    assert compare(info(), info(agent_name="b", num_blocks=99, region_bases=[1])) is None  # may differ
    ff = dict(info().fingerprint_fields, dtype="bfloat16")
    assert compare(info(), info(fingerprint_fields=ff))[0] == "dtype"
    assert compare(info(), info(protocol_version=99))[0] == "protocol_version"
    assert compare(info(), info(backend="ucx"))[0] == "backend"


def test_runs_must_be_consecutive_on_both_sides():
    assert runs([0, 1, 2, 3], [8, 9, 10, 11]) == [(0, 8, 4)]
    assert runs([0, 1, 2, 5], [8, 9, 3, 4]) == [(0, 8, 2), (2, 3, 1), (5, 4, 1)]
    assert runs([], []) == []
    assert runs([4, 5, 7, 8], [0, 1, 2, 3]) == [(4, 0, 2), (7, 2, 2)]
    with pytest.raises(ValueError):
        runs([0, 1], [0])


def _by_breaks(src, dst):  # a run ends where either side stops counting up by one
    n = len(src)
    ends = [i for i in range(1, n) if src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1]
    starts = [0, *ends]
    return [(src[a], dst[a], b - a) for a, b in zip(starts, [*ends, n], strict=True)]


def _pieces(rng, n, universe):
    """n distinct ids made of a few stretches of consecutive ids, in any order."""
    out, used = [], set()
    while len(out) < n:
        first, k = rng.randrange(universe), rng.randrange(1, n - len(out) + 1)
        piece = [i for i in range(first, first + k) if i not in used]
        out += piece
        used.update(piece)
    return out[:n]


def test_runs_match_their_definition_for_short_and_long_lists():
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randrange(1, 150)  # both sides of integrity._WALK_MAX
        src = sorted(rng.sample(range(300), n)) if rng.random() < 0.5 else rng.sample(range(300), n)
        start = rng.randrange(100)
        dst = list(range(start, start + n)) if rng.random() < 0.4 else rng.sample(range(400), n)
        assert runs(src, dst) == _by_breaks(src, dst)


def test_runs_from_each_side_s_segments_match_their_definition():
    assert segments([]) == [] and joint_runs([], []) == []
    assert segments([7]) == [(0, 7, 1)]
    assert segments(list(range(40, 296))) == [(0, 40, 256)]
    assert segments([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    rng = random.Random(11)
    for _ in range(500):
        n = rng.randrange(1, 300)
        src = _pieces(rng, n, 2000) if rng.random() < 0.7 else rng.sample(range(2000), n)
        dst = _pieces(rng, n, 2000) if rng.random() < 0.7 else rng.sample(range(2000), n)
        seg = segments(src)
        assert [i for p, f, k in seg for i in range(f, f + k)] == src  # they cover the list, in order
        assert all(a[0] + a[2] == b[0] and a[1] + a[2] != b[1] for a, b in zip(seg, seg[1:]))  # maximal
        assert joint_runs(seg, segments(dst)) == _by_breaks(src, dst) == runs(src, dst)


def test_metrics_by_backend_and_cause():
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("kvbridge_kv_transfer_bytes_total", backend="unit", role="receiver")
    base.record("unit", base.TransferEvent("r", base.Role.RECEIVER, base.TransferStatus.DONE, (1,), num_bytes=4096, seconds=0.01))
    base.record("unit", base.TransferEvent("r2", base.Role.SENDER, base.TransferStatus.FAILED, (2,), cause=base.FailureCause.TIMEOUT))
    assert value("kvbridge_kv_transfer_bytes_total", backend="unit", role="receiver") == before + 4096
    assert value("kvbridge_kv_transfer_seconds_count", backend="unit", role="receiver") >= 1
    assert value("kvbridge_kv_transfer_failures_total", backend="unit", role="sender", cause="timeout") >= 1


def test_transfer_time_histogram_is_cumulative_with_bounds_inclusive():
    from prometheus_client import CollectorRegistry, generate_latest

    from kvbridge.transfer.stats import TransferStats

    stats = TransferStats(buckets=(0.001, 0.01))
    reg = CollectorRegistry()
    reg.register(stats)
    for seconds in (0.0005, 0.001, 0.002, 5.0):  # 0.001 is "≤ 0.001": the first bucket
        stats.add("nixl", "sender", 1000, seconds)
    stats.add("ucx", "receiver", 7, 0.5)

    def value(name, **labels):
        return reg.get_sample_value(name, labels)

    assert value("kvbridge_kv_transfer_seconds_bucket", backend="nixl", role="sender", le="0.001") == 2
    assert value("kvbridge_kv_transfer_seconds_bucket", backend="nixl", role="sender", le="0.01") == 3
    assert value("kvbridge_kv_transfer_seconds_bucket", backend="nixl", role="sender", le="+Inf") == 4
    assert value("kvbridge_kv_transfer_seconds_count", backend="nixl", role="sender") == 4
    assert abs(value("kvbridge_kv_transfer_seconds_sum", backend="nixl", role="sender") - 5.0035) < 1e-9
    assert value("kvbridge_kv_transfer_bytes_total", backend="nixl", role="sender") == 4000
    assert value("kvbridge_kv_transfer_bytes_total", backend="ucx", role="receiver") == 7
    text = generate_latest(reg).decode()
    assert "# TYPE kvbridge_kv_transfer_seconds histogram" in text and "# TYPE kvbridge_kv_transfer_bytes_total counter" in text


def test_nixl_indices_are_every_layer_s_ids_or_none_outside_the_pool():
    from kvbridge.transfer.nixl_index import block_indices, index_grid

    layers, nb = 3, 64
    grid = index_grid(layers, nb)
    assert grid.dtype == np.int32 and grid.shape == (layers, nb)
    rng = random.Random(5)
    for _ in range(400):
        n = rng.randrange(1, 40)
        if rng.random() < 0.5:  # one run (the slice of the grid) or scattered ids
            start = rng.randrange(-3, nb)
            ids = list(range(start, start + n))
        else:
            ids = rng.sample(range(-2, nb + 3), n)
        got = block_indices(grid, ids)
        if all(0 <= i < nb for i in ids):
            assert got is not None and got.dtype == np.int32
            assert got.tolist() == [layer * nb + i for layer in range(layers) for i in ids]
        else:
            assert got is None, ids
    assert block_indices(grid, []) is None
    assert block_indices(grid, [1, None]) is None and block_indices(grid, [2**40]) is None


def test_packed_block_ids_round_trip_and_malformed_ones_are_refused():
    """Block ids travel packed as (first, count) pairs of their stretches: a contiguous list
    is two numbers; any list comes back as it went; a malformed one is a ValueError."""
    from kvbridge.transfer.integrity import pack_ids, unpack_ids

    rng = random.Random(11)
    for _ in range(300):
        n = rng.randrange(1, 60)
        if rng.random() < 0.4:
            start = rng.randrange(0, 100)
            ids = list(range(start, start + n))
            assert pack_ids(ids) == [start, n]
        else:  # scattered, with stretches here and there, in any order
            ids = []
            while len(ids) < n:
                s = rng.randrange(0, 200)
                ids += range(s, s + rng.randrange(1, 6))
        packed = pack_ids(ids)
        assert len(packed) % 2 == 0 and all(k >= 1 for k in packed[1::2])
        assert unpack_ids(packed, len(ids)) == ids
    assert pack_ids([]) == [] and unpack_ids([], 8) == []
    for bad in ([1], [3, 0], [-1, 2], [0, 5, 9]):
        with pytest.raises(ValueError):
            unpack_ids(bad, 8)
    with pytest.raises(ValueError, match="past 8 ids"):  # more ids than the peer's pool has
        unpack_ids([0, 2**40], 8)


def test_is_stretch_matches_its_definition():
    """Consecutive ids are recognised by a slice of a kept list of naturals: the answer is
    the definition's, for negative, huge and growing first ids and for any part of a list."""
    from kvbridge.transfer import integrity

    rng = random.Random(13)
    for _ in range(500):
        first = rng.choice([rng.randrange(-5, 50), rng.randrange(0, 5000), 2**40])
        ids = list(range(first, first + rng.randrange(1, 40)))
        if rng.random() < 0.5:
            ids[rng.randrange(len(ids))] += rng.choice([-1, 1, 7])
        lo = rng.randrange(len(ids))
        hi = rng.randrange(lo + 1, len(ids) + 1)
        want = all(ids[k + 1] == ids[k] + 1 for k in range(lo, hi - 1))
        assert integrity.is_stretch(ids, lo, hi) == want, (ids, lo, hi)
    assert len(integrity._NATURALS) <= integrity._NATURALS_MAX


def test_packed_ids_are_in_the_pool_exactly_when_every_id_is():
    """A pull sender checks its ids from their packing (a stretch's ends say it): the
    answer is the one a check of every id gives."""
    from kvbridge.transfer.integrity import pack_ids, packed_in_pool

    rng = random.Random(12)
    for _ in range(300):
        ids = [rng.randrange(-3, 40) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.5:
            s = rng.randrange(-2, 36)
            ids = list(range(s, s + rng.randrange(1, 8)))
        assert packed_in_pool(pack_ids(ids), 32) == all(0 <= i < 32 for i in ids), ids
    assert packed_in_pool(pack_ids(list(range(32))), 32) and not packed_in_pool([0, 33], 32)


def test_nixl_prepares_packed_ids_as_their_indices():
    """The NIXL side turns one packed stretch into its slice of the index grid: the same
    indices as from the ids, and None past the pool."""
    from types import SimpleNamespace

    from kvbridge.transfer.integrity import pack_ids
    from kvbridge.transfer.nixl import NixlTransceiver
    from kvbridge.transfer.nixl_index import block_indices, index_grid

    grid = index_grid(3, 64)
    t = SimpleNamespace(_grid=grid, _peers={"p": SimpleNamespace(grid=index_grid(3, 16))})
    prepare = NixlTransceiver._prepare
    for ids in ([5, 6, 7], list(range(64)), [63], [1, 2, 9, 10]):
        assert prepare(t, ids, None, pack_ids(ids)).tolist() == block_indices(grid, ids).tolist()
    assert prepare(t, [10, 11], "p", [10, 2]).tolist() == [10, 11, 26, 27, 42, 43]
    assert prepare(t, list(range(10, 20)), "p", [10, 10]) is None  # past the peer's 16 blocks
    assert prepare(t, [1], "gone", [1, 1]) is None
