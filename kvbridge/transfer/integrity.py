"""Runs of blocks, and the checksums of ``verify_checksums: true``.

A run is a stretch of block ids consecutive on *both* sides: adjacent in memory in every
layer on both sides, so one descriptor per layer moves it, and one crc32 covers it. The
sender computes a crc32 per run over the run's span in every layer; the receiver computes
the same over its own blocks once the data landed, and a mismatch fails the transfer.
Joint runs are the same seen from either side, so both sides agree on what each covers.
"""

from __future__ import annotations

import zlib

import numpy as np

from kvbridge.engine.kv_cache import KVCache

_WALK_MAX = 64  # ids: up to this many, walking the pairs beats numpy's fixed cost
_WALK_SLICE = 16  # segments(): a broken slice this short is walked rather than halved


# 0, 1, 2, ...: ``is_stretch`` compares ids with a slice of it (grown on demand, up to a pool
# of _NATURALS_MAX blocks)
_NATURALS: list[int] = []
_NATURALS_MAX = 1 << 20


def stretch(first: int, n: int) -> list[int]:
    """[first, first + 1, ..., first + n - 1]: a slice of a list of the naturals kept for
    this, rather than a new ``list(range(...))``: making 256 ints anew costs ~4 µs, more with
    caches cold after a copy; the slice under 1 µs."""
    end = first + n
    if 0 <= first and end <= _NATURALS_MAX:
        if end > len(_NATURALS):
            _NATURALS.extend(range(len(_NATURALS), min(_NATURALS_MAX, max(end, 2 * len(_NATURALS), 1024))))
        return _NATURALS[first:end]
    return list(range(first, end))


def is_stretch(ids: list[int], lo: int, hi: int) -> bool:
    """Whether ``ids[lo:hi]`` are consecutive: first, first + 1, ... (~3 µs for 256 ids
    against ~6 with a new range list)."""
    return (ids if lo == 0 and hi == len(ids) else ids[lo:hi]) == stretch(ids[lo], hi - lo)


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Runs consecutive on both sides: [(src_first, dst_first, length), ...], in order.
    It is on a transfer's critical path, right after a copy that left the caches cold:
    there a Python walk costs ~0.3 µs per id (a 16 MiB transfer has 256) and numpy's ten
    calls ~80 µs in all, so short lists are walked and long ones go to numpy."""
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"runs: {n} source ids, {len(dst)} destination ids")
    if n <= _WALK_MAX:
        out: list[tuple[int, int, int]] = []
        for s_id, d_id in zip(src, dst, strict=True):
            if out and out[-1][0] + out[-1][2] == s_id and out[-1][1] + out[-1][2] == d_id:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((s_id, d_id, 1))
        return out
    s, d = np.fromiter(src, np.int64, n), np.fromiter(dst, np.int64, n)
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [n])))
    return list(zip(s[starts].tolist(), d[starts].tolist(), lengths.tolist(), strict=True))


def segments(ids: list[int], limit: int | None = None) -> list[tuple[int, int, int]] | None:
    """The stretches of consecutive ids of one list: [(position, first_id, length), ...].
    A stretch is recognised by comparing a slice with the range it should be (C speed), and
    a slice that is not one stretch is halved, down to a few ids that are walked: a list
    with k stretches costs O(k log n) comparisons, a contiguous one a single one. A side
    computes its own when the ids reach it (``joint_runs`` then needs no pass over the
    ids). None once there are more than ``limit`` stretches (``runs`` is cheaper then)."""
    out: list[tuple[int, int, int]] = []

    def add(lo: int, first: int, n: int) -> None:
        if out and out[-1][0] + out[-1][2] == lo and out[-1][1] + out[-1][2] == first:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)  # halved inside a stretch
        else:
            out.append((lo, first, n))

    todo = [(0, len(ids))] if ids else []
    while todo:
        if limit is not None and len(out) > limit:
            return None
        lo, hi = todo.pop()
        first = ids[lo]
        if is_stretch(ids, lo, hi):
            add(lo, first, hi - lo)
        elif hi - lo <= _WALK_SLICE:  # short and broken: walk it
            for k in range(lo, hi):
                add(k, ids[k], 1)
        else:
            mid = (lo + hi) // 2
            todo += ((mid, hi), (lo, mid))  # the left half first: ``out`` stays in order
    return out


def pack_ids(ids: list[int]) -> list[int]:
    """Block ids as they travel in messages: [first, count, first, count, ...], one pair
    per stretch of consecutive ids. A contiguous list is two numbers, which the peer
    decodes and turns into descriptors without a pass over its ids (on the transfer's
    critical path, with cold caches: ~30 µs saved for 256 ids)."""
    return [v for _, first, n in segments(ids) or () for v in (first, n)]


def packed_in_pool(packed: list[int], num_blocks: int) -> bool:
    """Whether every id of ``pack_ids``' output is a block of a pool of ``num_blocks``: a
    stretch's ends say it, so a contiguous list is one check, not a pass over its ids."""
    return all(packed[i] >= 0 and packed[i] + packed[i + 1] <= num_blocks for i in range(0, len(packed), 2))


def unpack_ids(packed: list[int], limit: int) -> list[int]:
    """The ids of ``pack_ids``. ValueError for a malformed list: an odd length, a stretch
    that is empty or starts below 0, or more than ``limit`` ids in all (a peer's pool
    size: a request cannot hold more of its blocks). Ids past the pool's end are left to
    the checks of the descriptors (a clear transfer error)."""
    if len(packed) % 2:
        raise ValueError(f"packed block ids of odd length {len(packed)}")
    out: list[int] = []
    for i in range(0, len(packed), 2):
        first, n = packed[i], packed[i + 1]
        if first < 0 or n < 1 or len(out) + n > limit:
            raise ValueError(f"packed block ids: stretch ({first}, {n}) is empty, negative or past {limit} ids")
        out += stretch(first, n)
    return out


def joint_runs(a: list[tuple[int, int, int]], b: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``runs(src, dst)`` from ``segments(src)`` and ``segments(dst)`` (lists of one length):
    a joint run ends wherever either side's stretch ends."""
    out: list[tuple[int, int, int]] = []
    i = j = pos = 0
    while i < len(a) and j < len(b):
        pa, fa, na = a[i]
        pb, fb, nb = b[j]
        end = min(pa + na, pb + nb)
        out.append((fa + pos - pa, fb + pos - pb, end - pos))
        pos = end
        i += pa + na == end
        j += pb + nb == end
    return out


def runs_in_range(spans: list[tuple[int, int, int]], src_blocks: int, dst_blocks: int) -> bool:
    """Whether every id of ``spans`` is a block of its side (a run is consecutive ids, so
    its ends say it)."""
    return all(s >= 0 and d >= 0 and s + n <= src_blocks and d + n <= dst_blocks for s, d, n in spans)


class RunChecksums:
    """crc32 per joint run of one KV cache's blocks (CUDA: read to the host first)."""

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        self._bytes_np = kv.as_bytes().numpy() if not kv.is_cuda else None

    def __call__(self, local: list[int], remote: list[int]) -> list[int]:
        lay = self.kv.layout
        out = []
        for s, _, n in runs(local, remote):
            crc = 0
            for layer in range(lay.num_layers):
                crc = zlib.crc32(self._span(lay.offset(layer, s), n * lay.block_bytes), crc)
            out.append(crc)
        return out

    def _span(self, off: int, n: int) -> memoryview | bytes:
        if self._bytes_np is not None:
            return memoryview(self._bytes_np[off : off + n])
        return self.kv.as_bytes()[off : off + n].cpu().numpy().tobytes()
