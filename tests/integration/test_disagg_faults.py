"""Faults in a running disaggregated cluster (1 prefill, 2 decode workers; etcd and nats-server
owned by the test so it can stop them). No request is lost (or a dead decode worker's stream
ends with a clear error event), and every surviving worker's pool is full again.

The tests run in file order on one cluster: outages of the control plane first, then a prefill
worker killed mid-request, then a decode worker killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvbridge.cluster.discovery import WorkerWatcher
from kvbridge.cluster.services import LocalServices
from tests.cluster_harness import Cluster, alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CONFIG = """
engine:
  dtype: float32
  kv_cache_memory_mb: 48
  max_num_batched_tokens: 256
cache_transceiver_config:
  backend: DEFAULT
  kv_transfer_timeout_ms: 5000
cluster:
  min_prefill_tokens: 0
"""
LONG = "Tell me a long story about a lighthouse keeper and the sea. " * 40  # ~550 tokens


@pytest.fixture(scope="module")
def services():
    svc = LocalServices()
    try:
        svc.start()
        yield svc
    finally:
        svc.cleanup()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, services):
    c = Cluster(tmp_path_factory.mktemp("faults"), CONFIG, prefill=1, decode=2, services=services)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def complete(cluster: Cluster, prompt: str, max_tokens: int = 8, timeout: float = 90) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=timeout, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


async def registered(services: LocalServices, want: set[str], timeout: float = 20.0) -> bool:
    async with WorkerWatcher(services.etcd_endpoint) as w:
        return await w.wait_for(lambda view: want <= set(view), timeout)


def surviving(cluster: Cluster) -> list[str]:
    pids = cluster.pids
    return [w for w in cluster.workers if alive(pids[w])]


def test_requests_flow_while_etcd_is_down_longer_than_the_lease(cluster, services):
    complete(cluster, "Hello there.")
    services.etcd.stop()
    try:
        end = time.monotonic() + 12  # the lease TTL is 10 s
        n = 0
        while time.monotonic() < end:
            assert complete(cluster, f"Count to {n}.")["choices"][0]["finish_reason"] == "length"
            n += 1
    finally:
        services.etcd.start()
    assert n >= 3
    # the registrations come back by themselves
    assert asyncio.run(registered(services, {"prefill-0", "decode-0", "decode-1"})), cluster.log()[-3000:]
    assert complete(cluster, "And again.")["usage"]["completion_tokens"] == 8
    cluster.wait_pools_full()


def test_requests_flow_across_a_nats_restart(cluster, services):
    services.nats.restart()
    assert complete(cluster, "Hello after NATS.")["usage"]["completion_tokens"] == 8
    # load reports come back: the frontend sees the workers' pools again
    assert wait_until(lambda: cluster.metric("kvbridge_kv_blocks_total") > 0, 20), "no load reports after the restart"
    cluster.wait_pools_full()


def test_prefill_worker_killed_mid_request_falls_back_to_local_prefill(cluster):
    pid = cluster.pids["prefill-0"]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, cluster, LONG, 8)
        busy = lambda: (s := cluster.stats("prefill-0"))["num_running"] + s["num_waiting"] > 0  # noqa: E731
        assert wait_until(busy, 30, 0.01), "the prefill worker never got the request"
        os.kill(pid, signal.SIGKILL)
        answer = fut.result(90)
    assert answer["usage"]["completion_tokens"] == 8
    assert cluster.metric("kvbridge_prefill_mode_total", mode="fallback") >= 1
    # the prefill worker left routing at once: the same prompt is now prefilled locally, same tokens
    again = complete(cluster, LONG, 8)
    assert again["choices"][0]["text"] == answer["choices"][0]["text"]
    cluster.wait_pools_full(surviving(cluster))


def test_decode_worker_killed_mid_stream_ends_with_an_error_new_requests_go_elsewhere(cluster):
    body = {"prompt": "Write a very long poem.", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    events: list[dict] = []
    victim = None
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60, trust_env=False) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if victim is None and len(events) >= 3:
                victim = next(w for w in ("decode-0", "decode-1") if cluster.stats(w)["num_running"] > 0)
                os.kill(cluster.pids[victim], signal.SIGKILL)
    assert victim is not None
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and f"decode worker {victim} failed" in errors[0]["message"], events[-3:]
    other = "decode-1" if victim == "decode-0" else "decode-0"
    before = cluster.metric("kvbridge_router_requests_total", role="decode", worker=other)
    for i in range(3):
        assert complete(cluster, f"Question {i}?")["usage"]["completion_tokens"] == 8
    assert cluster.metric("kvbridge_router_requests_total", role="decode", worker=other) - before == 3
    cluster.wait_pools_full(surviving(cluster))
