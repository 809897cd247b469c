"""`--api-key`: every route but /health and /metrics requires `Authorization: Bearer <key>`.

A pure ASGI middleware rather than a route dependency, so the key is checked before anything
else -- a request with a bad key gets 401 even when its body is malformed -- and streaming
responses pass through untouched. /health and /metrics stay open for probes and scrapers; the
API's own description (/docs, /openapi.json) does not. The scheme's name is case-insensitive
(RFC 7235), the key is not.
"""

from __future__ import annotations

import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ktinject.server.errors import error_body

OPEN_PATHS = ("/health", "/metrics")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(
                given.strip(), self.expected
            ):
                body = error_body(
                    "Invalid or missing API key; send the key given to --api-key as "
                    "'Authorization: Bearer <key>'.",
                    type_="invalid_request_error",
                    code="invalid_api_key",
                )
                response = JSONResponse(
                    body, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
