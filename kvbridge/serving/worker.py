"""A worker: one engine, its transceiver and connector, an HTTP endpoint, a place in the cluster.

    kvbridge worker --role prefill|decode|both --config engine.yaml [--etcd URL --nats URL]

Routes (bodies are serving/messages.py Structs):
    POST /internal/generate   decode, both: GenerateRequest → NDJSON stream of Delta
    POST /internal/prefill    prefill, both: PrefillRequest → PrefillResponse
    GET  /internal/stats      WorkerStats (the pool, the queues)
    GET  /health              503 while the engine or the transceiver is broken
    GET  /metrics             Prometheus
    /v1/...                   role both: the OpenAI API of kvbridge/serving/api.py

One request, disaggregated, as the decode worker runs it:
    1) on the engine thread: connect to the prefill peer, reserve blocks, ``receive``
       (``KVConnector.start_remote``); not possible → queue a local prefill instead
    2) meanwhile POST /internal/prefill to the prefill worker; its answer brings the first token
       → ``connector.first_token``; any failure → ``connector.prefill_failed`` (local prefill)
    3) stream the engine's outputs back as Delta lines; the first carries how the prompt was
       prefilled and the TTFT split
In the cluster the worker registers a ``WorkerInfo`` in etcd under a lease and publishes its KV
events and load to NATS; etcd or NATS being unreachable never stops it from serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import REGISTRY, generate_latest

from kvbridge.cluster.messages import LoadReport, WorkerInfo, WorkerRole
from kvbridge.config import Config, ConfigError
from kvbridge.engine.async_engine import AsyncEngine, EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput
from kvbridge.serving.api import _ClientGone, build_app, until_disconnect
from kvbridge.serving.messages import (
    Delta,
    ErrorKind,
    GenerateRequest,
    PrefillMode,
    PrefillRequest,
    PrefillResponse,
    PrefillTarget,
    ProtocolError,
    Timings,
    WorkerError,
    WorkerStats,
    decode,
    encode,
    encode_line,
)
from kvbridge.serving.metrics import Metrics
from kvbridge.transfer.base import TransferError

log = logging.getLogger("kvbridge.worker")

NDJSON = "application/x-ndjson"


def error(status: int, kind: ErrorKind, message: str) -> Response:
    return Response(encode(WorkerError(kind=kind, message=message)), status_code=status, media_type="application/json")


def advertised_host(host: str) -> str:
    """The address peers use to reach a worker bound to ``host`` (a wildcard bind advertises
    the machine's address)."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(socket.gethostname())
    return host


@dataclass
class _First:
    """What the first Delta of a request reports (filled on the way)."""

    arrival: float
    added: float = 0.0  # the engine thread queued it (perf_counter)
    mode: PrefillMode = PrefillMode.LOCAL
    failed_worker: str | None = None
    answer: PrefillResponse | None = None


class Worker:
    def __init__(self, config: Config, role: WorkerRole, worker_id: str, host: str = "127.0.0.1") -> None:
        from kvbridge.engine.engine import LLMEngine
        from kvbridge.transfer.connector import KVConnector
        from kvbridge.transfer.select import create_transceiver, resolve_backend

        self.config, self.role, self.worker_id = config, role, worker_id
        tc = config.cache_transceiver_config
        if role is not WorkerRole.BOTH and not tc.enabled:
            raise ConfigError(
                f"a {role.value} worker moves KV: set cache_transceiver_config.backend (DEFAULT, NIXL or UCX) in its config"
            )
        resolve_backend(tc)  # a backend that cannot load here fails before the model loads
        self.engine = LLMEngine(config.engine)
        self.transceiver = create_transceiver(tc, self.engine.kv_cache, model_id=self.engine.spec.name, host=host, name=worker_id)
        self.connector = KVConnector(self.engine, self.transceiver) if self.transceiver is not None else None
        self.ae = AsyncEngine(self.engine, self.connector)
        self.fingerprint = self.engine.layout.fingerprint(self.engine.spec.name)
        self.http = httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(config.cluster.prefill_timeout_s, connect=2.0),
            limits=httpx.Limits(max_connections=None),
        )  # fmt: skip
        self.metrics = Metrics()
        self.app = self._build_app()

    # ------------------------------------------------------------------ facts
    @property
    def bootstrap_address(self) -> str:
        if self.transceiver is None:
            return ""
        host, _, port = self.transceiver.bootstrap_address.rpartition(":")
        return f"{advertised_host(host)}:{port}"

    def info(self, endpoint: str) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, endpoint=endpoint, model=self.engine.model_name,
            kv_fingerprint=self.fingerprint, transfer_address=self.bootstrap_address,
        )  # fmt: skip

    def load_report(self) -> LoadReport:
        s = self.ae.stats()
        return LoadReport(
            worker_id=self.worker_id, num_waiting=s.num_waiting, num_running=s.num_running + s.num_remote,
            num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks,
        )  # fmt: skip

    def stats(self) -> WorkerStats:
        s = self.ae.stats()
        return WorkerStats(
            worker_id=self.worker_id, role=self.role.value, num_blocks=s.num_blocks, num_free_blocks=s.num_free_blocks,
            num_waiting=s.num_waiting, num_running=s.num_running, num_remote=s.num_remote, num_held=s.num_held,
            transfers_busy=bool(self.connector and self.connector.busy),
        )  # fmt: skip

    @property
    def broken(self) -> str | None:
        if not self.ae.healthy:
            return f"the engine is unavailable: {self.ae.error}"
        if self.transceiver is not None and not self.transceiver.healthy:
            return f"the KV transceiver is broken: {self.transceiver.broken_reason}"
        return None

    # ------------------------------------------------------------------ decode side
    async def generate(self, raw: Request) -> Response:
        try:
            req = decode(await raw.body(), GenerateRequest)
            params = req.sampling.params()
        except (ProtocolError, RequestError) as e:
            return error(400, ErrorKind.REQUEST, str(e))
        if (why := self.broken) is not None:
            return error(503, ErrorKind.UNAVAILABLE, why)
        rid, prompt, target = req.request_id, req.prompt_token_ids, req.prefill
        if self.connector is None or (target is not None and target.worker_id == self.worker_id):
            target = None  # no transceiver here, or asked to prefill on ourselves: local
        loop = asyncio.get_running_loop()
        first = _First(arrival=time.perf_counter())
        remote = loop.create_future()  # engine thread → loop: a remote prefill was started

        def submit() -> None:  # on the engine thread
            first.added = time.perf_counter()
            ok = False
            if target is not None:
                try:
                    self.transceiver.connect(target.bootstrap, timeout_s=5.0)  # type: ignore[union-attr]
                    ok = self.connector.start_remote(rid, prompt, params, target.bootstrap)  # type: ignore[union-attr]
                except TransferError as e:
                    log.warning("prefill worker %s at %s: %s; prefilling %s here", target.worker_id, target.bootstrap, e, rid)
                    first.failed_worker = target.worker_id
                if not ok:
                    first.mode = PrefillMode.FALLBACK
            if not ok:
                self.engine.add_request(rid, prompt, params)
            loop.call_soon_threadsafe(_settle, remote, ok)

        gen = self.ae.generate(rid, prompt, params, submit=submit)
        caller = asyncio.ensure_future(self._call_prefill(rid, req, target, first, remote)) if target else None
        try:
            out = await until_disconnect(raw, gen.__anext__())
        except BaseException as e:
            if caller is not None:
                caller.cancel()
            await gen.aclose()
            if isinstance(e, RequestError):
                return error(400, ErrorKind.REQUEST, str(e))
            if isinstance(e, EngineDeadError):
                return error(503, ErrorKind.UNAVAILABLE, f"the engine is unavailable: {e}")
            if isinstance(e, _ClientGone):
                return Response(status_code=499)
            raise
        head = Delta.of(out, prefill_mode=first.mode, failed_prefill_worker=first.failed_worker, timings=self._timings(rid, first))

        async def body():
            try:
                yield encode_line(head)
                if not out.finished:
                    async for o in gen:
                        yield encode_line(Delta.of(o))
            finally:
                if caller is not None:
                    caller.cancel()
                await gen.aclose()

        return StreamingResponse(body(), media_type=NDJSON)

    async def _call_prefill(self, rid: str, req: GenerateRequest, target: PrefillTarget, first: _First, remote: asyncio.Future) -> None:
        if not await remote:
            return
        body = encode(PrefillRequest(request_id=rid, prompt_token_ids=req.prompt_token_ids, sampling=req.sampling))
        try:
            r = await self.http.post(f"{target.url}/internal/prefill", content=body, headers={"content-type": "application/json"})
            if r.status_code != 200:
                try:
                    err = decode(r.content, WorkerError)
                    reason, blame = f"HTTP {r.status_code}: {err.message}", err.kind is ErrorKind.UNAVAILABLE
                except ProtocolError:
                    reason, blame = f"HTTP {r.status_code}", True
                raise _PrefillFailed(reason, blame)
            answer = decode(r.content, PrefillResponse)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure: prefill here
            blame = e.blame if isinstance(e, _PrefillFailed) else True
            reason = str(e) if isinstance(e, _PrefillFailed) else f"{type(e).__name__}: {e}"
            log.warning("prefill call for %s to %s (%s) failed: %s", rid, target.worker_id, target.url, reason)
            first.mode = PrefillMode.FALLBACK
            if blame:
                first.failed_worker = target.worker_id
            await self._on_engine(lambda: self.connector.prefill_failed(rid, reason))  # type: ignore[union-attr]
            return
        first.answer, first.mode = answer, PrefillMode.REMOTE
        await self._on_engine(lambda: self.connector.first_token(rid, answer.first_token, answer.logprob))  # type: ignore[union-attr]

    async def _on_engine(self, fn: Any) -> None:
        try:
            await self.ae.call(fn)
        except EngineDeadError:
            pass  # the stream ends with the engine's error

    def _timings(self, rid: str, first: _First) -> Timings:
        now = time.perf_counter()
        queue = max(0.0, first.added - first.arrival)
        in_engine = max(0.0, now - first.added)
        transfer = self.connector.transfer_seconds.pop(rid, None) if self.connector is not None else None
        if first.mode is PrefillMode.REMOTE and transfer is None:
            first.mode = PrefillMode.FALLBACK  # answered, but the KV never arrived: prefilled here
        if first.mode is not PrefillMode.REMOTE or first.answer is None:
            return Timings(queue=queue, prefill=in_engine)
        a = first.answer
        rest = max(0.0, in_engine - a.queue_seconds - a.seconds - transfer)
        return Timings(queue=queue + a.queue_seconds, prefill=a.seconds, transfer=transfer, first_decode=rest)

    # ------------------------------------------------------------------ prefill side
    async def prefill(self, raw: Request) -> Response:
        try:
            req = decode(await raw.body(), PrefillRequest)
            params = req.sampling.params(max_tokens=1, stop=[], stop_token_ids=[])
        except (ProtocolError, RequestError) as e:
            return error(400, ErrorKind.REQUEST, str(e))
        if self.connector is None:
            return error(503, ErrorKind.UNAVAILABLE, f"worker {self.worker_id} has no KV transceiver")
        if (why := self.broken) is not None:
            return error(503, ErrorKind.UNAVAILABLE, why)
        arrival, added = time.perf_counter(), [0.0]

        def submit() -> None:
            added[0] = time.perf_counter()
            self.engine.add_request(req.request_id, req.prompt_token_ids, params, hold_kv=True)

        last: RequestOutput | None = None
        try:
            async for out in self.ae.generate(req.request_id, req.prompt_token_ids, params, hold_kv=True, submit=submit):
                last = out
        except RequestError as e:
            return error(400, ErrorKind.REQUEST, str(e))
        except EngineDeadError as e:
            return error(503, ErrorKind.UNAVAILABLE, f"the engine is unavailable: {e}")
        if last is None or last.finish_reason is FinishReason.ERROR or not last.new_token_ids:
            return error(503, ErrorKind.UNAVAILABLE, f"prefill failed: {last.error if last else 'no output'}")
        answer = PrefillResponse(
            first_token=last.new_token_ids[0], logprob=(last.new_logprobs or [None])[0],
            num_cached_tokens=last.num_cached_tokens, queue_seconds=added[0] - arrival,
            seconds=time.perf_counter() - added[0],
        )  # fmt: skip
        return Response(encode(answer), media_type="application/json")

    # ------------------------------------------------------------------ the app
    def _build_app(self) -> FastAPI:
        app = FastAPI(title=f"kvbridge worker {self.worker_id}", docs_url=None, redoc_url=None)
        api = build_app(self.ae, self.config) if self.role is WorkerRole.BOTH else None
        metrics = api.state.metrics if api is not None else self.metrics
        if self.role.can_decode():
            app.add_api_route("/internal/generate", self.generate, methods=["POST"])
        if self.role.can_prefill():
            app.add_api_route("/internal/prefill", self.prefill, methods=["POST"])

        @app.get("/internal/stats")
        async def stats() -> Response:
            return Response(encode(self.stats()), media_type="application/json")

        @app.get("/health")
        async def health() -> Response:
            why = self.broken
            body = {"status": "ok" if why is None else "unhealthy", "worker_id": self.worker_id, "role": self.role.value}
            if why is not None:
                body["error"] = why
            return Response(json.dumps(body), status_code=200 if why is None else 503, media_type="application/json")

        @app.get("/metrics")
        async def prometheus() -> Response:
            metrics.update_engine(self.ae.stats(), self.broken is None)
            own, content_type = metrics.render()
            return Response(generate_latest(REGISTRY) + own, media_type=content_type)

        if api is not None:
            app.mount("/", api)  # the OpenAI routes (their lifespan is ours: the engine is started by serve())
        return app

    # ------------------------------------------------------------------ life cycle
    async def close(self) -> None:
        if self.connector is not None and self.ae.healthy:
            try:
                await asyncio.wait_for(self.ae.call(self.connector.close), 5.0)
            except Exception as e:  # noqa: BLE001 - closing anyway
                log.warning("closing the connector: %s", e)
        await asyncio.to_thread(self.ae.shutdown)
        if self.transceiver is not None:
            self.transceiver.close()
        await self.http.aclose()


class _PrefillFailed(Exception):
    def __init__(self, reason: str, blame: bool) -> None:
        super().__init__(reason)
        self.blame = blame


def _settle(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)
