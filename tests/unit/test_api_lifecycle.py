"""The OpenAI-compatible server and AsyncEngine on a fake engine: concurrency, models, metrics,
engine failure and health, aborts, shutdown, and client disconnects on a real server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from kvbridge.config import Config, ServerConfig
from kvbridge.engine.async_engine import AsyncEngine, EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, SamplingParams
from kvbridge.serving.api import build_app
from tests.fake_engine import (
    MAX_MODEL_LEN,
    MODEL,
    REPLY,
    assert_error,
    chat_body,
    pool_full,
    prompt_len,
    sse_events,
    wait_until,
)

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- concurrency, models, metrics, health


async def test_concurrent_requests(client, fake):
    bodies = [chat_body(f"prompt {i}" * (i + 1), max_tokens=3 + i) for i in range(8)]
    rs = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    for i, r in enumerate(rs):
        assert r.json()["choices"][0]["message"]["content"] == REPLY[: 3 + i]


async def test_models(client):
    d = (await client.get("/v1/models")).json()
    assert d["object"] == "list" and [m["id"] for m in d["data"]] == [MODEL]
    assert d["data"][0]["max_model_len"] == MAX_MODEL_LEN and d["data"][0]["object"] == "model"
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert_error(await client.get("/v1/models/other"), 404, "other")


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels, as Prometheus prints them)."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_metrics(client, fake):
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True})
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=0))
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    t = r.text
    assert metric(t, 'kvbridge_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert metric(t, 'kvbridge_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert metric(t, 'kvbridge_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert metric(t, "kvbridge_time_to_first_token_seconds_count") == 2
    assert metric(t, "kvbridge_time_per_output_token_seconds_count") == 2
    assert metric(t, "kvbridge_e2e_request_latency_seconds_count") == 2
    assert 'kvbridge_time_to_first_token_seconds_bucket{le="0.1"}' in t
    assert metric(t, "kvbridge_prompt_tokens_total") == prompt_len() + 3
    assert metric(t, "kvbridge_generation_tokens_total") == 8
    assert metric(t, "kvbridge_kv_blocks_total") == fake.block_pool.num_blocks
    assert metric(t, "kvbridge_kv_blocks_free") == fake.block_pool.num_blocks
    assert metric(t, "kvbridge_kv_blocks_used") == 0
    assert metric(t, "kvbridge_requests_running") == 0 and metric(t, "kvbridge_requests_waiting") == 0
    assert metric(t, "kvbridge_engine_healthy") == 1


async def test_metrics_gauges_follow_the_engine(client, fake):
    fake.step_delay = 0.01
    fake.max_num_seqs = 1
    bodies = [chat_body(ignore_eos=True, max_tokens=30) for _ in range(2)]
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=b)) for b in bodies]
    seen = {}
    for _ in range(200):
        t = (await client.get("/metrics")).text
        if metric(t, "kvbridge_kv_blocks_used") > 0 and metric(t, "kvbridge_requests_waiting") == 1:
            seen = {
                k: metric(t, k)
                for k in ("kvbridge_kv_blocks_used", "kvbridge_kv_blocks_free", "kvbridge_requests_running")
            }
            break
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert seen, "gauges never showed the running request"
    assert seen["kvbridge_requests_running"] == 1
    assert seen["kvbridge_kv_blocks_used"] + seen["kvbridge_kv_blocks_free"] == fake.block_pool.num_blocks


async def test_engine_failure_makes_health_503(client, fake, aengine):
    assert (await client.get("/health")).json() == {"status": "ok"}
    fake.fail_on_step = True
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert_error(r, 503, "boom")  # the engine died before the first token
    assert not aengine.healthy
    r = await client.get("/health")
    assert r.status_code == 503 and "boom" in r.json()["error"]["message"]
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503, "engine")
    assert metric((await client.get("/metrics")).text, "kvbridge_engine_healthy") == 0


async def test_engine_failure_mid_stream_sends_an_error_event(client, fake, aengine):
    fake.step_delay = 0.005

    async def crash_soon():
        await asyncio.sleep(0.05)
        fake.fail_on_step = True

    crash = asyncio.create_task(crash_soon())
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True, ignore_eos=True, max_tokens=100))
    await crash
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "boom" in json.loads(events[-2])["error"]["message"]
    r = await client.post("/v1/chat/completions", json=chat_body(ignore_eos=True, max_tokens=100))
    assert_error(r, 503)
    assert (await client.get("/health")).status_code == 503


# --------------------------------------------------------------------------- AsyncEngine on its own


async def test_async_engine_generate_and_early_stop(aengine, fake):
    outs = [o async for o in aengine.generate("a", [65, 66], SamplingParams(max_tokens=4))]
    assert "".join(o.new_text for o in outs) == "Hell" and outs[-1].finished
    fake.step_delay = 0.01
    agen = aengine.generate("b", [65], SamplingParams(max_tokens=50, ignore_eos=True))
    async for _ in agen:
        break
    await agen.aclose()
    assert wait_until(lambda: "b" in fake.aborted)


async def test_async_engine_break_without_aclose_aborts(aengine, fake):
    """A loop that breaks leaves the generator to the garbage collector; asyncio's
    async-generator finalizer closes it, which aborts the request."""
    fake.step_delay = 0.01

    async def first_only():
        async for out in aengine.generate("bb", [65], SamplingParams(max_tokens=90, ignore_eos=True)):
            return out

    assert (await first_only()).new_text == "H"
    for _ in range(300):
        if "bb" in fake.aborted:
            break
        await asyncio.sleep(0.01)
    assert "bb" in fake.aborted


async def test_async_engine_cancelled_task_aborts(aengine, fake):
    fake.step_delay = 0.01

    async def consume():
        async for _ in aengine.generate("c", [65], SamplingParams(max_tokens=90, ignore_eos=True)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_until(lambda: "c" in fake.aborted)


async def test_async_engine_errors(aengine, fake):
    with pytest.raises(RequestError, match="empty"):
        async for _ in aengine.generate("d", [], SamplingParams()):
            pass
    fake.step_delay = 0.01
    agen = aengine.generate("e", [65], SamplingParams(max_tokens=90, ignore_eos=True))
    await agen.__anext__()
    with pytest.raises(RequestError, match="already in use"):
        async for _ in aengine.generate("e", [65], SamplingParams()):
            pass
    await agen.aclose()


async def test_async_engine_idles_without_spinning(aengine, fake):
    async for _ in aengine.generate("f", [65], SamplingParams(max_tokens=2)):
        pass
    await asyncio.sleep(0.05)
    before = (fake.num_steps, fake.num_idle_checks)
    await asyncio.sleep(0.2)
    assert (fake.num_steps, fake.num_idle_checks) == before


async def test_async_engine_shutdown_fails_open_requests(fake):
    ae = AsyncEngine(fake)
    ae.start()
    fake.step_delay = 0.01
    agen = ae.generate("g", [65], SamplingParams(max_tokens=90, ignore_eos=True))
    await agen.__anext__()
    await asyncio.to_thread(ae.shutdown)
    outs = [o async for o in agen]
    assert outs[-1].finish_reason == FinishReason.ERROR and "shutting down" in outs[-1].error
    assert not ae.healthy
    with pytest.raises(EngineDeadError):
        async for _ in ae.generate("h", [65], SamplingParams()):
            pass


# --------------------------------------------------------------------------- a real server: disconnects


@contextmanager
def real_server(app):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 10), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_disconnect_mid_stream_aborts(fake):
    fake.step_delay = 0.01
    ae = AsyncEngine(fake)
    app = build_app(ae, Config(engine=fake.config, server=ServerConfig(max_tokens_limit=200)))
    with real_server(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        for path, body in (
            ("/v1/chat/completions", chat_body(stream=True, ignore_eos=True, max_tokens=200)),
            ("/v1/completions", {"prompt": "x", "stream": True, "ignore_eos": True, "max_tokens": 200}),
        ):
            n_aborted = len(fake.aborted)
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(x.startswith("data: {") for x in got)
            assert wait_until(lambda n=n_aborted: len(fake.aborted) == n + 1), "the request was not aborted"
            assert wait_until(lambda: pool_full(fake))
        # a client that gives up on a non-streaming request also frees its blocks
        n_aborted = len(fake.aborted)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=chat_body(ignore_eos=True, max_tokens=200), timeout=0.3)
        assert wait_until(lambda: len(fake.aborted) == n_aborted + 1), "the non-streaming request was not aborted"
        # and the server keeps serving, streaming for real
        with c.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == REPLY
        assert c.get("/health").status_code == 200
    assert not ae.healthy  # the lifespan shut the engine down
