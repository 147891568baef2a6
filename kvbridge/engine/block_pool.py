"""The KV block pool: free list, reference counts, prefix hashes. No torch here.

A block holds the KV of ``block_size`` consecutive tokens of one sequence. A *full* block
can be shared between requests with the same prefix: its hash chains the hash of the
previous block with its own token ids, so equal hashes mean equal prefixes.

Lifetime contract:
  - ``allocate(n)`` hands out n blocks with ref count 1 (fresh, never shared).
  - ``lookup_prefix(tokens)`` hands out the cached full blocks of a prefix, ref count +1.
  - ``free(ids)`` drops one reference per id; at zero a block goes back to the free list.
    A freed block keeps its hash (it can still be hit) until it is handed out again.
  - ``num_free == num_blocks`` means nothing is held: every test ends by checking it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


class NoFreeBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


def block_hash(token_ids: Sequence[int], parent: int | None) -> int:
    """Stable 64-bit hash of a full block, chained on its parent's hash (same in every process)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent if parent is not None else 0).to_bytes(8, "little", signed=False))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of every full block of ``token_ids``."""
    out: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(token_ids[start : start + block_size], parent)
        out.append(parent)
    return out


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its KV computed
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockPool:
    """Free list (LRU order: freed blocks go to the back, allocation takes the front),
    ref counts and the prefix-hash table. ``on_event(stored, removed)`` reports hash
    changes (lists of hashes) for KV-aware routing."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        on_event: Callable[[list[int], list[int]], None] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_event = on_event
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_hashes(self) -> list[int]:
        return list(self._by_hash)

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref count 1). Evicts cached blocks from the LRU end if needed."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids: list[int] = []
        removed: list[int] = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            b = self.blocks[bid]
            if b.hash is not None:
                removed.append(b.hash)
                if self._by_hash.get(b.hash) == bid:
                    del self._by_hash[b.hash]
                b.hash, b.token_ids = None, ()
            b.ref_count = 1
            ids.append(bid)
        if removed and self.on_event:
            self.on_event([], removed)
        return ids

    def lookup_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Take a reference on the cached full blocks that cover a prefix of ``token_ids``
        (at most ``max_tokens`` tokens). Returns their ids, in order."""
        if not self.enable_prefix_caching:
            return []
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        ids: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for start in range(0, limit - bs + 1, bs):
            chunk = tuple(token_ids[start : start + bs])
            h = block_hash(chunk, parent)
            bid = self._by_hash.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            ids.append(bid)
            parent = h
        for bid in ids:
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self._free[bid]
            b.ref_count += 1
        return ids

    def commit_full_block(self, block_id: int, token_ids: Sequence[int], parent: int | None) -> int:
        """Record that ``block_id`` now holds the computed KV of ``token_ids`` (a full block)
        after the prefix whose last hash is ``parent``. Returns the block's hash."""
        b = self.blocks[block_id]
        chunk = tuple(token_ids)
        assert len(chunk) == self.block_size, "only full blocks are hashed"
        h = block_hash(chunk, parent)
        if b.hash == h:
            return h
        b.hash, b.token_ids = h, chunk
        if self.enable_prefix_caching and h not in self._by_hash:
            self._by_hash[h] = block_id
            if self.on_event:
                self.on_event([h], [])
        return h

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per id. Blocks reaching zero return to the free list: cached
        ones to the back (evicted last), others to the front. Both keep ascending id order,
        so the next request gets contiguous runs (one transfer descriptor per run)."""
        released: list[int] = []
        for bid in block_ids:
            b = self.blocks[bid]
            if b.ref_count <= 0:
                raise RuntimeError(f"block {bid} freed twice")
            b.ref_count -= 1
            if b.ref_count == 0:
                released.append(bid)
        released.sort()
        uncached = [bid for bid in released if self.blocks[bid].hash is None or not self.enable_prefix_caching]
        for bid in reversed(uncached):  # not reusable: handed out first
            self.blocks[bid].hash, self.blocks[bid].token_ids = None, ()
            self._free[bid] = None
            self._free.move_to_end(bid, last=False)
        for bid in released:  # cached: kept for hits, evicted last
            if bid not in self._free:
                self._free[bid] = None

    def reset_prefix_cache(self) -> None:
        removed = list(self._by_hash)
        for bid in self._free:
            b = self.blocks[bid]
            b.hash, b.token_ids = None, ()
        self._by_hash = {h: bid for h, bid in self._by_hash.items() if self.blocks[bid].ref_count > 0}
        if self.on_event and removed:
            self.on_event([], [h for h in removed if h not in self._by_hash])
