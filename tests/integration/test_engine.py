"""The engine on the real default model (SmolLM2-135M-Instruct GGUF), float32, on the test
device (tests/device.py: CPU unless ``KVBRIDGE_TEST_DEVICE`` says cuda).

Reference: Hugging Face transformers' LlamaForCausalLM loading the same GGUF file through
its own loader (independent of ours), greedy decoding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvbridge.config import EngineConfig, default_model_path
from kvbridge.engine import native
from kvbridge.engine.engine import LLMEngine, in_passing_thread
from kvbridge.engine.request import FinishReason, RequestError, SamplingParams
from tests.device import DEVICE

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning' into Spanish, German and Italian.",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog was not amused.",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_mb=256, max_num_batched_tokens=512, device=DEVICE))


@pytest.fixture(scope="module")
def prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    out = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS[:5]]
    out += [tok.encode(q) for q in QUESTIONS[5:]]
    return out


@pytest.fixture(autouse=True)
def pool_full_after(engine: LLMEngine):
    yield
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    # no EOS: 32 tokens each, like ignore_eos (a generate() argument of None falls back to these)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(DEVICE).eval()


def test_greedy_tokens_match_transformers(engine, prompts, hf_model):
    torch.set_num_threads(engine.config.num_threads or os.cpu_count() or 1)
    ours = [engine.generate([p], GREEDY)[0] for p in prompts[:5]]
    for p, mine in zip(prompts[:5], ours):
        ids = torch.tensor([p], device=DEVICE)
        with torch.inference_mode():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert mine == ref[0, len(p) :].tolist()


def test_concurrent_prompts_give_the_tokens_each_gives_alone(engine, prompts):
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    lengths = {len(p) for p in prompts}
    assert len(lengths) >= 6, "prompts should differ in length"
    together = engine.generate(prompts, GREEDY)
    assert together == alone


def test_bfloat16_packed_linear_layers_change_no_token(prompts, monkeypatch):
    """bfloat16 on CPU: the oneDNN-packed linear layers (models/packed.py) give exactly the
    tokens plain ``nn.Linear`` gives, for 8 prompts batched (prefill chunks and decode)."""
    import kvbridge.engine.engine as engine_module
    from kvbridge.engine.models.packed import packing_works

    cfg = EngineConfig(dtype="bfloat16", kv_cache_memory_mb=128, max_num_batched_tokens=512, layer_backend="torch", device=DEVICE)
    packed = LLMEngine(cfg)
    on_cpu = DEVICE == "cpu"  # oneDNN packing is for CPU; on CUDA nothing is packed
    expected = 4 * packed.spec.num_layers + 1 if on_cpu and packing_works(torch.bfloat16) else 0  # q|k|v, o, gate|up, down; head
    assert packed.packed_linears == expected
    monkeypatch.setattr(engine_module, "pack_linears", lambda *args: 0)
    plain = LLMEngine(cfg)
    assert plain.packed_linears == 0
    assert packed.generate(prompts, GREEDY) == plain.generate(prompts, GREEDY)
    for e in (packed, plain):
        assert e.block_pool.num_free == e.block_pool.num_blocks


@pytest.fixture(scope="module")
def bf16() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_memory_mb=128, max_num_batched_tokens=512, device=DEVICE))


def test_bfloat16_concurrent_prompts_give_the_tokens_each_gives_alone(bf16, prompts):
    """The half-precision path (grouped, chunked attention; packed products) treats every
    row alike whatever the batch: what disaggregated = aggregated output rests on, since a
    prefill worker batches a prompt with other prompts, an aggregated one with decodes."""
    alone = [bf16.generate([p], GREEDY)[0] for p in prompts]
    assert bf16.generate(prompts, GREEDY) == alone
    assert bf16.block_pool.num_free == bf16.block_pool.num_blocks


def test_bfloat16_one_native_call_a_layer_gives_the_bits_of_the_layer_by_parts(bf16, prompts):
    """Where products, element-wise ops and attention are all native (bfloat16 on a CPU with
    AVX512-BF16), a layer runs as one native call (models/native_layers.py): the tokens and
    logprobs of prompts and decodes in mixed steps are those of the layer run part by part,
    and the per-layer hook still runs after every layer."""
    on_native = DEVICE == "cpu" and native.load().linear.available > 0
    layers = bf16.model.native_layers
    assert (layers is not None) == on_native
    whole, calls, steps = tokens_and_logprobs(bf16, prompts, "whole")
    bf16.model.native_layers = None
    try:
        parts, _, _ = tokens_and_logprobs(bf16, prompts, "parts")
    finally:
        bf16.model.native_layers = layers
    assert whole == parts
    assert sum(len(lps) for _, lps in whole.values()) == len(prompts) * 24
    assert calls == steps * bf16.model.spec.num_layers
    assert bf16.block_pool.num_free == bf16.block_pool.num_blocks


def tokens_and_logprobs(e: LLMEngine, prompts: list[list[int]], tag: str) -> tuple[dict[str, tuple[list[int], list[float]]], int, int]:
    """Greedy, 24 tokens each, all prompts at once: {prompt index: (tokens, logprobs)}, how
    often the per-layer hook ran, and the steps."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    calls, steps, got = [], 0, {}
    for i, p in enumerate(prompts):
        e.add_request(f"{tag}-{i}", p, params)
    while e.has_unfinished_requests():
        for out in e.step(lambda: calls.append(1)):
            ids, lps = got.setdefault(out.request_id.split("-")[1], ([], []))
            ids.extend(out.new_token_ids)
            lps.extend(out.new_logprobs or [])
        steps += 1
    return got, len(calls), steps


def test_bfloat16_decode_products_on_the_gguf_codes_change_no_bit(bf16, prompts):
    """Where the products run on AMX tiles, every product of every layer keeps the default
    model's Q4_1 codes, the head its Q8_0 ones, and a decode step's rows run on them
    (models/quantized.py): the tokens and logprobs of prompts and decodes are those of the
    bfloat16 weights alone."""
    from kvbridge.engine.models.native_layers import NativeLayers
    from kvbridge.engine.models.packed import NativeLinear

    amx = DEVICE == "cpu" and native.load().linear.available == 2
    coded = [m for m in bf16.model.modules() if isinstance(m, NativeLinear) and m.codes is not None]
    assert len(coded) == (4 * bf16.spec.num_layers + 1 if amx else 0)  # q|k|v, o, gate|up, down; the head
    assert (bf16.model.lm_head in coded) == amx
    with_codes, _, _ = tokens_and_logprobs(bf16, prompts, "codes")
    layers, codes = bf16.model.native_layers, [m.codes for m in coded]
    try:
        for m in coded:
            m.codes = None
        if layers is not None:  # its weight pointers name the codes: gather them again
            bf16.model.native_layers = NativeLayers.for_model(bf16.model, native.load())
        without, _, _ = tokens_and_logprobs(bf16, prompts, "plain")
    finally:
        for m, c in zip(coded, codes, strict=True):
            m.codes = c
        bf16.model.native_layers = layers
    assert with_codes == without
    assert bf16.block_pool.num_free == bf16.block_pool.num_blocks


@pytest.mark.parametrize("which", ["engine", "bf16"])  # float32; bfloat16 (native layers where they run)
def test_prefix_cache_hit_gives_identical_tokens(which, prompts, request):
    e = request.getfixturevalue(which)
    first = e.generate([prompts[0]], GREEDY)[0]
    hits_before = e.stats().prefix_cache_hit_tokens
    second = e.generate([prompts[0]], GREEDY)[0]
    assert e.stats().prefix_cache_hit_tokens > hits_before
    assert first == second
    assert e.block_pool.num_free == e.block_pool.num_blocks


def test_preemption_under_a_tiny_pool_keeps_outputs_exact(prompts):
    small = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=12, max_num_batched_tokens=256, device=DEVICE))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    picked = prompts[:4]  # ~40-60 tokens each: 12 blocks of 16 cannot hold all four
    alone = [small.generate([p], params)[0] for p in picked]
    together = small.generate(picked, params)
    assert small.num_preemptions > 0
    assert together == alone
    assert small.block_pool.num_free == small.block_pool.num_blocks


def test_abort_mid_generation_frees_blocks(engine, prompts):
    engine.add_request("to-abort", prompts[1], SamplingParams(max_tokens=100, temperature=0))
    engine.add_request("to-keep", prompts[2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_pool.num_free < engine.block_pool.num_blocks
    engine.abort_request("to-abort")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert all(o.request_id == "to-keep" for o in outs)
    assert outs[-1].finish_reason == FinishReason.LENGTH


def test_stop_strings_eos_and_max_tokens(engine, prompts):
    tok = engine.tokenizer
    full = engine.generate([prompts[0]], SamplingParams(max_tokens=32, temperature=0))[0]
    text = tok.decode(full)
    assert full[-1] in tok.eos_token_ids or len(full) == 32
    word = text.split()[2]
    engine.add_request("stop", prompts[0], SamplingParams(max_tokens=32, temperature=0, stop=[word]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    streamed = "".join(o.new_text for o in outs)
    assert outs[-1].finish_reason == FinishReason.STOP
    assert word not in streamed and text.startswith(streamed)


def test_sampling_with_seed_is_reproducible_and_logprobs_are_given(engine, prompts):
    p = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234, logprobs=True, ignore_eos=True)
    a = engine.generate([prompts[3]], p)[0]
    b = engine.generate([prompts[3]], SamplingParams(**{**p.__dict__}))[0]
    assert a == b
    engine.add_request("lp", prompts[3], SamplingParams(max_tokens=3, temperature=0, logprobs=True))
    lps = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            lps += o.new_logprobs or []
    assert len(lps) == 3 and all(lp <= 0 for lp in lps)


def test_bad_requests_are_refused_with_a_reason(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add_request("l", [1] * (engine.max_model_len - 5), GREEDY)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("v", [10**9], GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


# Builds an engine in a fresh process, then runs parallel torch work in the same thread and
# prints how many threads that added: 1 (libgomp's new worker) if the thread had no OpenMP
# team yet, 0 if loading left one behind.
OPENMP_PROBE = """
import os, torch
from kvbridge.config import EngineConfig
from kvbridge.engine.engine import LLMEngine
LLMEngine(EngineConfig(num_threads=2, num_kv_blocks=64))
before = len(os.listdir("/proc/self/task"))
torch.ones(1 << 24).sum()
print(len(os.listdir("/proc/self/task")) - before)
"""


def test_loading_leaves_no_openmp_team_in_the_calling_thread():
    """AsyncEngine steps in its own thread; a second OpenMP team (the loader's) made libgomp stop
    spinning between parallel regions on 2 cores, and decode steps ran 1.5-2x slower."""
    out = subprocess.run([sys.executable, "-c", OPENMP_PROBE], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"


def test_in_passing_thread_returns_and_raises_in_the_caller():
    assert in_passing_thread(lambda: 41 + 1) == 42
    from kvbridge.engine.model_files import WeightsError

    with pytest.raises(WeightsError, match="model not found"):  # the loader's own error, raised here
        LLMEngine(EngineConfig(model="/nonexistent/model.gguf"))


def test_a_step_runs_its_hook_after_every_layer_and_the_tokens_do_not_change(engine, prompts):
    """``step(between_layers)``: the KV connector answers transfer peers in the middle of a
    step through it; it runs once after each layer of every step, and changes nothing."""
    alone = engine.generate([prompts[0]], GREEDY)[0]
    calls = []
    engine.add_request("hook-0", prompts[0], GREEDY)
    steps = 0
    got: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step(lambda: calls.append(1)):
            got.extend(out.new_token_ids)
        steps += 1
    assert got == alone
    assert len(calls) == steps * engine.model.spec.num_layers
