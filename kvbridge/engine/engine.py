"""The engine: schedule → run → sample → postprocess, one step at a time.

Not thread-safe: one thread calls everything (AsyncEngine wraps it for the server).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvbridge.config import ConfigError, EngineConfig
from kvbridge.engine import native
from kvbridge.engine.block_pool import BlockPool
from kvbridge.engine.host_memory import keep_freed_memory, release_freed_memory
from kvbridge.engine.kv_cache import TORCH_DTYPES, KVCache, KVLayout, num_blocks_for_memory
from kvbridge.engine.model_runner import ModelRunner
from kvbridge.engine.models.llama import LlamaModel, Rotary
from kvbridge.engine.models.native_layers import NativeLayers
from kvbridge.engine.models.packed import native_linears, pack_linears, pad_small_batches
from kvbridge.engine.models.quantized import attach_codes
from kvbridge.engine.output import OutputState, emit, token_stop
from kvbridge.engine.request import FinishReason, Request, RequestError, RequestOutput, SamplingParams
from kvbridge.engine.sampler import sample
from kvbridge.engine.scheduler import Scheduler
from kvbridge.engine.tokenizer import Tokenizer
from kvbridge.engine.weights import load_model

log = logging.getLogger("kvbridge.engine")
T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that ends with it, and return its result (or raise its error).

    torch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker threads for
    every thread that has run parallel work, until that thread exits. Once more of these
    threads exist than cores, libgomp stops spinning between parallel regions, and every
    small op then pays a futex wake-up: loading in the main thread and stepping in
    AsyncEngine's thread made a closed loop of 8 chats 1.4x slower on 2 cores (a batch-8
    linear layer 290 µs instead of 170 µs). Loading here leaves no team behind."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="kvbridge-load", daemon=True)  # Ctrl-C during a load exits at once
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_waiting: int
    num_running: int
    num_remote: int  # decode side: waiting for a peer's KV
    num_held: int  # prefill side: finished, blocks held for a transfer
    num_preemptions: int
    prefix_cache_hit_tokens: int


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto``: bfloat16 where matmuls run natively in it (CUDA, CPUs with AVX512-BF16/AMX), else float32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def resolve_attention(name: str, dtype_name: str, device: torch.device) -> native.PagedAttention | None:
    """The native attention kernel, or None for torch's path. ``auto``: native for
    bfloat16 on CPU where it builds, else torch (with a warning when the build failed);
    ``native``: that, or a startup error that says why not; ``torch``: always torch."""
    if name == "torch":
        return None
    if device.type != "cpu" or dtype_name != "bfloat16":
        if name == "native":
            raise ConfigError(f"engine.attention_backend native runs bfloat16 on CPU, not {dtype_name} on {device}")
        return None
    try:
        return native.load().paged_attention
    except native.NativeUnavailable as e:
        if name == "native":
            raise ConfigError(f"engine.attention_backend native: {e}") from None
        log.warning("native attention unavailable, using torch's: %s", e)
        return None


def resolve_linear(name: str, dtype_name: str, device: torch.device, in_features: list[int]) -> native.LinearKernel | None:
    """The native linear kernel, or None for torch's products (oneDNN-packed where exact).
    ``auto`` and ``native``: native for bfloat16 on CPUs with AVX512-BF16 (AMX or not: oneDNN's
    AMX kernels give a row other bits in a batch of 33 or more than alone, so a request's tokens
    would depend on what runs beside it); ``auto`` falls back to torch's where the kernel
    cannot run, ``native`` is then a startup error that says why not."""
    if name == "torch":
        return None
    why = ""
    if device.type != "cpu" or dtype_name != "bfloat16":
        why = f"runs bfloat16 on CPU, not {dtype_name} on {device}"
    elif any(k % 2 for k in in_features):
        why = f"needs an even number of inputs per layer, not {sorted(set(k for k in in_features if k % 2))}"
    else:
        try:
            kernel = native.load().linear
        except native.NativeUnavailable as e:
            why = str(e)
            if name == "auto":
                log.warning("native linear layers unavailable, using torch's: %s", e)
        else:
            if kernel.available == 0:
                why = "needs a CPU with AVX512-BF16"
            else:
                return kernel
    if name == "native":
        raise ConfigError(f"engine.layer_backend native: {why}")
    log.debug("native linear layers not used: %s", why)
    return None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        keep_freed_memory()  # before any tensor, and before a transceiver starts UCX
        # the thread that calls step() should be the only one that ever ran parallel torch work
        in_passing_thread(lambda: self._load(config))
        release_freed_memory()  # the load's temporary buffers, kept by the thresholds
        # what the load made lives as long as the process: the collector's full passes need
        # not walk it again (as vLLM does after its start); the bench workload: ~1.5% faster
        gc.collect()
        gc.freeze()

    def _load(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        threads = config.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        device = torch.device(config.device)
        self.dtype_name = resolve_dtype(config.dtype, device)
        dtype = TORCH_DTYPES[self.dtype_name]

        # a GGUF's own blocks, for the decode products (models/quantized.py): bfloat16 on CPU
        codes: dict | None = {} if self.dtype_name == "bfloat16" and device.type == "cpu" else None
        spec, weights = load_model(config.model, dtype=dtype, device=device, codes=codes)
        self.spec = spec
        self.tokenizer = Tokenizer.load(config.model)
        self.model_name = config.model_name
        self.max_model_len = config.max_model_len or spec.max_position_embeddings

        with torch.device("meta"):
            model = LlamaModel(spec, 1, torch.device("meta"))
        model = model.to_empty(device=device).to(dtype)
        model.load_weights(weights)
        if spec.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope = Rotary(spec.head_dim, spec.rope_theta, self.max_model_len, device)
        # after tying: the head is packed apart
        inputs = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
        kernel = resolve_linear(config.layer_backend, self.dtype_name, device, inputs)
        self.packed_linears = 0  # oneDNN-packed
        if kernel is not None:
            _, huge = native_linears(model, kernel)
            model.use_native_ops(native.load().elementwise)
            coded = 0
            if os.environ.get("KVBRIDGE_NATIVE_CODES", "1") != "0":  # 0: a decode step's products on bfloat16 too
                coded = attach_codes(model, codes or {}, native.load(), spec.tie_word_embeddings)
            extras = [
                e for e, on in (("AMX", kernel.available == 2), ("weights on huge pages", huge),
                                (f"GGUF codes for decode in {coded} products", coded)) if on
            ]  # fmt: skip
            self.linear_kind = f"native ({', '.join(extras)})" if extras else "native"
        else:
            self.packed_linears = pack_linears(model, dtype, device)
            self.linear_kind = "onednn-packed" if self.packed_linears else "torch"
        pad_small_batches(model, dtype, device)  # float32: a row's bits must not depend on its batch
        self.model = model.eval()
        del weights, codes

        num_blocks = config.num_kv_blocks or num_blocks_for_memory(
            config.kv_cache_memory_mb, spec.num_layers, spec.num_kv_heads, config.block_size, spec.head_dim, self.dtype_name
        )
        self.layout = KVLayout(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim, self.dtype_name)
        self.kv_cache = KVCache(self.layout, device)
        self.block_pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.native = resolve_attention(config.attention_backend, self.dtype_name, device)
        if self.native is not None and kernel is not None:  # every part of a layer is native: one call a layer
            self.model.native_layers = NativeLayers.for_model(self.model, native.load())
        self.runner = ModelRunner(self.model, self.kv_cache, self.native)
        self._outputs: dict[str, OutputState] = {}
        self._held: dict[str, Request] = {}  # finished hold_kv requests whose blocks await a transfer
        self._ready: list[tuple[Request, int, float | None]] = []  # remote prefills done, first token to emit
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "engine ready: model=%s dtype=%s device=%s layers=%d kv_blocks=%d x %d tokens (%.0f MiB%s) threads=%d "
            "linear=%s attention=%s layer=%s load=%.1fs",
            self.model_name, self.dtype_name, device, spec.num_layers, num_blocks, config.block_size,
            self.layout.total_bytes / 2**20, ", huge pages" if self.kv_cache.huge_pages else "", threads, self.linear_kind,
            "native" if self.native else "torch", "one native call" if self.model.native_layers else "by parts", self.load_seconds,
        )  # fmt: skip

    # ------------------------------------------------------------------ requests
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, hold_kv: bool = False
    ) -> None:
        """Queue a request. ``hold_kv`` (prefill side of a disaggregated pair): when it
        finishes, its prompt blocks stay held and the finished output carries their ids
        in ``kv_block_ids``; the caller frees them with ``release_kv`` after the transfer."""
        req = self._new_request(request_id, prompt_token_ids, params)
        req.hold_kv = hold_kv
        self.scheduler.add(req)
        self._track(req)

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {n + params.max_tokens} "
                f"were requested ({n} in the prompt, {params.max_tokens} to generate); shorten the prompt or lower max_tokens"
            )
        if self.block_pool.blocks_needed(n + params.max_tokens) > self.block_pool.num_blocks:
            raise RequestError(
                f"the request needs {self.block_pool.blocks_needed(n + params.max_tokens)} KV blocks but the pool "
                f"has {self.block_pool.num_blocks}; lower max_tokens or raise engine.kv_cache_memory_mb"
            )
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        if request_id in self.scheduler.requests or request_id in self._held:
            raise RequestError(f"request id {request_id!r} is already in use")
        return Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.tokenizer.eos_token_ids)

    def _track(self, req: Request) -> None:
        holdback = max((len(s) for s in req.params.stop), default=1) - 1
        self._outputs[req.request_id] = OutputState(self.tokenizer.detokenizer(), holdback=holdback)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks now. (A request waiting for remote KV must have
        its transfer ended first: the transceiver may still write into its blocks.)"""
        self.scheduler.abort(request_id)
        self._outputs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        """True while a step has work to do (requests waiting for remote KV do not count)."""
        return self.scheduler.has_work() or bool(self._ready)

    # ------------------------------------------------------------------ disaggregation hooks
    # decode side: reserve → (peer writes the prompt's KV) → remote_prefill_done / _failed
    def reserve_remote_prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[int] | None:
        """Reserve blocks for a prompt whose KV a prefill peer computes. Returns the block
        ids to be filled, or None when the pool cannot hold it now (prefill locally then)."""
        req = self._new_request(request_id, prompt_token_ids, params)
        if not self.scheduler.add_remote(req):
            return None
        self._track(req)
        return list(req.block_ids)

    def remote_prefill_done(self, request_id: str, first_token: int, logprob: float | None = None) -> None:
        """The KV arrived and the peer sampled ``first_token``: the prompt counts as computed,
        the token is emitted by the next ``step()``, decoding goes on here."""
        req = self.scheduler.requests[request_id]
        self.scheduler.remote_done(req)
        self._ready.append((req, first_token, logprob))

    def remote_prefill_failed(self, request_id: str) -> None:
        """The KV did not arrive (after the transfer ended): compute the prompt here instead."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.remote_failed(req)

    # prefill side: add_request(hold_kv=True) → finished output has kv_block_ids → release_kv
    def release_kv(self, request_id: str) -> None:
        """Free the blocks a finished ``hold_kv`` request kept for its transfer."""
        req = self._held.pop(request_id, None)
        if req is not None and req.block_ids:
            self.block_pool.free(req.block_ids)
            req.block_ids = []

    @property
    def num_held(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------------ the step
    def step(self, between_layers: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One engine step; ``between_layers`` (if any) runs after each layer of the model
        (the KV connector's: answering transfer peers that wait on this process)."""
        if self._ready:  # first tokens from prefill peers: hand them out before a model step
            ready, self._ready = self._ready, []
            return [self._postprocess(r, t, lp) for r, t, lp in ready]
        batch = self.scheduler.schedule()  # 1) schedule
        self.num_preemptions += batch.num_preempted
        if batch.empty:
            return []
        logits, sampling = self.runner.execute(batch, between_layers)  # 2) run
        self.scheduler.advance(batch)
        reqs = [batch.requests[i] for i in sampling]
        tokens, logprobs = sample(logits, reqs)  # 3) sample
        return [self._postprocess(r, t, lp) for r, t, lp in zip(reqs, tokens, logprobs)]  # 4) postprocess

    def _postprocess(self, req: Request, token: int, logprob: float | None) -> RequestOutput:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
            self.prefix_cache_hit_tokens += req.num_cached_tokens
        req.output_token_ids.append(token)
        reason = token_stop(req, token, self.max_model_len)
        st = self._outputs[req.request_id]
        out = emit(req, st, [token], [logprob], reason)
        if out.finished:
            hold = req.hold_kv and req.block_ids
            self.scheduler.finish(req, out.finish_reason or FinishReason.STOP, free=not hold)
            self._outputs.pop(req.request_id, None)
            if hold:
                keep = self.block_pool.blocks_needed(req.num_prompt_tokens)
                if len(req.block_ids) > keep:  # only the prompt's KV travels
                    self.block_pool.free(req.block_ids[keep:])
                    req.block_ids = req.block_ids[:keep]
                self._held[req.request_id] = req
                out.kv_block_ids = list(req.block_ids)
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.block_pool.num_blocks,
            num_free_blocks=self.block_pool.num_free,
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_remote=self.scheduler.num_remote,
            num_held=len(self._held),
            num_preemptions=self.num_preemptions,
            prefix_cache_hit_tokens=self.prefix_cache_hit_tokens,
        )

    # ------------------------------------------------------------------ offline use
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (tests, benchmarks, `kvbridge chat`): output token ids each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id].extend(o.new_token_ids)
        return [out[rid] for rid in ids]
