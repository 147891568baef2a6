"""Engine ↔ connector ↔ real NIXL transceiver: a prefill engine and a decode engine in one
process (two NIXL agents over UCX on loopback), the real default model in float32.

The decode engine's output after a remote prefill must equal what one engine produces
alone, and every path must end with both pools full."""

from __future__ import annotations

import os
import time

import pytest

from kvbridge.config import CacheTransceiverConfig, EngineConfig
from kvbridge.engine.engine import LLMEngine
from kvbridge.engine.request import RequestOutput, SamplingParams
from kvbridge.transfer.connector import KVConnector
from kvbridge.transfer.select import create_transceiver

pytestmark = pytest.mark.slow
os.environ.setdefault("UCX_NET_DEVICES", "lo")

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def make(mode: str):
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_mb=64, num_threads=1))
    cfg = CacheTransceiverConfig(backend="DEFAULT", transfer_mode=mode, kv_transfer_timeout_ms=5000, verify_checksums=True)
    t = create_transceiver(cfg, engine.kv_cache, model_id=engine.spec.name)
    return engine, t, KVConnector(engine, t)


@pytest.fixture(scope="module", params=["push", "pull"])
def pair(request):
    p, d = make(request.param), make(request.param)
    yield p, d
    for _, t, _ in (p, d):
        t.close()


@pytest.fixture(scope="module")
def prompts(pair):
    tok = pair[0][0].tokenizer
    qs = ["What is the capital of France?", "Write a haiku about the sea and the wind, please.", "hi"]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in qs]


@pytest.fixture(autouse=True)
def pools_full_after(pair):
    yield
    for engine, t, c in pair:
        assert not c.busy and t.num_pending == 0
        assert engine.block_pool.num_free == engine.block_pool.num_blocks, engine.stats()


def drive(pair, until, timeout=60.0) -> list[RequestOutput]:
    """Run both engine loops (as their AsyncEngine threads would) until ``until()``."""
    (pe, _, pc), (de, _, dc) = pair
    outs: list[RequestOutput] = []
    deadline = time.monotonic() + timeout
    while not until(outs):
        assert time.monotonic() < deadline, "no progress"
        for engine, conn, sink in ((pe, pc, None), (de, dc, outs)):
            conn.poll()
            if engine.has_unfinished_requests():
                step = engine.step()
                conn.on_outputs(step)
                if sink is not None:
                    sink.extend(step)
        time.sleep(0.001)
    return outs


def finished(rid):
    return lambda outs: any(o.request_id == rid and o.finished for o in outs)


def remote_generate(pair, rid, prompt, params=GREEDY) -> list[int]:
    (pe, pt, pc), (de, dt, dc) = pair
    assert dc.start_remote(rid, prompt, params, pt.bootstrap_address)
    pe.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), hold_kv=True)
    drive(pair, lambda _: pe.num_held or not pe.has_unfinished_requests() and pc.busy)
    # the prefill worker's answer: its sampled token travels with the HTTP reply in serving
    held = pe._held[rid]
    dc.first_token(rid, held.output_token_ids[0], None)
    outs = drive(pair, finished(rid))
    drive(pair, lambda _: not pc.busy and not dc.busy)
    return [t for o in outs if o.request_id == rid for t in o.new_token_ids]


def test_remote_prefill_gives_the_tokens_of_a_local_run(pair, prompts):
    (pe, _, _), (de, _, _) = pair
    for i, p in enumerate(prompts):
        alone = pe.generate([p], GREEDY)[0]
        assert remote_generate(pair, f"r{i}", p) == alone
    assert de.stats().num_remote == 0 and pe.stats().num_held == 0


def test_failed_prefill_call_falls_back_to_local_prefill(pair, prompts):
    (pe, pt, pc), (de, dt, dc) = pair
    alone = de.generate([prompts[0]], GREEDY)[0]
    assert dc.start_remote("fb", prompts[0], GREEDY, pt.bootstrap_address)
    dc.prefill_failed("fb", "prefill worker unreachable")  # before any KV moved
    outs = drive(pair, finished("fb"))
    assert [t for o in outs for t in o.new_token_ids] == alone
    drive(pair, lambda _: not dc.busy and not pc.busy)


def test_client_abort_while_waiting_for_kv_frees_the_reservation(pair, prompts):
    (pe, pt, pc), (de, dt, dc) = pair
    assert dc.start_remote("ab", prompts[1], GREEDY, pt.bootstrap_address)
    assert de.block_pool.num_free < de.block_pool.num_blocks
    assert dc.abort("ab")
    drive(pair, lambda _: not dc.busy and not pc.busy)


def test_unreachable_peer_means_local_prefill(pair, prompts):
    (_, _, _), (de, _, dc) = pair
    assert not dc.start_remote("nope", prompts[2], GREEDY, "127.0.0.1:9")  # nothing listens there
    assert de.block_pool.num_free == de.block_pool.num_blocks
