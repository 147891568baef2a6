"""The OpenAI-compatible HTTP API: ``build_app(async_engine, config) -> FastAPI``.

Routes: ``/v1/chat/completions``, ``/v1/completions`` (SSE streaming or one JSON answer, with
``usage``), ``/v1/models``, ``/health`` (503 once the engine failed), ``/metrics``.

Every refusal is an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status that says what to change; FastAPI's 422 becomes a 400 of that shape.

Request lifetime: a request is aborted (its KV blocks freed) as soon as its client goes away,
while it waits for its first token, while it streams, or while a non-streaming answer is built.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvbridge.config import Config
from kvbridge.engine.async_engine import AsyncEngine
from kvbridge.serving.errors import (
    APIError,
    error_response,
    install_error_handlers,
    validation_message,
)
from kvbridge.serving.metrics import Metrics
from kvbridge.serving.prepare import Prepared, parse_body
from kvbridge.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ModelCard,
    ModelList,
)
from kvbridge.serving.responses import (
    OpenAIServing,
    Tracker,
    _ClientGone,
    _SSEResponse,
    finish_reason_str,
    sse,
    until_disconnect,
)

__all__ = [
    "ENDPOINTS",
    "APIError",
    "OpenAIServing",
    "Prepared",
    "Tracker",
    "_ClientGone",
    "_SSEResponse",
    "build_app",
    "error_response",
    "finish_reason_str",
    "parse_body",
    "sse",
    "until_disconnect",
    "validation_message",
]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: ``kvbridge_requests_total{endpoint, status}`` for every HTTP request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


def build_app(async_engine: AsyncEngine, config: Config) -> FastAPI:
    """The HTTP app around a (started or not) AsyncEngine. The app's lifespan starts the
    engine thread and shuts it down; callers that skip the lifespan start it themselves."""
    metrics = Metrics()
    serving = OpenAIServing(async_engine, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(
        title="kvbridge", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, strict_content_type=False
    )
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.config = config
    app.add_middleware(_CountRequests, metrics=metrics)
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        arrival = time.perf_counter()
        req = await parse_body(raw, ChatCompletionRequest)
        prep = serving.prepare_chat(req, arrival)
        try:
            return await serving.chat(raw, req, prep)
        except _ClientGone:
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        arrival = time.perf_counter()
        req = await parse_body(raw, CompletionRequest)
        prep = serving.prepare_completion(req, arrival)
        try:
            return await serving.completion(raw, req, prep)
        except _ClientGone:
            return Response(status_code=499)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=serving.model_name, max_model_len=async_engine.max_model_len)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        if model_id != serving.model_name:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; this server serves {serving.model_name!r}",
                code="model_not_found",
            )
        return ModelCard(id=serving.model_name, max_model_len=async_engine.max_model_len)

    @app.get("/health")
    async def health() -> JSONResponse:
        if async_engine.healthy:
            return JSONResponse({"status": "ok"})
        info = ErrorInfo(message=f"the engine is unavailable: {async_engine.error}", type="service_unavailable")
        return JSONResponse({"status": "unhealthy", "error": info.model_dump()}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.update_engine(async_engine.stats(), async_engine.healthy)
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
