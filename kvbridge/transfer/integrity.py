"""Runs of blocks, and the checksums of ``verify_checksums: true``.

A run is a stretch of block ids consecutive on *both* sides: adjacent in memory in every
layer on both sides, so one descriptor per layer moves it, and one crc32 covers it. The
sender computes a crc32 per run over the run's span in every layer; the receiver computes
the same over its own blocks once the data landed, and a mismatch fails the transfer.
Joint runs are the same seen from either side, so both sides agree on what each covers.
"""

from __future__ import annotations

import zlib

from kvbridge.engine.kv_cache import KVCache


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Runs consecutive on both sides: [(src_first, dst_first, length), ...]."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


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
