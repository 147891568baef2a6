"""Disaggregated serving end to end: `kvbridge serve` starts real etcd and nats-server, a prefill
and a decode worker (separate processes, KV over real NIXL/UCX on loopback) and the frontend.
For greedy sampling its answers must be exactly those of one engine alone (the real default
model in float32), streaming and not, and every worker's pool must be full afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from kvbridge.config import EngineConfig
from kvbridge.engine.request import SamplingParams
from tests.cluster_harness import Cluster, alive
from tests.device import DEVICE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CONFIG = f"""
engine:
  dtype: float32
  device: {DEVICE}
  kv_cache_memory_mb: 24
cache_transceiver_config:
  backend: DEFAULT
  kv_transfer_timeout_ms: 5000
cluster:
  min_prefill_tokens: 0
"""
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea and the wind, please.",
    "hi",
    "Explain in two sentences why the sky is blue, and then say what colour sunsets are and why they look that way.",
    "List three prime numbers.",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def reference():
    """Prompts (token ids) and what one engine alone answers: (token ids, text), token strings
    and logprob values, each."""
    from kvbridge.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_mb=24, num_threads=1, device=DEVICE))
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                          add_special_tokens=False) for q in QUESTIONS]  # fmt: skip
    answers, token_str, logprobs = [], [], []
    for i, p in enumerate(prompts):
        engine.add_request(f"ref-{i}", p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=True))
        ids, text, toks, lps = [], "", [], []
        while engine.has_unfinished_requests():
            for o in engine.step():
                ids += o.new_token_ids
                text += o.new_text
                toks += [tok.decode([t]) for t in o.new_token_ids[: len(o.new_logprobs or [])]]  # EOS has none
                lps += o.new_logprobs or []
        answers.append((ids, text))
        token_str.append(toks)
        logprobs.append(lps)
    return prompts, answers, token_str, logprobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, reference):
    c = Cluster(tmp_path_factory.mktemp("disagg"), CONFIG)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def body(prompt: list[int], **kw) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0, **kw}


def test_cluster_started_one_prefill_and_one_decode_worker(cluster):
    assert set(cluster.workers) == {"prefill-0", "decode-0"}, cluster.log()[-3000:]
    assert {"etcd", "nats-server", "prefill-0", "decode-0"} <= set(cluster.pids)


def test_disaggregated_equals_aggregated_non_streaming(cluster, reference):
    prompts, answers, token_str, _ = reference
    before = cluster.metric("kvbridge_prefill_mode_total", mode="remote")
    for p, (ids, text), toks in zip(prompts, answers, token_str):
        r = httpx.post(f"{cluster.url}/v1/completions", json=body(p), timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["logprobs"]["tokens"] == toks
        assert choice["text"] == text
        assert r.json()["usage"]["completion_tokens"] == len(ids)
    assert cluster.metric("kvbridge_prefill_mode_total", mode="remote") - before == len(prompts)
    cluster.wait_pools_full()


def test_disaggregated_equals_aggregated_streaming(cluster, reference):
    prompts, answers, token_str, _ = reference
    for p, (_ids, text), toks in zip(prompts, answers, token_str):
        got_text, got_toks, finish = "", [], None
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body(p, stream=True), timeout=60, trust_env=False) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                assert "error" not in d, d
                c = d["choices"][0]
                got_text += c["text"]
                got_toks += (c.get("logprobs") or {}).get("tokens") or []
                finish = c["finish_reason"] or finish
        assert (got_text, got_toks) == (text, toks)
        assert finish in ("stop", "length")
    cluster.wait_pools_full()


def test_concurrent_requests_give_the_bits_each_gives_alone(cluster, reference):
    """All prompts at once: the prefill worker batches them together and the decode worker
    decodes them together, while the reference ran each alone. Tokens and logprobs (floats,
    compared exactly) must be those of the reference: no row depends on its batch. On CUDA
    the tokens and text must still match, but cuBLAS picks its float32 kernels by shape, so
    a logprob may differ from the reference in its last bits (seen: 1.4e-6)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts, answers, token_str, logprobs = reference

    def post(p: list[int]) -> dict:
        r = httpx.post(f"{cluster.url}/v1/completions", json=body(p), timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        choices = list(pool.map(post, prompts))
    for choice, (_ids, text), toks, lps in zip(choices, answers, token_str, logprobs):
        assert choice["text"] == text
        assert choice["logprobs"]["tokens"] == toks
        if DEVICE == "cpu":
            assert choice["logprobs"]["token_logprobs"] == lps
        else:
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(lps, abs=1e-4)
    cluster.wait_pools_full()


def test_ttft_split_and_routing_counts_in_frontend_metrics(cluster):
    assert cluster.metric("kvbridge_router_requests_total", role="prefill", worker="prefill-0") >= 2 * len(QUESTIONS)
    assert cluster.metric("kvbridge_router_requests_total", role="decode", worker="decode-0") >= 2 * len(QUESTIONS)
    for part in ("queue", "prefill", "transfer", "first_decode"):
        assert cluster.metric("kvbridge_ttft_part_seconds_count", part=part) >= 2 * len(QUESTIONS)
    assert cluster.metric("kvbridge_ttft_part_seconds_sum", part="transfer") > 0
    # the prompts were sent twice: the prefill worker's KV events (NATS) told the router it holds them
    assert cluster.metric("kvbridge_router_cached_blocks_total") > 0


def test_client_gone_mid_stream_frees_every_pool(cluster, reference):
    prompts = reference[0]
    long = body(prompts[3], stream=True, max_tokens=200, ignore_eos=True)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=long, timeout=60, trust_env=False) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # the client goes away mid-stream
    cluster.wait_pools_full()
    assert cluster.stats("decode-0")["num_running"] == 0



def test_client_gone_while_the_prompt_is_prefilled_frees_every_pool(cluster, reference):
    prompt = reference[0][3] * 6  # ~300 tokens: still being prefilled when the client leaves
    wait_s = 0.3 if DEVICE == "cpu" else 0.01  # a GPU answers the whole request within 0.3 s
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{cluster.url}/v1/completions", json=body(prompt, max_tokens=50), timeout=wait_s, trust_env=False)
    cluster.wait_pools_full(timeout=30)  # at the latest once kv_transfer_timeout_ms (5 s) has passed


def test_ctrl_c_stops_every_child_cleanly(cluster):
    """Last in this module: Ctrl-C (SIGINT to `kvbridge serve`) stops each worker with one
    SIGTERM and a clean exit (code 0, not -15 from a second SIGTERM while it exits), then
    etcd and NATS; no child outlives it."""
    pids = cluster.pids
    cluster.stop()
    assert cluster.proc.returncode in (0, 130), cluster.log()[-3000:]
    for wid in ("prefill-0", "decode-0"):
        assert f"{wid} stopped (pid {pids[wid]}, exit code 0)" in cluster.log(), cluster.log()[-3000:]
    assert not [name for name, pid in pids.items() if alive(pid)]
