"""The real server with the real default model (SmolLM2-135M-Instruct), over real HTTP.

One server per module (the model loads in a few seconds). Every test ends with the KV pool
full again, including after a client that disconnects mid-stream.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from kvbridge.config import Config, EngineConfig, ServerConfig

pytestmark = pytest.mark.slow


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def require_model() -> None:
    """`make` installs the default model; its absence is a broken install, not a skip."""
    from kvbridge.config import default_model_path

    default_model_path()


@pytest.fixture(scope="module")
def server():
    require_model()
    from kvbridge.engine.async_engine import AsyncEngine
    from kvbridge.engine.engine import LLMEngine
    from kvbridge.serving.api import build_app

    config = Config(engine=EngineConfig(kv_cache_memory_mb=32), server=ServerConfig(max_tokens_limit=512))
    engine = LLMEngine(config.engine)
    app = build_app(AsyncEngine(engine), config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: uv.started, 30), "the server did not start"
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield url, engine
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def client(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c
    pool = engine.block_pool
    assert wait_until(lambda: pool.num_free == pool.num_blocks), f"leaked {pool.num_used} KV blocks"


def chat(content: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def stream_text(c: httpx.Client, path: str, body: dict) -> tuple[str, list[dict]]:
    with c.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if path.endswith("chat/completions"):
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    else:
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    return text, chunks


def test_models_and_health(client, server):
    _, engine = server
    assert client.get("/health").json() == {"status": "ok"}
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == engine.model_name == "SmolLM2-135M-Instruct"


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json=chat("What is the capital of France?", max_tokens=20))
    assert r.status_code == 200, r.text
    d = r.json()
    assert "Paris" in d["choices"][0]["message"]["content"]
    u = d["usage"]
    assert u["prompt_tokens"] > 5 and 0 < u["completion_tokens"] <= 20
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_cli_chat_url_asks_the_running_server(client, capsys):
    from kvbridge.cli import main

    question = "What is the capital of France?"
    expected = client.post("/v1/chat/completions", json=chat(question, max_tokens=12)).json()
    url = str(client.base_url)
    assert main(["chat", question, "--url", url, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected["choices"][0]["message"]["content"] + "\n"
    # the server's refusal comes back as one line with its reason
    assert main(["chat", question, "--url", url, "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "answered 400" in err and "max_tokens" in err


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_equals_non_stream_greedy(client, path):
    if path.endswith("chat/completions"):
        body = chat("Write one sentence about the sea.", max_tokens=16)
    else:
        body = {"prompt": "The three primary colors are", "temperature": 0, "max_tokens": 16}
    full = client.post(path, json=body).json()
    choice = full["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    streamed, chunks = stream_text(client, path, body)
    assert streamed == text and text
    assert chunks[-1]["usage"] == full["usage"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]


def test_concurrent_requests_match_sequential(client):
    prompts = ["Count from 1 to 5.", "Name a fruit that is red and round, please."]
    alone = [client.post("/v1/chat/completions", json=chat(p, max_tokens=12)).json() for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(
            ex.map(lambda p: client.post("/v1/chat/completions", json=chat(p, max_tokens=12)).json(), prompts)
        )
    for a, b in zip(alone, together, strict=True):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_disconnect_mid_stream_frees_blocks(client, server):
    _, engine = server
    pool = engine.block_pool
    body = chat("Tell me a long story about a dragon.", max_tokens=400, ignore_eos=True, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: {")
            if got >= 3:
                break
        assert pool.num_free < pool.num_blocks  # the request holds blocks while it streams
    assert wait_until(lambda: pool.num_free == pool.num_blocks and not engine.has_unfinished_requests())
    # the server keeps serving
    assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).status_code == 200


def test_bad_requests_do_not_break_the_server(client, server):
    _, engine = server
    long_prompt = "word " * (engine.max_model_len + 10)
    r = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json=chat("Hi", max_tokens=3))
    assert r.status_code == 200


def test_kvbridge_serve_command(tmp_path):
    """`kvbridge serve` as `make run` starts it: one startup line, serves, stops on SIGINT."""
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    require_model()
    exe = Path(sys.executable).with_name("kvbridge")
    assert exe.exists(), "the kvbridge entry point is installed by `make` (pip install -e .)"
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [str(exe), "serve", "--aggregated", "--port", "0", "--kv-cache-memory-mb", "16"], stdout=f, stderr=subprocess.STDOUT
        )
    try:
        pattern = re.compile(
            r"kvbridge serving model=(\S+) dtype=\S+ .*kv_blocks=\d+ .* on http://127\.0\.0\.1:(\d+)"
        )
        assert wait_until(lambda: pattern.search(log.read_text()) or proc.poll() is not None, 120), log.read_text()
        m = pattern.search(log.read_text())
        assert m, log.read_text()
        url = f"http://127.0.0.1:{m.group(2)}"
        assert wait_until(lambda: _healthy(url), 60), log.read_text()
        r = httpx.post(f"{url}/v1/chat/completions", json=chat("Say hello.", max_tokens=4), timeout=60)
        assert r.status_code == 200 and r.json()["model"] == m.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc in (0, 130), log.read_text()  # 130: stopped by Ctrl-C, after a graceful shutdown
    assert "Application shutdown complete" in log.read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
