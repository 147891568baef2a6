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
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvbridge.config import Config
from kvbridge.engine.async_engine import AsyncEngine, EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams
from kvbridge.serving.metrics import Metrics
from kvbridge.serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

log = logging.getLogger("kvbridge.api")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """A refusal with an HTTP status and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _error_type(status)


def _error_type(status: int) -> str:
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "internal_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error"


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type or _error_type(status), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple)\[.*\]|[A-Z]\w*|function-\w+\[.*\])$")


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic/FastAPI errors into one readable sentence and the offending param."""
    items: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if loc[:1] == ("body",):
            loc = loc[1:]
        if e.get("type") == "json_invalid":
            where = f" (at character {loc[0]})" if loc and isinstance(loc[0], int) else ""
            detail = (e.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON: {detail}{where}".rstrip(": "), None
        if not loc and e.get("type") == "missing":
            return "the request body is missing: send a JSON object", None
        if not loc and isinstance(e.get("input"), (bytes, bytearray)):
            return "the request body must be JSON: send it with Content-Type: application/json", None
        if not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return "the request body must be a JSON object", None
        items.append((tuple(x for x in loc if not (isinstance(x, str) and _UNION_TAG.match(x))), e))
    # a union reports one error per member: keep the deepest, drop those on a prefix of another
    kept = [(p, e) for p, e in items if not any(len(q) > len(p) and q[: len(p)] == p for q, _ in items)]
    seen: set[tuple[Any, ...]] = set()
    parts: list[str] = []
    for path, e in kept:
        if path in seen:
            continue
        seen.add(path)
        name = ".".join(str(x) for x in path) or "body"
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "missing":
            parts.append(f"{name} is required")
        elif path and msg.startswith(f"{path[-1]} "):  # our validators name the field themselves
            parts.append(f"{name}{msg[len(str(path[-1])) :]}" if len(path) > 1 else msg)
        else:
            parts.append(f"{name}: {msg[0].lower() + msg[1:] if msg else msg}")
    param = ".".join(str(x) for x in kept[0][0]) if kept and kept[0][0] else None
    return "; ".join(parts[:4]) or "invalid request", param


# --------------------------------------------------------------------------- request prep


@dataclass
class Prepared:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float


@dataclass
class Tracker:
    """Per-request timing and token counts, turned into metrics when the request ends."""

    metrics: Metrics
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    num_output_tokens: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    text: list[str] = field(default_factory=list)

    def started(self) -> None:
        self.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def add(self, out: RequestOutput) -> None:
        n = len(out.new_token_ids)
        if n and self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.time_to_first_token.observe(self.first_token - self.arrival)
        if n:
            self.metrics.generation_tokens.inc(n)
        self.num_output_tokens = max(self.num_output_tokens + n, out.num_output_tokens)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        if out.finished:
            self.finished, self.finish_reason, self.error = True, out.finish_reason, out.error
            end = time.perf_counter()
            self.metrics.e2e_latency.observe(end - self.arrival)
            if self.first_token is not None and self.num_output_tokens > 1:
                self.metrics.time_per_output_token.observe((end - self.first_token) / (self.num_output_tokens - 1))

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            total_tokens=self.num_prompt_tokens + self.num_output_tokens,
        )


def finish_reason_str(reason: FinishReason | None) -> str | None:
    return reason.value if reason is not None else None


M = TypeVar("M", bound=BaseModel)


async def parse_body(raw: Request, model: type[M]) -> M:
    """The JSON body as ``model``, whatever the Content-Type (``curl -d`` sends a form type)."""
    body = await raw.body()
    if not body.strip():
        raise APIError(400, "the request body is missing: send a JSON object")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (at character {e.pos})") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid JSON: it is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not a JSON {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise APIError(400, message, param=param) from None


class _ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then it is cancelled and
    ``_ClientGone`` raised)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            try:
                await work
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass
        watch.cancel()
    if work.cancelled():
        raise _ClientGone()
    return work.result()


class _SSEResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends (done,
    client gone, server error), so an unfinished request is always aborted."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


# --------------------------------------------------------------------------- the serving logic


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, config: Config, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    # ---------------------------------------------------------------- validation
    def _check_common(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(
                404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip
        if req.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {req.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported; leave it out or set it to 0", param=name)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported; leave it out", param="logit_bias")
        if not self.engine.healthy:
            raise APIError(503, f"the engine is unavailable: {self.engine.error}")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.top_logprobs not in (None, 0):
            raise APIError(
                400, "top_logprobs must be 0: only the chosen token's logprob is available", param="top_logprobs"
            )
        if not req.messages:
            raise APIError(400, "messages must not be empty: send at least one message", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template refusing the conversation is the client's to fix
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return self._encode(text, add_special_tokens=False)

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        if req.logprobs not in (None, 0, 1):
            raise APIError(
                400, "logprobs must be 0 or 1: only the chosen token's logprob is available", param="logprobs"
            )
        if req.echo:
            raise APIError(400, "echo is not supported; leave it out or set it to false", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported; leave it out", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(
                    400,
                    f"batched prompts are not supported: send one prompt per request (got {len(p)})",
                    param="prompt",
                )
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError(400, "prompt must not be empty", param="prompt")
            return self._encode(p, add_special_tokens=True)
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = getattr(self.engine.tokenizer, "vocab_size", None)
        if vocab and any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(p)

    def _sampling_params(
        self, req: ChatCompletionRequest | CompletionRequest, num_prompt: int, logprobs: bool
    ) -> SamplingParams:
        ctx = self.engine.max_model_len
        server = self.config.server
        param = req.max_tokens_param()
        if num_prompt >= ctx:
            raise APIError(
                400, f"the prompt has {num_prompt} tokens but this model's context is {ctx} tokens; shorten the prompt",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt", code="context_length_exceeded",
            )  # fmt: skip
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = min(server.max_tokens_default, ctx - num_prompt)
        elif max_tokens <= 0:
            raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
        elif max_tokens > server.max_tokens_limit:
            raise APIError(
                400, f"{param} is {max_tokens}, over this server's limit of {server.max_tokens_limit}", param=param
            )
        elif num_prompt + max_tokens > ctx:
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens, but {num_prompt + max_tokens} were requested "
                f"({num_prompt} in the prompt, {max_tokens} to generate); shorten the prompt or lower {param}",
                param=param, code="context_length_exceeded",
            )  # fmt: skip
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                seed=req.seed,
                stop=req.stop_list(),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except RequestError as e:
            raise APIError(400, str(e)) from None

    def prepare_chat(self, req: ChatCompletionRequest, arrival: float) -> Prepared:
        self._check_common(req)
        ids = self._chat_prompt(req)
        params = self._sampling_params(req, len(ids), logprobs=req.logprobs)
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", ids, params, arrival)

    def prepare_completion(self, req: CompletionRequest, arrival: float) -> Prepared:
        self._check_common(req)
        ids = self._completion_prompt(req)
        params = self._sampling_params(req, len(ids), logprobs=req.logprobs is not None)
        return Prepared(f"cmpl-{uuid.uuid4().hex}", ids, params, arrival)

    # ---------------------------------------------------------------- running
    async def _start(self, raw: Request, prep: Prepared) -> tuple[AsyncIterator[RequestOutput], RequestOutput, Tracker]:
        """Submit and wait for the first output (so engine refusals become a 4xx before any
        byte is sent). Raises ``_ClientGone`` if the client leaves meanwhile (request aborted)."""
        gen = self.engine.generate(prep.request_id, prep.prompt_token_ids, prep.params)
        tracker = Tracker(self.metrics, prep.arrival, len(prep.prompt_token_ids))
        try:
            first = await until_disconnect(raw, gen.__anext__())
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine is unavailable: {e}") from None
        except StopAsyncIteration:  # cannot happen: the engine always sends a finished output
            raise APIError(500, "the engine ended the request without an answer") from None
        except BaseException:
            await gen.aclose()
            raise
        tracker.started()
        tracker.add(first)
        return gen, first, tracker

    async def _collect(self, raw: Request, prep: Prepared) -> tuple[Tracker, list[int], list[float]]:
        gen, first, tracker = await self._start(raw, prep)
        token_ids, logprobs = list(first.new_token_ids), list(first.new_logprobs or [])
        tracker.text.append(first.new_text)

        async def rest() -> None:
            async for out in gen:
                tracker.add(out)
                token_ids.extend(out.new_token_ids)
                logprobs.extend(out.new_logprobs or [])
                tracker.text.append(out.new_text)

        try:
            if not first.finished:
                await until_disconnect(raw, rest())
        finally:
            await gen.aclose()
        if tracker.finish_reason == FinishReason.ERROR or tracker.error:
            if not self.engine.healthy:
                raise APIError(503, f"the engine is unavailable: {tracker.error or self.engine.error}")
            raise APIError(500, f"the engine failed on this request: {tracker.error or 'unknown error'}")
        return tracker, token_ids, logprobs

    def _token_str(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float]) -> ChatLogprobs:
        content = []
        for tid, lp in zip(token_ids, logprobs, strict=False):
            tok = self._token_str(tid)
            content.append(ChatTokenLogprob(token=tok, logprob=lp, bytes=list(tok.encode("utf-8"))))
        return ChatLogprobs(content=content)

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[float], offset: int, top: bool
    ) -> CompletionLogprobs:
        toks = [self._token_str(t) for t in token_ids[: len(logprobs)]]
        offsets = []
        for t in toks:
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(
            tokens=toks,
            token_logprobs=list(logprobs[: len(toks)]),
            text_offset=offsets,
            top_logprobs=[{t: lp} for t, lp in zip(toks, logprobs, strict=False)] if top else None,
        )

    # ---------------------------------------------------------------- chat
    async def chat(self, raw: Request, req: ChatCompletionRequest, prep: Prepared) -> Response:
        if req.stream:
            return await self._chat_stream(raw, req, prep)
        tracker, token_ids, logprobs = await self._collect(raw, prep)
        body = ChatCompletionResponse(
            id=prep.request_id,
            model=self.model_name,
            choices=[
                ChatCompletionChoice(
                    message=ChatResponseMessage(content="".join(tracker.text)),
                    logprobs=self._chat_logprobs(token_ids, logprobs) if req.logprobs else None,
                    finish_reason=finish_reason_str(tracker.finish_reason),
                )
            ],
            usage=tracker.usage(),
        )
        return JSONResponse(body.model_dump(mode="json"))

    async def _chat_stream(self, raw: Request, req: ChatCompletionRequest, prep: Prepared) -> Response:
        gen, first, tracker = await self._start(raw, prep)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        rid, created, model = prep.request_id, int(time.time()), self.model_name

        def chunk(delta: DeltaMessage, finish: str | None = None, logprobs: ChatLogprobs | None = None) -> bytes:
            c = ChatCompletionChunk(
                id=rid, created=created, model=model,
                choices=[ChatCompletionStreamChoice(delta=delta, logprobs=logprobs, finish_reason=finish)],
            )  # fmt: skip
            d = c.model_dump(mode="json", exclude=None if include_usage else {"usage"})
            d["choices"][0]["delta"] = {k: v for k, v in d["choices"][0]["delta"].items() if v is not None}
            return sse(_dumps(d))

        def render(out: RequestOutput) -> list[bytes]:
            parts = []
            lps = self._chat_logprobs(out.new_token_ids, out.new_logprobs or []) if req.logprobs else None
            if out.new_text or (lps is not None and lps.content):
                parts.append(chunk(DeltaMessage(content=out.new_text), logprobs=lps))
            if out.finished:  # OpenAI sends the finish reason in a chunk of its own
                parts.append(chunk(DeltaMessage(), finish=finish_reason_str(out.finish_reason)))
            return parts

        def usage() -> bytes:
            c = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=tracker.usage())
            return sse(c.model_dump_json())

        head = [chunk(DeltaMessage(role="assistant", content=""))]
        return self._sse(raw, prep, gen, first, tracker, render, head, usage if include_usage else None)

    def _sse(
        self,
        raw: Request,
        prep: Prepared,
        gen: AsyncIterator[RequestOutput],
        first: RequestOutput,
        tracker: Tracker,
        render: Callable[[RequestOutput], list[bytes]],
        head: list[bytes],
        usage: Callable[[], bytes] | None,
    ) -> Response:
        """The SSE stream: ``head``, each output rendered, an error event if the engine
        failed, the usage chunk if asked, ``[DONE]``. The request is aborted if the stream
        ends early for any reason (client gone, cancellation, server error)."""

        def events(out: RequestOutput) -> list[bytes]:
            if out.error or out.finish_reason == FinishReason.ERROR:
                info = ErrorInfo(message=f"the engine failed on this request: {out.error}", type="internal_error")
                return [sse(ErrorResponse(error=info).model_dump_json())]
            return render(out)

        async def body() -> AsyncIterator[bytes]:
            try:
                for part in head + events(first):
                    yield part
                if not first.finished:
                    async for out in gen:
                        tracker.add(out)
                        for part in events(out):
                            yield part
                        if await raw.is_disconnected():
                            return
                if usage is not None:
                    yield usage()
                yield b"data: [DONE]\n\n"
            finally:
                await gen.aclose()

        rid = prep.request_id
        return _SSEResponse(body(), on_close=lambda: None if tracker.finished else self.engine.abort(rid))

    # ---------------------------------------------------------------- completions
    async def completion(self, raw: Request, req: CompletionRequest, prep: Prepared) -> Response:
        if req.stream:
            return await self._completion_stream(raw, req, prep)
        tracker, token_ids, logprobs = await self._collect(raw, prep)
        lp = self._completion_logprobs(token_ids, logprobs, 0, bool(req.logprobs)) if req.logprobs is not None else None
        body = CompletionResponse(
            id=prep.request_id,
            model=self.model_name,
            choices=[
                CompletionChoice(
                    text="".join(tracker.text), logprobs=lp, finish_reason=finish_reason_str(tracker.finish_reason)
                )
            ],
            usage=tracker.usage(),
        )
        return JSONResponse(body.model_dump(mode="json"))

    async def _completion_stream(self, raw: Request, req: CompletionRequest, prep: Prepared) -> Response:
        gen, first, tracker = await self._start(raw, prep)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        rid, created, model = prep.request_id, int(time.time()), self.model_name
        offset = 0  # characters sent so far (logprobs' text_offset)

        def chunk(text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None) -> bytes:
            c = CompletionResponse(
                id=rid, created=created, model=model,
                choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],
            )  # fmt: skip
            return sse(c.model_dump_json(exclude=None if include_usage else {"usage"}))

        def render(out: RequestOutput) -> list[bytes]:
            nonlocal offset
            parts = []
            lps = None
            if req.logprobs is not None:
                lps = self._completion_logprobs(out.new_token_ids, out.new_logprobs or [], offset, bool(req.logprobs))
            if out.new_text or (lps is not None and lps.tokens):
                parts.append(chunk(out.new_text, logprobs=lps))
            offset += len(out.new_text)
            if out.finished:
                parts.append(chunk("", finish=finish_reason_str(out.finish_reason)))
            return parts

        def usage() -> bytes:
            c = CompletionResponse(id=rid, created=created, model=model, choices=[], usage=tracker.usage())
            return sse(c.model_dump_json())

        return self._sse(raw, prep, gen, first, tracker, render, [], usage if include_usage else None)


def _dumps(d: Any) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- the app


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

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions"
            )
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

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
