"""The frontend's engine: the OpenAI API of api.py over a cluster of workers.

``ClusterEngine`` has the face api.py expects of an engine (generate, abort, stats, healthy,
error, model_name, max_model_len, tokenizer) but owns no model: it tokenizes here, asks the
router for a (decode, prefill) pair, POSTs a GenerateRequest to the decode worker and turns
the Delta lines it streams back into ``RequestOutput``s.

Failures:
  - a call to a decode worker fails before anything was streamed (refused, unreachable, 5xx):
    the worker leaves routing at once (``WorkerWatcher.remove``) and the request goes to
    another decode worker; none left → ``EngineDeadError`` (api.py answers 503)
  - the decode worker dies mid-stream: the stream ends with ``finish_reason=ERROR`` and a
    message naming the worker (api.py sends it as an error event); the worker leaves routing
  - the decode worker reports a failed prefill worker: that one leaves routing (the request
    itself was prefilled on the decode worker and completes)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvbridge.cluster.discovery import WorkerWatcher
from kvbridge.cluster.events import EventBus, KVIndex, LoadView
from kvbridge.cluster.messages import WorkerInfo, WorkerRole
from kvbridge.config import Config
from kvbridge.engine.async_engine import EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from kvbridge.engine.tokenizer import Tokenizer
from kvbridge.serving.messages import (
    Delta,
    ErrorKind,
    GenerateRequest,
    PrefillTarget,
    ProtocolError,
    Sampling,
    WorkerError,
    decode,
    encode,
)
from kvbridge.serving.metrics import TTFT_BUCKETS
from kvbridge.serving.router import NoWorkers, Router

log = logging.getLogger("kvbridge.frontend")

TTFT_PARTS = ("queue", "prefill", "transfer", "first_decode")


def model_context_length(model: str) -> int:
    """The model's context length, read from its metadata (no weights loaded)."""
    from kvbridge.engine.model_files import read_spec

    return int(read_spec(model).max_position_embeddings)


@dataclass
class ClusterStats:
    """EngineStats-like totals over the workers' latest load reports (for api.py's /metrics)."""

    num_blocks: int = 0
    num_free_blocks: int = 0
    num_waiting: int = 0
    num_running: int = 0


class _WorkerFailed(Exception):
    pass


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft_part = Histogram(
            "kvbridge_ttft_part_seconds", "Time to first token at the decode worker, split: queue, prefill, "
            "KV transfer, first decode step", ["part"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.routed = Counter("kvbridge_router_requests", "Requests routed to each worker", ["worker", "role"], registry=registry)
        self.prefill_mode = Counter(
            "kvbridge_prefill_mode", "Requests by how their prompt was prefilled", ["mode"], registry=registry
        )
        self.cached_blocks = Counter(
            "kvbridge_router_cached_blocks", "Prompt blocks the chosen prefilling worker had cached (KV-aware routing)",
            registry=registry,
        )
        self.worker_failures = Counter(
            "kvbridge_worker_failures", "Calls to a worker that failed (it left routing)", ["worker"], registry=registry
        )


class ClusterEngine:
    def __init__(
        self, config: Config, *, tokenizer: Any = None, max_model_len: int = 0, watcher: Any = None, bus: Any = None
    ) -> None:
        """``watcher``/``bus``: fakes for tests (default: a WorkerWatcher on etcd, an EventBus on NATS)."""
        self.config = config
        c = config.cluster
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.load(config.engine.model)
        self.model_name = config.engine.model_name
        self.max_model_len = max_model_len or config.engine.max_model_len or model_context_length(config.engine.model)
        self.kv = KVIndex()
        self.loads = LoadView()
        self.watcher = watcher or WorkerWatcher(c.etcd_endpoint, c.namespace, on_remove=self._forget)
        self.bus = bus or EventBus(c.nats, c.namespace, name="kvbridge-frontend")
        self.router = Router(c, lambda: self.watcher.workers, self.loads, self.kv, config.engine.block_size)
        self.http = httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(None, connect=2.0), limits=httpx.Limits(max_connections=None)
        )
        self.metrics: ClusterMetrics | None = None

    # ------------------------------------------------------------------ life cycle
    async def astart(self) -> None:
        await self.watcher.start()
        await self.bus.start()
        await self.bus.subscribe_kv(self.kv.apply)
        await self.bus.subscribe_load(self.loads.apply)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.bus.close()
        await self.watcher.stop()

    def start(self) -> None:
        """api.py's lifespan hook: the caller runs ``astart()`` itself."""

    def shutdown(self) -> None:
        """api.py's lifespan hook: the caller runs ``aclose()`` itself."""

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = ClusterMetrics(registry)

    def _forget(self, worker_id: str) -> None:
        self.kv.remove_worker(worker_id)
        self.loads.remove_worker(worker_id)

    # ------------------------------------------------------------------ engine facts
    @property
    def decoders(self) -> list[WorkerInfo]:
        return self.watcher.by_role(WorkerRole.DECODE)

    @property
    def healthy(self) -> bool:
        return bool(self.decoders)

    @property
    def error(self) -> str | None:
        if self.decoders:
            return None
        return f"no decode worker is registered in etcd at {self.config.cluster.etcd} (namespace {self.config.cluster.namespace})"

    def stats(self) -> ClusterStats:
        s = ClusterStats()
        for r in self.loads.snapshot().values():
            s.num_blocks += r.num_blocks
            s.num_free_blocks += r.num_free_blocks
            s.num_waiting += r.num_waiting
            s.num_running += r.num_running
        return s

    def abort(self, request_id: str) -> None:
        """Closing the generator closes the stream to the decode worker, which aborts there."""

    # ------------------------------------------------------------------ generate
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        tried: set[str] = set()
        while True:
            try:
                route = self.router.route(prompt_token_ids, exclude=tried)
            except NoWorkers as e:
                raise EngineDeadError(str(e)) from None
            self._count(route.decode, "decode")
            if self.metrics is not None:
                self.metrics.cached_blocks.inc(route.cached_blocks)
            target = prefilling = None  # prefilling: the prefill worker, until the first token
            if route.prefill is not None:
                self._count(route.prefill, "prefill")
                p = route.prefill
                target = PrefillTarget(worker_id=p.worker_id, url=p.endpoint, bootstrap=p.transfer_address)
                prefilling = p.worker_id
                self.router.prefill_started(prefilling)
            body = GenerateRequest(
                request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=Sampling.of(params), prefill=target
            )
            worker = route.decode.worker_id
            streamed = False
            try:
                async with self.http.stream(
                    "POST", f"{route.decode.endpoint}/internal/generate", content=encode(body),
                    headers={"content-type": "application/json"},
                ) as r:  # fmt: skip
                    if r.status_code != 200:
                        await self._refused(worker, r)
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        d = decode(line, Delta)
                        if not streamed:
                            self._first(d)
                            if prefilling is not None:
                                self.router.prefill_ended(prefilling)
                                prefilling = None
                        streamed = True
                        yield d.output()
                        if d.finished:
                            return
                    raise _WorkerFailed("its stream ended before the request finished")
            except (httpx.HTTPError, _WorkerFailed, ProtocolError) as e:
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, _WorkerFailed) else str(e)
                self._drop(worker, reason)
                if streamed:
                    message = f"decode worker {worker} failed while streaming this request ({reason})"
                    yield RequestOutput(request_id, [], "", finished=True, finish_reason=FinishReason.ERROR, error=message)
                    return
                tried.add(worker)
            finally:
                if prefilling is not None:  # the attempt ended before its first token
                    self.router.prefill_ended(prefilling)

    async def _refused(self, worker: str, r: httpx.Response) -> None:
        data = await r.aread()
        try:
            err = decode(data, WorkerError)
        except ProtocolError:
            raise _WorkerFailed(f"HTTP {r.status_code}") from None
        if err.kind is ErrorKind.REQUEST and r.status_code == 400:
            raise RequestError(err.message)
        raise _WorkerFailed(f"HTTP {r.status_code}: {err.message}")

    def _first(self, d: Delta) -> None:
        if d.failed_prefill_worker:
            self._drop(d.failed_prefill_worker, "its prefill call failed")
        if self.metrics is None:
            return
        if d.prefill_mode is not None:
            self.metrics.prefill_mode.labels(d.prefill_mode.value).inc()
        if d.timings is not None:
            for part in TTFT_PARTS:
                self.metrics.ttft_part.labels(part).observe(getattr(d.timings, part))

    def _drop(self, worker_id: str, reason: str) -> None:
        if self.watcher.get(worker_id) is not None:
            log.warning("worker %s leaves routing: %s", worker_id, reason)
        self.watcher.remove(worker_id)
        self._forget(worker_id)
        if self.metrics is not None:
            self.metrics.worker_failures.labels(worker_id).inc()

    def _count(self, w: WorkerInfo, role: str) -> None:
        if self.metrics is not None:
            self.metrics.routed.labels(w.worker_id, role).inc()
