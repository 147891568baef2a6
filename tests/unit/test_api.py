"""The OpenAI-compatible server and AsyncEngine, on a fake engine with a real BlockPool.

The fake engine answers every prompt with ``REPLY`` (one character per token) then EOS, and
holds real KV blocks from a real ``BlockPool`` while a request runs, so every test ends by
checking that the pool is full again.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn

from kvbridge.config import Config, EngineConfig, ServerConfig
from kvbridge.engine.async_engine import AsyncEngine, EngineDeadError
from kvbridge.engine.block_pool import BlockPool
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from kvbridge.serving.api import build_app, validation_message

pytestmark = pytest.mark.anyio

REPLY = "Hello there, friend!"
EOS = 1
MAX_MODEL_LEN = 256
MODEL = "fake-model"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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

    def step(self) -> list[RequestOutput]:
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


@pytest.fixture
def fake():
    engine = FakeEngine()
    yield engine
    assert wait_until(lambda: pool_full(engine)), f"leaked blocks: {engine.block_pool.num_used} in use"


@pytest.fixture
def aengine(fake):
    ae = AsyncEngine(fake)
    ae.start()
    yield ae
    ae.shutdown()


@pytest.fixture
def config():
    return Config(
        engine=EngineConfig(model="fake.gguf", served_model_name=MODEL),
        server=ServerConfig(max_tokens_default=64, max_tokens_limit=100),
    )


@pytest.fixture
def app(aengine, config):
    return build_app(aengine, config)


@pytest.fixture
async def client(app):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as c:
        yield c


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


# --------------------------------------------------------------------------- chat


async def test_chat_non_stream(client):
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-") and d["model"] == MODEL
    (choice,) = d["choices"]
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    n = prompt_len()
    assert d["usage"] == {"prompt_tokens": n, "completion_tokens": len(REPLY) + 1, "total_tokens": n + len(REPLY) + 1}


async def test_chat_max_tokens_and_max_completion_tokens(client, fake):
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    d = r.json()
    assert d["choices"][0]["message"]["content"] == "Hello" and d["choices"][0]["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] == 5
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=50, max_completion_tokens=3))
    assert r.json()["choices"][0]["message"]["content"] == "Hel"


async def test_chat_stream_framing_and_text(client):
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_chat_stream_include_usage(client):
    body = chat_body(stream=True, max_tokens=4, stream_options={"include_usage": True})
    chunks = sse_json((await client.post("/v1/chat/completions", json=body)).text)
    *rest, last = chunks
    assert last["choices"] == []
    n = prompt_len()
    assert last["usage"] == {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4}
    assert all(c["usage"] is None for c in rest)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_equals_non_stream(client):
    bodies = (
        chat_body(max_tokens=1),
        chat_body(max_tokens=12),
        chat_body(stop=["friend"]),
        chat_body(ignore_eos=True, max_tokens=30),
    )
    for body in bodies:
        full = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        chunks = sse_json((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


async def test_stop_strings_and_stop_token_ids(client):
    r = await client.post("/v1/chat/completions", json=chat_body(stop="there"))
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "Hello " and c["finish_reason"] == "stop"
    r = await client.post("/v1/chat/completions", json=chat_body(stop=["zzz", ", "]))
    assert r.json()["choices"][0]["message"]["content"] == "Hello there"
    r = await client.post("/v1/chat/completions", json=chat_body(stop_token_ids=[ord("t")]))
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "Hello " and c["finish_reason"] == "stop"


async def test_ignore_eos(client):
    r = await client.post("/v1/chat/completions", json=chat_body(ignore_eos=True, max_tokens=len(REPLY) + 4))
    c = r.json()["choices"][0]
    assert c["message"]["content"] == REPLY + " Hel" and c["finish_reason"] == "length"


async def test_sampling_params_reach_the_engine(client, fake):
    body = chat_body(temperature=0.5, top_p=0.9, top_k=20, seed=7, max_tokens=3)
    r = await client.post("/v1/chat/completions", json=body)
    rid = r.json()["id"]
    p = fake.params[rid]
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.logprobs) == (0.5, 0.9, 20, 7, 3, False)
    r = await client.post("/v1/completions", json={"prompt": "x", "temperature": 0, "logprobs": 0})
    p = fake.params[r.json()["id"]]
    assert p.temperature == 0 and p.greedy and p.logprobs and p.max_tokens == 64  # server default


async def test_chat_logprobs(client):
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=4, logprobs=True, top_logprobs=0))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list("Hell")
    assert [c["logprob"] for c in content] == [-0.25, -0.5, -0.75, -1.0]
    assert content[0]["bytes"] == [ord("H")] and content[0]["top_logprobs"] == []
    chunks = sse_json(
        (await client.post("/v1/chat/completions", json=chat_body(max_tokens=4, logprobs=True, stream=True))).text
    )
    streamed = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["logprob"] for t in streamed] == [-0.25, -0.5, -0.75, -1.0]


# --------------------------------------------------------------------------- completions


async def test_completion_non_stream(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Say hi", "max_tokens": 8})
    d = r.json()
    assert r.status_code == 200 and d["object"] == "text_completion" and d["id"].startswith("cmpl-")
    assert d["choices"][0]["text"] == "Hello th" and d["choices"][0]["finish_reason"] == "length"
    assert d["usage"] == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}
    # token ids, and a list of one prompt, work too
    for prompt in ([72, 105], [[72, 105]], ["Hi"]):
        d = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})).json()
        assert d["choices"][0]["text"] == "He" and d["usage"]["prompt_tokens"] == 2


async def test_completion_stream(client):
    body = {"prompt": "Say hi", "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/completions", json=body)
    chunks = sse_json(r.text)
    *rest, last = chunks
    assert "".join(c["choices"][0]["text"] for c in rest) == REPLY
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(REPLY) + 1


async def test_completion_logprobs(client):
    d = (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1})).json()
    lp = d["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"] and lp["token_logprobs"] == [-0.25, -0.5, -0.75]
    assert lp["text_offset"] == [0, 1, 2] and lp["top_logprobs"] == [{"H": -0.25}, {"e": -0.5}, {"l": -0.75}]


# --------------------------------------------------------------------------- bad input


BAD_CHAT = [
    ("not json", b'{"messages": [', 400, "not valid JSON"),
    ("body is a list", b"[1, 2]", 400, "JSON object"),
    ("empty body", b"", 400, "request body"),
    ("messages missing", {"model": MODEL}, 400, "messages is required"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text"),
    (
        "text part without text",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "text is required",
    ),
    ("max_tokens a string", chat_body(max_tokens="5"), 400, "max_tokens"),
    ("temperature a string", chat_body(temperature="hot"), 400, "temperature"),
    ("stop of numbers", chat_body(stop=[1, 2]), 400, "stop must be a string or a list of strings"),
    ("stream not bool", chat_body(stream="yes"), 400, "stream"),
    ("unknown model", chat_body() | {"model": "gpt-9"}, 404, "gpt-9"),
    ("empty messages", {"messages": []}, 400, "messages must not be empty"),
    ("max_tokens 0", chat_body(max_tokens=0), 400, "at least 1"),
    ("max_tokens negative", chat_body(max_tokens=-3), 400, "at least 1"),
    ("max_completion_tokens 0", chat_body(max_completion_tokens=0), 400, "max_completion_tokens must be at least 1"),
    ("max_tokens over limit", chat_body(max_tokens=101), 400, "limit of 100"),
    ("prompt over context", chat_body("x" * MAX_MODEL_LEN), 400, "context"),
    (
        "prompt + max_tokens over context",
        chat_body("x" * (MAX_MODEL_LEN - 80), max_tokens=100),
        400,
        "maximum context length",
    ),
    ("n 2", chat_body(n=2), 400, "n must be 1"),
    ("negative temperature", chat_body(temperature=-1), 400, "temperature"),
    ("top_p 0", chat_body(top_p=0), 400, "top_p"),
    ("empty stop string", chat_body(stop=[""]), 400, "stop"),
    ("top_logprobs", chat_body(logprobs=True, top_logprobs=3), 400, "top_logprobs"),
    ("penalty", chat_body(presence_penalty=0.5), 400, "presence_penalty"),
]


@pytest.mark.parametrize("name, body, status, fragment", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
async def test_bad_chat_requests(client, name, body, status, fragment):
    for stream in (False, True):
        if isinstance(body, bytes):
            r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post("/v1/chat/completions", json={**body, "stream": body.get("stream", stream)})
        err = assert_error(r, status, fragment)
        if status == 404:
            assert err["code"] == "model_not_found"
    # the server keeps serving
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "He"


BAD_COMPLETION = [
    ("prompt missing", {"max_tokens": 3}, "prompt is required"),
    ("empty prompt", {"prompt": ""}, "prompt must not be empty"),
    ("empty token list", {"prompt": []}, "prompt must not be empty"),
    ("prompt a dict", {"prompt": {"a": 1}}, "prompt must be a string or a list of token ids"),
    ("batched prompts", {"prompt": ["a", "b"]}, "one prompt per request"),
    ("token out of vocab", {"prompt": [5, 100000]}, "token ids must be in"),
    ("logprobs 5", {"prompt": "x", "logprobs": 5}, "logprobs must be 0 or 1"),
    ("echo", {"prompt": "x", "echo": True}, "echo"),
    ("max_tokens over context", {"prompt": "x" * 200, "max_tokens": 100}, "maximum context length"),
]


@pytest.mark.parametrize("name, body, fragment", BAD_COMPLETION, ids=[b[0] for b in BAD_COMPLETION])
async def test_bad_completion_requests(client, name, body, fragment):
    assert_error(await client.post("/v1/completions", json=body), 400, fragment)
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "H"


async def test_json_body_whatever_the_content_type(client):
    body = json.dumps(chat_body(max_tokens=2)).encode()
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        r = await client.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "He"
    assert_error(await client.post("/v1/completions", content=b"\xff\xfe"), 400, "not valid JSON")


async def test_fastapi_validation_errors_are_openai_400s(app, client):
    @app.get("/probe")
    async def probe(count: int) -> dict:
        return {"count": count}

    assert_error(await client.get("/probe", params={"count": "many"}), 400, "query.count", "valid integer")
    assert (await client.get("/probe", params={"count": 3})).json() == {"count": 3}


async def test_unknown_route_and_method(client):
    assert_error(await client.get("/v1/nothing"), 404, "/v1/nothing")
    assert_error(await client.get("/v1/chat/completions"), 405, "GET")


async def test_engine_refusal_is_a_400_before_streaming(client, fake):
    for stream in (False, True):
        fake.reject_next = "the request needs 9999 KV blocks"
        r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert_error(r, 400, "9999 KV blocks")
        assert r.headers["content-type"].startswith("application/json")
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))).status_code == 200


def test_validation_message_is_readable():
    errors = [
        {
            "type": "string_type",
            "loc": ("body", "messages", 0, "content", "str"),
            "msg": "Input should be a valid string",
        },
        {
            "type": "missing",
            "loc": ("body", "messages", 0, "content", "list[ContentPart]", 0, "text"),
            "msg": "Field required",
        },
    ]
    assert validation_message(errors) == ("messages.0.content.0.text is required", "messages.0.content.0.text")


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
