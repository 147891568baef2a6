"""Request preparation: the JSON body parsed, validated, and turned into prompt token ids
and ``SamplingParams`` (``Prepared``), with a 4xx ``APIError`` for anything refused."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvbridge.config import Config
from kvbridge.engine.async_engine import AsyncEngine
from kvbridge.engine.request import RequestError, SamplingParams
from kvbridge.serving.errors import APIError, validation_message
from kvbridge.serving.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Prepared:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float


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


class RequestPreparer:
    """Validates requests against the engine and config and prepares them for the engine."""

    def __init__(self, engine: AsyncEngine, config: Config) -> None:
        self.engine = engine
        self.config = config

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
