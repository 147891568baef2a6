"""The router: a (decode, prefill) pair of workers for each request.

    route = router.route(prompt_token_ids, exclude={"decode-1"})
    route.decode          the worker that generates (and streams) the answer
    route.prefill         the worker that computes the prompt's KV, or None: the decode
                          worker prefills it itself (``route.local_reason`` says why)

Policies (``cluster.policy``):
    round_robin    in turn
    least_loaded   fewest waiting + running requests (LoadView, from NATS), then most free blocks
    kv_aware       the prefill worker holding the longest cached prefix of the prompt (KVIndex,
                   from NATS), weighed against its load; decode workers by load

Conditional disaggregation: a prompt shorter than ``min_prefill_tokens``, no prefill worker
with the decode worker's KV fingerprint, or every prefill queue deeper than
``max_prefill_queue`` → prefilled on the decode worker. A prefill queue's depth is the larger
of the prefills this router sent there that have not ended (``prefill_started`` /
``prefill_ended``: exact and current) and the waiting requests the worker last reported
(which covers other frontends; a prefill worker admits prompts as running, so its own
``num_waiting`` stays 0 until it is far behind). Workers without a fresh load report count as
idle. Pure logic: the views are passed in, tests hand it fakes.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from kvbridge.cluster.events import KVIndex, LoadView
from kvbridge.cluster.messages import LoadReport, WorkerInfo, WorkerRole
from kvbridge.config import ClusterConfig
from kvbridge.engine.block_pool import prefix_hashes

QUEUE_WEIGHT = 0.5  # kv_aware: one waiting request costs as much as half the prompt uncached
RUN_WEIGHT = 0.1  # ... one running request a tenth


class NoWorkers(RuntimeError):
    """No decode worker is registered (or every one was excluded)."""


class LocalReason(enum.Enum):
    SHORT_PROMPT = "short_prompt"
    PREFILL_BUSY = "prefill_busy"
    NO_PREFILL_WORKER = "no_prefill_worker"
    AGGREGATED = "aggregated"  # the decode worker is a `both` worker


@dataclass(frozen=True)
class Route:
    decode: WorkerInfo
    prefill: WorkerInfo | None
    local_reason: LocalReason | None = None
    cached_blocks: int = 0  # of the worker that prefills (kv_aware)


class Router:
    def __init__(
        self,
        config: ClusterConfig,
        workers: Callable[[], Mapping[str, WorkerInfo]],
        loads: LoadView,
        kv: KVIndex,
        block_size: int,
    ) -> None:
        self.config = config
        self._workers = workers
        self.loads = loads
        self.kv = kv
        self.block_size = block_size
        self._turn = {WorkerRole.PREFILL: 0, WorkerRole.DECODE: 0}
        self._inflight: Counter[str] = Counter()  # prefill worker → prefills sent, not yet ended

    def prefill_started(self, worker_id: str) -> None:
        self._inflight[worker_id] += 1

    def prefill_ended(self, worker_id: str) -> None:
        """The prefill sent there is done: the first token came back, or the attempt ended."""
        self._inflight[worker_id] -= 1
        if self._inflight[worker_id] <= 0:
            del self._inflight[worker_id]

    def queue_depth(self, worker_id: str) -> int:
        r = self.loads.get(worker_id)
        return max(self._inflight[worker_id], r.num_waiting if r is not None else 0)

    def route(self, prompt: Sequence[int], exclude: Collection[str] = ()) -> Route:
        view = [w for _, w in sorted(self._workers().items()) if w.worker_id not in exclude]
        decoders = [w for w in view if w.role.can_decode()]
        if not decoders:
            raise NoWorkers("no decode worker is registered" + (f" (excluded: {', '.join(sorted(exclude))})" if exclude else ""))
        hashes: list[int] | None = None
        if self.config.policy == "kv_aware":
            hashes = prefix_hashes(prompt, self.block_size)
        prefillers = [w for w in view if w.role is WorkerRole.PREFILL]
        why = self._local_reason(len(prompt), prefillers)
        if why is not None:  # the decode worker prefills: its own cache counts
            decode, cached = self._pick(WorkerRole.DECODE, decoders, hashes)
            return Route(decode, None, why, cached)
        decode, _ = self._pick(WorkerRole.DECODE, decoders, None)
        if decode.role is WorkerRole.BOTH:
            _, cached = self._pick(WorkerRole.DECODE, [decode], hashes)
            return Route(decode, None, LocalReason.AGGREGATED, cached)
        ready = [w for w in prefillers if w.kv_fingerprint == decode.kv_fingerprint and not self._busy(w)]
        if not ready:
            same = [w for w in prefillers if w.kv_fingerprint == decode.kv_fingerprint]
            return Route(decode, None, LocalReason.PREFILL_BUSY if same else LocalReason.NO_PREFILL_WORKER)
        prefill, cached = self._pick(WorkerRole.PREFILL, ready, hashes)
        return Route(decode, prefill, None, cached)

    # ------------------------------------------------------------------ parts
    def _local_reason(self, num_tokens: int, prefillers: list[WorkerInfo]) -> LocalReason | None:
        if not prefillers:
            return LocalReason.NO_PREFILL_WORKER
        if num_tokens < self.config.min_prefill_tokens:
            return LocalReason.SHORT_PROMPT
        if all(self._busy(w) for w in prefillers):
            return LocalReason.PREFILL_BUSY
        return None

    def _busy(self, w: WorkerInfo) -> bool:
        return self.queue_depth(w.worker_id) > self.config.max_prefill_queue

    def _pick(self, role: WorkerRole, candidates: list[WorkerInfo], hashes: list[int] | None) -> tuple[WorkerInfo, int]:
        """The best candidate by policy; ties go round robin. Returns it and its cached blocks."""
        policy = self.config.policy
        cached = {w.worker_id: self.kv.longest_prefix(w.worker_id, hashes) for w in candidates} if hashes else {}
        if policy == "round_robin":
            best = candidates
        else:
            if hashes:
                n = max(1, len(hashes))
                key = {w.worker_id: (1 - cached[w.worker_id] / n) + _load_cost(self.loads.get(w.worker_id)) for w in candidates}
            else:
                key = {w.worker_id: _load_key(self.loads.get(w.worker_id)) for w in candidates}
            low = min(key.values())
            best = [w for w in candidates if key[w.worker_id] == low]
        turn = self._turn[WorkerRole.PREFILL if role is WorkerRole.PREFILL else WorkerRole.DECODE]
        self._turn[WorkerRole.PREFILL if role is WorkerRole.PREFILL else WorkerRole.DECODE] = turn + 1
        chosen = best[turn % len(best)]
        return chosen, cached.get(chosen.worker_id, 0)


def _load_cost(r: LoadReport | None) -> float:
    return 0.0 if r is None else QUEUE_WEIGHT * r.num_waiting + RUN_WEIGHT * r.num_running


def _load_key(r: LoadReport | None) -> tuple[int, float]:
    if r is None:
        return (0, -1.0)
    return (r.num_waiting + r.num_running, -r.free_fraction)
