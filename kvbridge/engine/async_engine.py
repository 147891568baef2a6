"""AsyncEngine: the engine's step loop in one background thread, for asyncio callers.

``LLMEngine`` is not thread-safe, so exactly one thread (the *engine thread*) touches it.
Callers on any event loop talk to that thread through two channels:

  inbox   (caller → engine)  add / abort commands, applied between steps, in order
  queues  (engine → caller)  one ``asyncio.Queue`` per request, fed with
                             ``loop.call_soon_threadsafe`` once per step

The engine thread sleeps on a condition variable while there is no work (no busy-wait).

Contracts:
  - ``generate()`` yields the request's deltas until one is ``finished``. A ``RequestError``
    from ``add_request`` is raised to the caller at the first ``async for`` iteration.
  - A caller that stops iterating early (break, cancellation, client disconnect) aborts the
    request: the engine frees its blocks before its next step.
  - If the engine thread raises, every open request gets a finished output with
    ``finish_reason=ERROR`` and ``error`` set, ``healthy`` turns False, and further
    ``generate()`` calls raise ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvbridge.engine.request import FinishReason, RequestError, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from kvbridge.engine.engine import LLMEngine
    from kvbridge.transfer.connector import KVConnector

log = logging.getLogger("kvbridge.async_engine")


# With no step to run but transfers in flight, the engine thread sleeps in the transceiver's
# own wait (woken by peer messages, and by _submit) this long at most before it looks at its
# inbox again.
IDLE_TRANSFER_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread failed or was shut down; no request can be served."""


@dataclass
class _Stream:
    """The caller's side of one request: its loop and the queue the engine thread feeds."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class _Add:
    stream: _Stream
    prompt_token_ids: list[int]
    params: SamplingParams
    hold_kv: bool = False
    submit: Callable[[], None] | None = None  # replaces add_request (e.g. a remote prefill)


@dataclass
class _Call:
    """Run ``fn`` on the engine thread; its result (or exception) resolves ``future``."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class _Abort:
    request_id: str


def _error_output(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", finished=True, finish_reason=FinishReason.ERROR, error=message)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, connector: KVConnector | None = None) -> None:
        self.engine = engine
        self.connector = connector  # disaggregation: polled once per loop, owns aborts of its requests
        self._cv = threading.Condition()
        self._inbox: list[_Add | _Abort | _Call] = []  # guarded by _cv
        self._stopping = False  # guarded by _cv
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._stats: Any = engine.stats()  # snapshot, replaced after each step

    # ------------------------------------------------------------------ engine facts (read-only)
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer. Encoding and decoding are safe from any thread."""
        return self.engine.tokenizer

    def stats(self) -> Any:
        """The engine's ``EngineStats`` as of the end of its last step."""
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def error(self) -> str | None:
        """Why the engine is unhealthy (None while healthy)."""
        if self._error is not None:
            return self._error
        if self._stopping:
            return "the engine is shut down"
        if self._thread is not None and not self._thread.is_alive():
            return "the engine thread is not running"
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._cv:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="kvbridge-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; open requests get an error output."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if self.connector is not None:
            self.connector.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ caller API (any thread / loop)
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        hold_kv: bool = False,
        submit: Callable[[], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas until the finished one. ``submit``, run on
        the engine thread, replaces ``engine.add_request`` (it must queue the request)."""
        if self._thread is None:
            self.start()
        stream = _Stream(request_id, asyncio.get_running_loop())
        self._submit(_Add(stream, list(prompt_token_ids), params, hold_kv, submit))
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True  # never entered the engine
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished). Never blocks on the engine."""
        try:
            self._submit(_Abort(request_id))
        except EngineDeadError:
            pass

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread between steps and return its result."""
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(_Call(fn, loop, fut))
        return await fut

    def _submit(self, cmd: _Add | _Abort | _Call) -> None:
        with self._cv:
            if self._error is not None or self._stopping:
                raise EngineDeadError(self.error or "the engine is not running")
            self._inbox.append(cmd)
            self._cv.notify()
        if self.connector is not None:
            self.connector.wake()  # the engine thread may be sleeping in the transceiver's wait

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        has_work = False
        try:
            while True:
                transfers_only = False
                with self._cv:
                    while not self._inbox and not has_work and not self._stopping:
                        if self.connector is not None and self.connector.busy:
                            transfers_only = True  # nothing to compute, transfers in flight
                            break
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._inbox = self._inbox, []
                if transfers_only and not commands:
                    self.connector.wait(IDLE_TRANSFER_WAIT_S)  # sleeps until a peer nudges us
                self._apply(commands)  # between steps
                if self.connector is not None:
                    self.connector.poll()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step(self.connector.mid_step_hook() if self.connector is not None else None)
                    if self.connector is not None:
                        self.connector.on_outputs(outputs)
                    self._dispatch(outputs)
                has_work = self.engine.has_unfinished_requests()
                self._stats = self.engine.stats()
            self._fail_all("the server is shutting down")
        except BaseException as e:  # noqa: BLE001 - any failure makes the engine unusable
            log.exception("engine thread failed")
            with self._cv:
                self._error = f"engine failed: {type(e).__name__}: {e}"
            self._fail_all(self._error)

    def _apply(self, commands: list[_Add | _Abort | _Call]) -> None:
        for cmd in commands:
            if isinstance(cmd, _Call):
                try:
                    result, error = cmd.fn(), None
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    result, error = None, e
                cmd.loop.call_soon_threadsafe(_resolve, cmd.future, result, error)
                continue
            if isinstance(cmd, _Abort):
                if self._streams.pop(cmd.request_id, None) is not None:
                    if self.connector is None or not self.connector.abort(cmd.request_id):
                        self.engine.abort_request(cmd.request_id)
                continue
            rid = cmd.stream.request_id
            try:
                if rid in self._streams:
                    raise RequestError(f"request id {rid!r} is already in use")
                if cmd.submit is not None:
                    cmd.submit()
                else:
                    if cmd.hold_kv:
                        self.engine.add_request(rid, cmd.prompt_token_ids, cmd.params, hold_kv=True)
                    else:
                        self.engine.add_request(rid, cmd.prompt_token_ids, cmd.params)
            except RequestError as e:
                self._post({cmd.stream.loop: [(cmd.stream, e)]})
                continue
            except Exception as e:  # noqa: BLE001 - this request's problem, not the engine's
                log.exception("add_request(%s) failed", rid)
                self._post({cmd.stream.loop: [(cmd.stream, e)]})
                continue
            self._streams[rid] = cmd.stream

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._streams[out.request_id]
            batches[stream.loop].append((stream, out))
        self._post(batches)

    def _post(self, batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]]) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for stream, _ in items:
                    if self._streams.pop(stream.request_id, None) is not None:
                        self.engine.abort_request(stream.request_id)

    def _fail_all(self, message: str) -> None:
        """Finish every open and queued request with an error output; free what the engine holds."""
        with self._cv:
            commands, self._inbox = self._inbox, []
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = defaultdict(list)
        for cmd in commands:
            if isinstance(cmd, _Add):
                batches[cmd.stream.loop].append((cmd.stream, EngineDeadError(message)))
            elif isinstance(cmd, _Call):
                try:
                    cmd.loop.call_soon_threadsafe(_resolve, cmd.future, None, EngineDeadError(message))
                except RuntimeError:
                    pass
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            try:
                self.engine.abort_request(rid)  # best effort: the engine may be broken
            except Exception:  # noqa: BLE001
                pass
            batches[stream.loop].append((stream, _error_output(rid, message)))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass
        try:
            self._stats = self.engine.stats()
        except Exception:  # noqa: BLE001
            pass


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(items: list[tuple[_Stream, Any]]) -> None:
    """Runs on the caller's loop."""
    for stream, item in items:
        stream.queue.put_nowait(item)
