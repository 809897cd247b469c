"""The FastAPI application: routes, error handling, metrics and the scheduler's lifetime.

`create_app` needs only an engine and a tokenizer, so tests and benchmarks build a server without
the CLI; the scheduler's worker thread starts and stops with the app (ASGI lifespan).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ktinject.engine import Engine
from ktinject.prompt_tokens import PromptTokenizer
from ktinject.server.auth import APIKeyMiddleware
from ktinject.server.config import ServeConfig
from ktinject.server.errors import error_body, install_error_handlers
from ktinject.server.formats import ChatFormat, CompletionFormat
from ktinject.server.handler import Handler
from ktinject.server.metrics import ServerMetrics
from ktinject.server.prompts import chat_prompt, completion_prompt
from ktinject.server.scheduler import Scheduler
from ktinject.server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

CHAT = ChatFormat()
COMPLETION = CompletionFormat()


def create_app(engine: Engine, tokenizer: Any, config: ServeConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (built with `cache_lens` and `num_slots`)."""
    config = config or ServeConfig()
    metrics = ServerMetrics(engine.num_slots)
    scheduler = Scheduler(engine, metrics, prefix_reuse=config.prefix_reuse)
    handler = Handler(engine, tokenizer, scheduler, metrics, config)
    # the conversations that may hold a slot, and as many more that may come back to one
    prompts = PromptTokenizer(tokenizer, capacity=2 * engine.num_slots)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(scheduler.start)
        try:
            yield
        finally:
            handler.close()
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="ktinject", lifespan=lifespan)
    install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with either
    async def health() -> JSONResponse:
        alive = scheduler.thread.is_alive()
        status = {"status": "ok" if alive else "scheduler stopped"}
        return JSONResponse(status, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    card = ModelCard(id=config.model_name, created=started)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}")  # ids may hold slashes (org/name)
    async def model(model_id: str) -> Response:
        if model_id == card.id:
            return JSONResponse(card.model_dump())
        message = f"There is no model {model_id!r} here; this server serves {card.id!r}."
        body = error_body(message, type_="invalid_request_error", code="model_not_found")
        return JSONResponse(body, status_code=404)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await handler.handle(
            request, body, CHAT, lambda: chat_prompt(prompts, body.messages, engine.cache_lens)
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await handler.handle(
            request, body, COMPLETION, lambda: completion_prompt(engine, tokenizer, body.prompt)
        )

    return app
