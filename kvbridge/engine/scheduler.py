"""Continuous batching under a token budget. No phases: each request has
``num_computed_tokens`` and ``num_tokens``; a step gives each request some of the gap.

Per step:
  1) running requests first, in arrival order: one token each when decoding, a chunk
     when their prompt is not done (chunked prefill); a request that cannot get a block
     preempts the newest running request (its blocks are freed, it is recomputed later).
  2) waiting requests, oldest first, while budget, ``max_num_seqs`` and blocks allow;
     their prompt's cached prefix (full blocks) counts as already computed.
Blocks held by a request are freed the moment it finishes or is aborted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvbridge.engine.block_pool import BlockPool, NoFreeBlocks
from kvbridge.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Does request i reach its last token this step (so a token is sampled)?"""
        r = self.requests[i]
        return r.num_computed_tokens + self.num_new_tokens[i] == r.num_tokens


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ------------------------------------------------------------------ intake
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_remote(self) -> int:
        return sum(r.status == RequestStatus.WAITING_FOR_REMOTE_KV for r in self.requests.values())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.budget
        preempted = False

        # 1) running
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                batch.num_preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # preempted itself: nothing after it fits either
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        # 2) waiting
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if not req.block_ids:  # take the cached prefix (leave at least one token to compute)
                req.block_ids = self.pool.lookup_prefix(req.all_token_ids, max_tokens=req.num_tokens - 1)
                req.num_computed_tokens = len(req.block_ids) * self.pool.block_size
                req.num_committed_blocks = len(req.block_ids)
                req.last_block_hash = self.pool.blocks[req.block_ids[-1]].hash if req.block_ids else None
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                self._release(req)  # give back the prefix hits too; retry next step
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure ``req`` has blocks for ``num_tokens`` tokens; False if the pool is dry."""
        need = self.pool.blocks_needed(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        try:
            req.block_ids.extend(self.pool.allocate(need))
        except NoFreeBlocks:
            return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_committed_blocks = 0
        req.last_block_hash = None

    # ------------------------------------------------------------------ after the step
    def advance(self, batch: ScheduledBatch) -> None:
        """The model computed the scheduled tokens: move counters, hash new full blocks."""
        bs = self.pool.block_size
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            full = req.num_computed_tokens // bs
            tokens = req.all_token_ids
            for b in range(req.num_committed_blocks, full):
                req.last_block_hash = self.pool.commit_full_block(
                    req.block_ids[b], tokens[b * bs : (b + 1) * bs], req.last_block_hash
                )
            req.num_committed_blocks = max(req.num_committed_blocks, full)

    # ------------------------------------------------------------------ KV computed elsewhere
    def add_remote(self, req: Request) -> bool:
        """Decode side: reserve blocks for the prompt, whose KV a peer will write. The request
        waits (outside the queues) until ``remote_done`` or ``remote_failed``."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        try:
            req.block_ids = self.pool.allocate(self.pool.blocks_needed(req.num_prompt_tokens))
        except NoFreeBlocks:
            return False
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[req.request_id] = req
        return True

    def remote_done(self, req: Request) -> None:
        """The prompt's KV arrived: it counts as computed; the request queues for decoding."""
        req.num_computed_tokens = req.num_prompt_tokens
        req.num_committed_blocks = 0
        self.advance(ScheduledBatch([req], [0]))  # hash the full blocks for prefix hits
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def remote_failed(self, req: Request) -> None:
        """The KV did not arrive: drop the reservation; the prompt is computed here instead."""
        self._release(req)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: FinishReason, free: bool = True) -> None:
        """Finish (or abort) a request: its blocks are freed at once (unless ``free`` is
        False: then the caller owns ``req.block_ids`` and must free them)."""
        if req.status == RequestStatus.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if free:
            self._release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, FinishReason.ABORT)
        return req
