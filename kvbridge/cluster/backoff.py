"""Retry helpers: capped exponential backoff, one-line error text, a cancel that sticks."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """``next()`` gives initial, 2×, 4×, ... up to ``cap`` seconds (±10 % jitter); ``reset()`` after
    a success."""

    initial: float = 0.25
    cap: float = 5.0
    factor: float = 2.0
    jitter: float = 0.1
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"Backoff needs 0 < initial <= cap, got initial={self.initial} cap={self.cap}")

    def next(self) -> float:
        delay = min(self.cap, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.attempts = 0


def one_line(error: BaseException, limit: int = 200) -> str:
    """``ErrorType: first line of the message``, cut to ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    out = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return out if len(out) <= limit else out[: limit - 1] + "…"


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait for it, cancelling again if a library swallowed the first one
    (grpc/aetcd code and Python 3.11's ``asyncio.wait_for`` can lose a cancellation)."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if task is not None and not task.cancelled() and task.exception() is not None:
        log.debug("background task %s ended with %s", task.get_name(), one_line(task.exception()))
