"""Frontend ↔ worker messages (HTTP bodies), and the one place where they are serialized.

    frontend ──GenerateRequest──▶ decode worker  POST /internal/generate  ──▶ NDJSON of Delta
    decode   ──PrefillRequest───▶ prefill worker POST /internal/prefill   ──▶ PrefillResponse
    any refusal: WorkerError with a 4xx/5xx status

Every message is a msgspec Struct with a version field ``v``; ``decode`` refuses another
version with one line naming both. JSON on the wire (readable with curl), one Delta per line.
"""

from __future__ import annotations

import enum
from typing import TypeVar

import msgspec

from kvbridge.engine.request import FinishReason, RequestOutput, SamplingParams

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be decoded, or of another protocol version."""


class Msg(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION


class Sampling(msgspec.Struct, kw_only=True):
    """``SamplingParams`` on the wire."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: bool = False

    @classmethod
    def of(cls, p: SamplingParams) -> Sampling:
        return cls(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
            stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, logprobs=p.logprobs,
        )  # fmt: skip

    def params(self, **override: object) -> SamplingParams:
        """The engine's ``SamplingParams`` (raises ``RequestError`` on bad values)."""
        d = {f: getattr(self, f) for f in self.__struct_fields__}
        d.update(override)
        return SamplingParams(**d)  # type: ignore[arg-type]


class PrefillTarget(msgspec.Struct, kw_only=True):
    """The prefill worker the router chose for a request."""

    worker_id: str
    url: str  # its HTTP base URL
    bootstrap: str  # host:port of its transceiver's handshake endpoint


class GenerateRequest(Msg):
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    prefill: PrefillTarget | None = None  # None: prefill on the decode worker itself


class PrefillMode(enum.Enum):
    REMOTE = "remote"  # the prompt's KV came from the prefill worker
    LOCAL = "local"  # the router asked for a local prefill (short prompt, busy prefill pool, none)
    FALLBACK = "fallback"  # a remote prefill was asked for but failed: prefilled here


class Timings(msgspec.Struct, kw_only=True):
    """Time to first token at the decode worker, split (seconds). ``queue``: waiting for an
    engine (decode side, plus the prefill side when remote); ``prefill``: computing the prompt;
    ``transfer``: the KV transfer; ``first_decode``: the rest, until the first token left the
    decode engine (the prefill answer's hop, the decode step that emits it)."""

    queue: float = 0.0
    prefill: float = 0.0
    transfer: float = 0.0
    first_decode: float = 0.0


class Delta(Msg):
    """One ``RequestOutput`` of the decode worker. The first Delta also carries how the prompt
    was prefilled, the prefill worker that failed (the router drops it) and the TTFT split."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prefill_mode: PrefillMode | None = None
    failed_prefill_worker: str | None = None
    timings: Timings | None = None

    @classmethod
    def of(cls, out: RequestOutput, **first: object) -> Delta:
        return cls(
            request_id=out.request_id, token_ids=list(out.new_token_ids), text=out.new_text, finished=out.finished,
            finish_reason=out.finish_reason, logprobs=out.new_logprobs, error=out.error,
            num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens,
            num_cached_tokens=out.num_cached_tokens, **first,  # type: ignore[arg-type]
        )  # fmt: skip

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, new_token_ids=list(self.token_ids), new_text=self.text,
            finished=self.finished, finish_reason=self.finish_reason, num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens, num_cached_tokens=self.num_cached_tokens,
            new_logprobs=self.logprobs, error=self.error,
        )  # fmt: skip


class PrefillRequest(Msg):
    request_id: str  # the same id on both workers: the transceiver pairs the KV by it
    prompt_token_ids: list[int]
    sampling: Sampling  # the first token is sampled with these (max_tokens is ignored)


class PrefillResponse(Msg):
    first_token: int
    logprob: float | None = None
    num_cached_tokens: int = 0
    queue_seconds: float = 0.0  # arrival → in the engine
    seconds: float = 0.0  # in the engine → first token


class ErrorKind(enum.Enum):
    REQUEST = "request"  # the request cannot be served as asked (the client's to fix)
    UNAVAILABLE = "unavailable"  # this worker cannot serve now (try another)


class WorkerError(Msg):
    kind: ErrorKind
    message: str


class WorkerStats(Msg):
    """GET /internal/stats: the engine's pool and queues (tests poll it for leaks)."""

    worker_id: str
    role: str
    num_blocks: int
    num_free_blocks: int
    num_waiting: int
    num_running: int
    num_remote: int
    num_held: int
    transfers_busy: bool = False


M = TypeVar("M", bound=Msg)

_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type, msgspec.json.Decoder] = {
    t: msgspec.json.Decoder(t)
    for t in (GenerateRequest, Delta, PrefillRequest, PrefillResponse, WorkerError, WorkerStats)
}


class _Versioned(msgspec.Struct):
    v: int = 0


_VERSION = msgspec.json.Decoder(_Versioned)


def encode(msg: Msg) -> bytes:
    return _ENCODER.encode(msg)


def encode_line(msg: Msg) -> bytes:
    """One NDJSON line."""
    return _ENCODER.encode(msg) + b"\n"


def decode(data: bytes | str, kind: type[M]) -> M:
    try:
        msg = _DECODERS[kind].decode(data)
    except msgspec.DecodeError as e:
        try:
            v = _VERSION.decode(data).v
        except msgspec.DecodeError:
            v = None
        if v is not None and v != PROTOCOL_VERSION:
            raise ProtocolError(f"{kind.__name__} of protocol version {v}; this kvbridge speaks {PROTOCOL_VERSION}") from None
        raise ProtocolError(f"undecodable {kind.__name__}: {e}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(f"{kind.__name__} of protocol version {msg.v}; this kvbridge speaks {PROTOCOL_VERSION}")
    return msg
