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
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ktinject.errors import ContextLengthError, KtinjectError

log = logging.getLogger("ktinject.server")

CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}


class RequestError(KtinjectError):
    """A request the server refuses (HTTP 400); `param` names the request field at fault and
    `code` is OpenAI's code for the problem, if it has one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


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
    if isinstance(exc, RequestError):
        body = error_body(str(exc), type_="invalid_request_error", param=exc.param, code=exc.code)
        return 400, body
    if isinstance(exc, KtinjectError):
        return 400, error_body(str(exc), type_="invalid_request_error")
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
        param = None
        if first.get("type") == "json_invalid":
            problem = first.get("ctx", {}).get("error", "malformed")
            message = f"The request body is not valid JSON ({problem} at character {loc[0]})."
        elif not loc:  # the body as a whole
            message = _body_problem(request, first)
        else:
            param = ".".join(loc)
            message = f"{param}: {first.get('msg', 'invalid value')}."
        body = error_body(message, type_="invalid_request_error", param=param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        message = _routing_problem(request, exc) or str(exc.detail)
        body = error_body(message, type_=type_, code=CODES.get(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(exc, prompt_param="messages")


JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def _body_problem(request: Request, error: dict[str, Any]) -> str:
    """What is wrong with a body that is not a JSON object at all."""
    fix = "send a JSON object with 'Content-Type: application/json'"
    content_type = request.headers.get("content-type", "")
    if error.get("type") == "missing":
        return f"The request body is empty; {fix}."
    if "json" not in content_type:  # then the body was not read as JSON
        sent = f"'Content-Type: {content_type}'" if content_type else "no Content-Type"
        return f"The request body came with {sent}; {fix}."
    value = error.get("input")
    kind = "null" if value is None else JSON_KINDS.get(type(value), type(value).__name__)
    return f"The request body is {kind}, not a JSON object; {fix}."


def _routing_problem(request: Request, exc: HTTPException) -> str | None:
    """A sentence for Starlette's own 404 / 405 / unparsable-body errors; None for others."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        routes = [
            f"{method} {route.path}"
            for route in request.app.routes
            if isinstance(route, APIRoute)
            for method in sorted(route.methods)
        ]
        return f"There is no {where} on this server; it serves {', '.join(routes)}."
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        return f"{where} is not served; {request.url.path} takes {allowed}."
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return "The request body could not be parsed as JSON (invalid UTF-8, or nested too deeply)."
    return None
