"""Fixtures for the API tests (tests/unit/test_api_*.py): a FakeEngine behind an AsyncEngine and the app."""

from __future__ import annotations

import httpx
import pytest

from kvbridge.config import Config, EngineConfig, ServerConfig
from kvbridge.engine.async_engine import AsyncEngine
from kvbridge.serving.api import build_app
from tests.fake_engine import MODEL, FakeEngine, pool_full, wait_until


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
