"""Scheduler with a fake model: the next token is a function of the sequence so far,
so any scheduling mistake (lost token, wrong order, recompute error) changes outputs."""

from __future__ import annotations

import pytest

from kvbridge.engine.block_pool import BlockPool
from kvbridge.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from kvbridge.engine.scheduler import Scheduler


def fake_next(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000


def make(rid: str, prompt_len: int, max_tokens: int, base: int = 0) -> Request:
    prompt = [(base + i * 7) % 1000 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0))


def run(sched: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> dict[str, list[int]]:
    for r in reqs:
        sched.add(r)
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        batch = sched.schedule()
        assert not batch.empty
        assert batch.total_tokens <= sched.budget
        assert len(batch.requests) <= sched.max_num_seqs
        for r, n in zip(batch.requests, batch.num_new_tokens):
            # every token being computed has a block
            assert len(r.block_ids) * sched.pool.block_size >= r.num_computed_tokens + n
        sampling = [r for i, r in enumerate(batch.requests) if batch.samples(i)]
        sched.advance(batch)
        for r in sampling:
            r.output_token_ids.append(fake_next(r.all_token_ids))
            if r.num_output_tokens >= r.params.max_tokens:
                sched.finish(r, FinishReason.LENGTH)
    return {r.request_id: r.output_token_ids for r in reqs}


def expected(r: Request) -> list[int]:
    toks = list(r.prompt_token_ids)
    out = []
    for _ in range(r.params.max_tokens):
        t = fake_next(toks)
        out.append(t)
        toks.append(t)
    return out


def test_batched_outputs_equal_solo_outputs_and_pool_is_full_again():
    pool = BlockPool(200, 4)
    reqs = [make(f"r{i}", 3 + 5 * i, 10 + i, base=i) for i in range(8)]
    out = run(Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=16), reqs)
    for r in reqs:
        assert out[r.request_id] == expected(r)
        assert r.status == RequestStatus.FINISHED
    assert pool.num_free == pool.num_blocks


def test_chunked_prefill_splits_a_long_prompt():
    pool = BlockPool(100, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=8)
    r = make("long", 30, 3)
    sched.add(r)
    batch = sched.schedule()
    assert batch.num_new_tokens == [8] and not batch.samples(0)
    sched.advance(batch)
    assert r.num_computed_tokens == 8
    run(sched, [])
    assert r.output_token_ids == expected(r)
    assert pool.num_free == pool.num_blocks


def test_preemption_recomputes_and_keeps_outputs_exact():
    pool = BlockPool(12, 4)  # far too small for 4 requests of ~30 tokens at once
    reqs = [make(f"p{i}", 10, 20, base=i * 3) for i in range(4)]
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    out = run(sched, reqs)
    assert sum(r.num_preemptions for r in reqs) > 0
    for r in reqs:
        assert out[r.request_id] == expected(r)
    assert pool.num_free == pool.num_blocks


def test_abort_frees_blocks_at_once():
    pool = BlockPool(50, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make("a", 20, 50), make("b", 9, 50)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.advance(batch)
    assert pool.num_free < pool.num_blocks
    sched.abort("a")
    assert a.status == RequestStatus.FINISHED and a.finish_reason == FinishReason.ABORT
    assert a.block_ids == []
    sched.abort("b")
    assert pool.num_free == pool.num_blocks
    assert not sched.has_work()
    assert sched.abort("missing") is None


def test_prefix_cache_hit_skips_computed_tokens():
    pool = BlockPool(50, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    first = make("first", 18, 2)
    run(sched, [first])
    second = make("second", 18, 2)  # same prompt
    sched.add(second)
    batch = sched.schedule()
    assert second.num_cached_tokens == 16  # four full blocks
    assert batch.num_new_tokens == [2]
    sched.advance(batch)
    run(sched, [])
    # a fully cached prompt still computes its last token
    third = make("third", 16, 2)
    sched.add(third)
    batch = sched.schedule()
    assert third.num_cached_tokens == 12 and batch.num_new_tokens == [4]
    sched.advance(batch)
    run(sched, [])
    assert second.output_token_ids == expected(second)
    assert pool.num_free == pool.num_blocks


def test_max_num_seqs_limits_running():
    pool = BlockPool(100, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(5):
        sched.add(make(f"m{i}", 4, 2))
    batch = sched.schedule()
    assert len(batch.requests) == 2 and sched.num_waiting == 3
    for r in list(sched.running):
        sched.finish(r, FinishReason.ABORT)
    for r in list(sched.waiting):
        sched.finish(r, FinishReason.ABORT)
    assert pool.num_free == pool.num_blocks


def test_duplicate_request_id_is_refused():
    sched = Scheduler(BlockPool(4, 4), 2, 16)
    sched.add(make("x", 2, 1))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make("x", 2, 1))
