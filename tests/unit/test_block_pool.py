from __future__ import annotations

import random

import pytest

from kvbridge.engine.block_pool import BlockPool, NoFreeBlocks, block_hash, prefix_hashes


def test_allocate_and_free_returns_every_block():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free == 0
    assert sorted(a + b) == list(range(8))
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8


def test_double_free_is_an_error():
    pool = BlockPool(2, 4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(ids)
    assert pool.num_free == 2


def test_fresh_allocations_are_contiguous_runs():
    pool = BlockPool(16, 4)
    a = pool.allocate(4)
    assert a == [0, 1, 2, 3]
    pool.free(a)
    b = pool.allocate(6)
    assert b == sorted(b) and b[-1] - b[0] == 5, b
    pool.free(b)
    assert pool.num_free == 16


def test_hash_is_chained_and_stable():
    h1 = block_hash([1, 2, 3, 4], None)
    assert h1 == block_hash((1, 2, 3, 4), None)
    assert block_hash([5, 6, 7, 8], h1) != block_hash([5, 6, 7, 8], None)
    assert prefix_hashes(list(range(10)), 4) == [block_hash([0, 1, 2, 3], None), block_hash([4, 5, 6, 7], h1 := block_hash([0, 1, 2, 3], None))]
    assert h1


def test_prefix_cache_hit_shares_blocks_and_counts_refs():
    pool = BlockPool(8, 4)
    tokens = list(range(10))
    ids = pool.allocate(3)
    parent = None
    for i in range(2):  # two full blocks computed
        parent = pool.commit_full_block(ids[i], tokens[i * 4 : (i + 1) * 4], parent)
    hit = pool.lookup_prefix(tokens)
    assert hit == ids[:2]
    assert pool.blocks[ids[0]].ref_count == 2
    pool.free(ids)
    assert pool.num_free == 8 - 2  # still held by the hit
    pool.free(hit)
    assert pool.num_free == 8
    # freed but cached: still found, and taking it removes it from the free list
    again = pool.lookup_prefix(tokens, max_tokens=7)
    assert again == ids[:1]
    assert pool.num_free == 7
    pool.free(again)
    assert pool.num_free == 8


def test_prefix_mismatch_stops_the_hit():
    pool = BlockPool(4, 2)
    ids = pool.allocate(2)
    h = pool.commit_full_block(ids[0], [1, 2], None)
    pool.commit_full_block(ids[1], [3, 4], h)
    assert pool.lookup_prefix([1, 2, 9, 9]) == [ids[0]]
    pool.free([ids[0]])
    pool.free(ids)
    assert pool.num_free == 4


def test_eviction_of_cached_blocks_reports_events():
    events: list[tuple[list[int], list[int]]] = []
    pool = BlockPool(2, 2, on_event=lambda s, r: events.append((s, r)))
    ids = pool.allocate(2)
    h = pool.commit_full_block(ids[0], [1, 2], None)
    assert events == [([h], [])]
    pool.free(ids)
    pool.allocate(2)  # reuses both: the cached one is evicted
    assert events[-1] == ([], [h])
    assert pool.lookup_prefix([1, 2, 3]) == []


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    ids = pool.allocate(1)
    pool.commit_full_block(ids[0], [1, 2], None)
    assert pool.lookup_prefix([1, 2, 3]) == []
    pool.free(ids)
    assert pool.num_free == 4


def test_random_workload_never_leaks():
    rng = random.Random(0)
    pool = BlockPool(64, 4)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free == 0):
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, min(8, pool.num_free))
            ids = pool.allocate(n)
            toks = [rng.randint(0, 3) for _ in range(4)]
            pool.commit_full_block(ids[0], toks, None)
            held.append(ids + pool.lookup_prefix(toks + [0]))
    for ids in held:
        pool.free(ids)
    assert pool.num_free == 64
    assert all(b.ref_count == 0 for b in pool.blocks)
