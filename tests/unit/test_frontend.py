"""ClusterEngine with fake workers (httpx.MockTransport) and a fake watcher: retries before
anything streamed, the clear error after, refusals, and failed prefill workers leaving routing."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kvbridge.cluster.messages import WorkerInfo, WorkerRole
from kvbridge.config import ClusterConfig, Config
from kvbridge.engine.async_engine import EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from kvbridge.serving.frontend import ClusterEngine
from kvbridge.serving.messages import (
    Delta,
    ErrorKind,
    GenerateRequest,
    PrefillMode,
    WorkerError,
    decode,
    encode,
    encode_line,
)


def info(wid: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, endpoint=f"http://{wid}", model="m", kv_fingerprint="fp", transfer_address=f"{wid}:1")


class FakeWatcher:
    def __init__(self, *workers: WorkerInfo) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.removed: list[str] = []

    def get(self, wid: str) -> WorkerInfo | None:
        return self.workers.get(wid)

    def remove(self, wid: str) -> None:
        self.removed.append(wid)
        self.workers.pop(wid, None)

    def by_role(self, role: WorkerRole) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.role.can_decode()]


def lines(rid: str, n: int, **first) -> list[bytes]:
    out = []
    for i in range(n):
        d = Delta(request_id=rid, token_ids=[10 + i], text=f"t{i}", finished=i == n - 1,
                  finish_reason=FinishReason.LENGTH if i == n - 1 else None, num_output_tokens=i + 1)  # fmt: skip
        if i == 0:
            for k, v in first.items():
                setattr(d, k, v)
        out.append(encode_line(d))
    return out


def engine(handler, *workers: WorkerInfo) -> tuple[ClusterEngine, FakeWatcher]:
    watcher = FakeWatcher(*workers)
    cfg = Config(cluster=ClusterConfig(etcd="http://e:1", nats="nats://n:1", policy="round_robin"))
    ce = ClusterEngine(cfg, tokenizer=object(), max_model_len=100, watcher=watcher, bus=object())
    ce.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ce, watcher


async def collect(ce: ClusterEngine, rid: str = "r1") -> list[RequestOutput]:
    return [o async for o in ce.generate(rid, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))]


P0, D0, D1 = info("prefill-0", WorkerRole.PREFILL), info("decode-0", WorkerRole.DECODE), info("decode-1", WorkerRole.DECODE)


def test_a_dead_decode_worker_is_dropped_and_the_request_retried_elsewhere():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "decode-0":
            raise httpx.ConnectError("connection refused")
        req = decode(request.content, GenerateRequest)
        assert req.prefill is not None and req.prefill.worker_id == "prefill-0"
        return httpx.Response(200, content=b"".join(lines(req.request_id, 3, prefill_mode=PrefillMode.REMOTE)))

    ce, watcher = engine(handler, P0, D0, D1)
    outs = asyncio.run(collect(ce))
    assert seen == ["decode-0", "decode-1"] and watcher.removed == ["decode-0"]
    assert [t for o in outs for t in o.new_token_ids] == [10, 11, 12] and outs[-1].finished
    assert ce.router.queue_depth("prefill-0") == 0  # the failed attempt's prefill ended too


def test_a_prefill_counts_in_its_workers_queue_until_the_first_token():
    depth: list[int] = []

    async def body(rid: str):
        depth.append(ce.router.queue_depth("prefill-0"))  # the decode worker still waits for the prefill
        for line in lines(rid, 2):
            yield line
            depth.append(ce.router.queue_depth("prefill-0"))

    ce, _ = engine(lambda r: httpx.Response(200, content=body(decode(r.content, GenerateRequest).request_id)), P0, D0)
    asyncio.run(collect(ce))
    assert depth[0] == 1 and depth[-1] == 0


def test_death_mid_stream_ends_the_stream_with_a_clear_error():
    async def body():
        yield lines("r1", 3)[0]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    ce, watcher = engine(lambda r: httpx.Response(200, content=body()), D0, D1)
    outs = asyncio.run(collect(ce))
    assert outs[0].new_token_ids == [10]
    last = outs[-1]
    assert last.finished and last.finish_reason is FinishReason.ERROR and "decode worker decode-0 failed" in last.error
    assert watcher.removed == ["decode-0"]


def test_refusals_reach_the_client_and_no_worker_means_unavailable():
    refusal = encode(WorkerError(kind=ErrorKind.REQUEST, message="the prompt is empty"))
    ce, watcher = engine(lambda r: httpx.Response(400, content=refusal), D0)
    with pytest.raises(RequestError, match="the prompt is empty"):
        asyncio.run(collect(ce))
    assert watcher.removed == []  # the request's fault, not the worker's
    busy = encode(WorkerError(kind=ErrorKind.UNAVAILABLE, message="the engine is unavailable"))
    ce, watcher = engine(lambda r: httpx.Response(503, content=busy), D0)
    with pytest.raises(EngineDeadError, match="no decode worker"):
        asyncio.run(collect(ce))
    assert watcher.removed == ["decode-0"] and not ce.healthy and "no decode worker" in ce.error


def test_a_failed_prefill_worker_leaves_routing():
    def handler(request: httpx.Request) -> httpx.Response:
        first = {"prefill_mode": PrefillMode.FALLBACK, "failed_prefill_worker": "prefill-0"}
        return httpx.Response(200, content=b"".join(lines("r1", 2, **first)))

    ce, watcher = engine(handler, P0, D0)
    assert len(asyncio.run(collect(ce))) == 2
    assert watcher.removed == ["prefill-0"]
