"""OpenAI-style errors: ``APIError``, the ``{"error": {...}}`` bodies, the exception
handlers, and the conversion of pydantic/FastAPI validation errors (422) into a readable 400."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvbridge.serving.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("kvbridge.api")


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


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal becomes an OpenAI-style error body; FastAPI's 422 becomes a 400."""

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
