"""A fake LLM engine for the API tests: an OpenAI-compatible server over AsyncEngine, on a real BlockPool.

The fake engine answers every prompt with ``REPLY`` (one character per token) then EOS, and
holds real KV blocks from a real ``BlockPool`` while a request runs, so every test ends by
checking that the pool is full again. Also the helpers the tests share: waiting, request
bodies, SSE parsing and OpenAI error checks. The fixtures live in ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from kvbridge.config import EngineConfig
from kvbridge.engine.block_pool import BlockPool
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams

REPLY = "Hello there, friend!"
EOS = 1
MAX_MODEL_LEN = 256
MODEL = "fake-model"


# --------------------------------------------------------------------------- the fake engine


class FakeTokenizer:
    """One token per character (code point < 512), EOS = 1, specials never decoded."""

    eos_token_id = EOS
    eos_token_ids = frozenset({EOS})
    vocab_size = 512

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) if 32 <= ord(c) < 512 else ord("?") for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i >= 32)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_waiting: int
    num_running: int


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    blocks: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0


class FakeEngine:
    """The LLMEngine interface, one token per request per step, real block accounting."""

    def __init__(self, num_blocks: int = 128, block_size: int = 4, max_num_seqs: int = 4) -> None:
        self.config = EngineConfig(model="fake.gguf", served_model_name=MODEL, block_size=block_size)
        self.tokenizer = FakeTokenizer()
        self.model_name = MODEL
        self.max_model_len = MAX_MODEL_LEN
        self.block_pool = BlockPool(num_blocks, block_size)
        self.max_num_seqs = max_num_seqs
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.aborted: list[str] = []
        self.params: dict[str, SamplingParams] = {}
        self.step_delay = 0.0
        self.fail_on_step = False
        self.reject_next: str | None = None
        self.num_steps = 0
        self.num_idle_checks = 0

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self.reject_next:
            msg, self.reject_next = self.reject_next, None
            raise RequestError(msg)
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError("prompt + max_tokens is over the context")
        self.params[request_id] = params
        self.waiting.append(_Req(request_id, list(prompt_token_ids), params))

    def abort_request(self, request_id: str) -> None:
        for q in (self.waiting, self.running):
            for r in q:
                if r.rid == request_id:
                    q.remove(r)
                    self.block_pool.free(r.blocks)
                    self.aborted.append(request_id)
                    return

    def has_unfinished_requests(self) -> bool:
        self.num_idle_checks += 1
        return bool(self.waiting or self.running)

    def step(self, between_layers=None) -> list[RequestOutput]:  # one "layer": the hook runs once
        if between_layers is not None:
            between_layers()
        self.num_steps += 1
        if self.fail_on_step:
            raise RuntimeError("boom: the fake model crashed")
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            need = self.block_pool.blocks_needed(len(r.prompt) + 1)
            if need > self.block_pool.num_free:
                break
            r.blocks = self.block_pool.allocate(need)
            self.running.append(self.waiting.pop(0))
        outs = []
        for r in list(self.running):
            outs.append(self._one_token(r))
        return outs

    def _one_token(self, r: _Req) -> RequestOutput:
        p = r.params
        k = len(r.out)
        j = k % (len(REPLY) + 1)  # REPLY, then EOS (a space when ignoring EOS), again and again
        token = ord(REPLY[j]) if j < len(REPLY) else (ord(" ") if p.ignore_eos else EOS)
        r.out.append(token)
        if len(r.prompt) + len(r.out) > len(r.blocks) * self.block_pool.block_size:
            r.blocks += self.block_pool.allocate(1)
        reason = None
        if token == EOS or token in p.stop_token_ids:
            reason = FinishReason.STOP  # the stop token is not part of the text
        else:
            r.text += self.tokenizer.decode([token])
            if len(r.out) >= p.max_tokens:
                reason = FinishReason.LENGTH
        for s in p.stop:
            i = r.text.find(s)
            if i >= 0:
                r.text, reason = r.text[:i], FinishReason.STOP
        hold = max((len(s) for s in p.stop), default=1) - 1
        end = len(r.text) if reason else max(r.sent, len(r.text) - hold)
        delta, r.sent = r.text[r.sent : end], end
        if reason:
            self.running.remove(r)
            self.block_pool.free(r.blocks)
        return RequestOutput(
            request_id=r.rid, new_token_ids=[token], new_text=delta, finished=reason is not None,
            finish_reason=reason, num_prompt_tokens=len(r.prompt), num_output_tokens=len(r.out),
            new_logprobs=[-0.25 * (k % 4 + 1)] if p.logprobs else None,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        return EngineStats(self.block_pool.num_blocks, self.block_pool.num_free, len(self.waiting), len(self.running))


# --------------------------------------------------------------------------- fixtures


def wait_until(cond, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def pool_full(fake: FakeEngine) -> bool:
    return fake.block_pool.num_free == fake.block_pool.num_blocks and not fake.waiting and not fake.running


def chat_body(content: str = "hi", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def prompt_len(content: str = "hi") -> int:
    tok = FakeTokenizer()
    return len(tok.encode(tok.apply_chat_template([{"role": "user", "content": content}])))


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body; asserts the framing."""
    assert body.endswith("\n\n"), body[-50:]
    frames = body.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def sse_json(body: str) -> list[dict]:
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    for f in fragments:
        assert f in err["message"], (f, err["message"])
    return err
