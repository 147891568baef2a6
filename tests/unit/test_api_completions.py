"""The OpenAI-compatible server on a fake engine: chat and completion endpoints, streaming, usage, logprobs."""

from __future__ import annotations

import pytest

from tests.fake_engine import MODEL, REPLY, chat_body, prompt_len, sse_json

pytestmark = pytest.mark.anyio


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
