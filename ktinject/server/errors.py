"""OpenAI-style error bodies, and the handlers that make every failure one of them.

Clients (the `openai` package among them) expect `{"error": {"message", "type", "param",
"code"}}`. Bad input is a 400 -- FastAPI's 422 for validation errors and malformed JSON is
replaced -- a `KtinjectError` is a 400 with its one-sentence message, anything else a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ktinject.errors import ContextLengthError, KtinjectError

log = logging.getLogger("ktinject.server")

CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}


class RequestError(KtinjectError):
    """A request the server refuses (HTTP 400); `param` names the request field at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: Exception, *, prompt_param: str) -> tuple[int, dict[str, Any]]:
    """Status and body for an exception raised while serving one request. `prompt_param` is the
    field that holds the prompt (`messages` or `prompt`), blamed when the prompt is too long."""
    if isinstance(exc, ContextLengthError):
        param = prompt_param if exc.prompt_tokens >= exc.cache_lens else "max_tokens"
        body = error_body(
            str(exc), type_="invalid_request_error", param=param, code="context_length_exceeded"
        )
        return 400, body
    if isinstance(exc, KtinjectError):
        param = exc.param if isinstance(exc, RequestError) else None
        return 400, error_body(str(exc), type_="invalid_request_error", param=param)
    message = f"Internal error ({type(exc).__name__}: {exc}); see the server log."
    return 500, error_body(message, type_="server_error")


def error_response(exc: Exception, *, prompt_param: str) -> JSONResponse:
    status, body = describe(exc, prompt_param=prompt_param)
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Route validation errors, HTTP errors and crashes through `error_body`."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            problem = first.get("ctx", {}).get("error", "malformed")
            message = f"The request body is not valid JSON ({problem} at character {loc[0]})."
            param = None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'The request body'}: {first.get('msg', 'invalid value')}."
        body = error_body(message, type_="invalid_request_error", param=param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        body = error_body(str(exc.detail), type_=type_, code=CODES.get(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(exc, prompt_param="messages")
