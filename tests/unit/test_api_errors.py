"""The OpenAI-compatible server on a fake engine: bad input is an OpenAI-style 4xx, and the server keeps serving."""

from __future__ import annotations

import json

import pytest

from kvbridge.serving.api import validation_message
from tests.fake_engine import MAX_MODEL_LEN, MODEL, assert_error, chat_body

pytestmark = pytest.mark.anyio


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
