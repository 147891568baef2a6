"""Running a prepared request and building its answer: one JSON body or an SSE stream
(chunks, usage, logprobs, ``[DONE]``), with the request aborted if its client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvbridge.config import Config
from kvbridge.engine.async_engine import AsyncEngine, EngineDeadError
from kvbridge.engine.request import FinishReason, RequestError, RequestOutput
from kvbridge.serving.errors import APIError
from kvbridge.serving.metrics import Metrics
from kvbridge.serving.prepare import Prepared, RequestPreparer
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
    UsageInfo,
)

T = TypeVar("T")


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


class OpenAIServing(RequestPreparer):
    def __init__(self, engine: AsyncEngine, config: Config, metrics: Metrics) -> None:
        super().__init__(engine, config)
        self.metrics = metrics

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
