"""A request inside the engine: its tokens, its blocks, its sampling settings.

There is no prefill or decode phase: a request has ``num_computed_tokens`` and
``num_tokens``; whatever lies between them is work for the next step. KV that arrives
from a peer engine simply moves ``num_computed_tokens`` forward.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request that cannot be served as asked; the message is for the client."""


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or asked to stop
    ERROR = "error"  # the engine could not finish it (message in RequestOutput.error)


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no blocks
    WAITING_FOR_REMOTE_KV = enum.auto()  # holds blocks; a peer is writing its prompt KV
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each chosen token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[float] | None = None
    error: str | None = None
    kv_block_ids: list[int] | None = None  # set when the engine holds the prompt's KV (hold_kv)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_committed_blocks: int = 0  # full blocks already hashed into the pool
    last_block_hash: int | None = None
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    generator: object | None = None  # torch.Generator when seeded
    hold_kv: bool = False  # prefill side: keep the prompt's blocks after finishing, for a transfer

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
