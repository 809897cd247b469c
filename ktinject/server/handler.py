"""From a parsed request to an HTTP response: validate, fit the context, submit to the scheduler,
then turn its events into one JSON body or a server-sent-event stream.

Everything that can reject a request -- bad fields, an empty prompt, the context policy -- runs
before it is queued, so it is a plain HTTP error. A stream then starts at once, with the opening
chunk, while the prompt is prefilled: the response's headers and first write overlap the device's
work instead of following the first token (~0.5 ms of a 6 ms first token with a reused 4k
history on a 2-core EPYC). A failure after that, in the scheduler, ends the stream with an error
event in OpenAI's format, as a failure mid-answer does; a request without `stream` waits for the
whole answer and still gets a plain HTTP error. A client that goes away -- detected by polling
every quarter second, or by a write to it failing -- has its request dropped from the scheduler
at once, freeing the slot.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ktinject.engine import Engine
from ktinject.errors import KtinjectError
from ktinject.server.config import ServeConfig
from ktinject.server.context import max_new_tokens_for
from ktinject.server.delivery import Inbox, Mailbox
from ktinject.server.errors import RequestError, describe, error_response
from ktinject.server.formats import Format, Reply, TextChunks
from ktinject.server.metrics import ServerMetrics
from ktinject.server.scheduler import Scheduler
from ktinject.server.schemas import GenerationRequest
from ktinject.server.sequence import Delta, Event, Failed, Finished, Sequence
from ktinject.settings import SamplingParams

log = logging.getLogger("ktinject.server")

POLL_S = 0.25  # how often a request checks that its client is still there
CLIENT_GONE = 499  # status never seen by anyone; recorded for logs (nginx's convention)


class RequestEvents:
    """The events of one submitted request, read on the event loop. `close()` must be called
    when the reader is done: it drops the request from the scheduler unless it finished, and
    counts the request's outcome."""

    def __init__(
        self,
        request: Request,
        seq: Sequence,
        inbox: Inbox,
        scheduler: Scheduler,
        count: Callable[[str], None],
    ) -> None:
        self.request = request
        self.seq = seq
        self.inbox = inbox
        self.scheduler = scheduler
        self.count = count
        self.outcome: str | None = None  # finish reason or "error"; None while running
        self.check_at = time.monotonic() + POLL_S

    async def next(self) -> Event | None:
        """The next event, or None once the client has disconnected. The client is checked
        every `POLL_S` whether or not events arrive: a request without `stream` writes nothing
        until it ends, so only this check frees its slot when its client leaves."""
        event = self.inbox.get_nowait()
        while event is None:
            event = await self.inbox.get(POLL_S)
            if event is None and await self._client_gone():
                return None
        if time.monotonic() >= self.check_at and await self._client_gone():
            return None
        return self._note(event)

    async def _client_gone(self) -> bool:
        self.check_at = time.monotonic() + POLL_S
        return await self.request.is_disconnected()

    def queued(self) -> Event | None:
        """An event that has already arrived, or None."""
        event = self.inbox.get_nowait()
        return None if event is None else self._note(event)

    def _note(self, event: Event) -> Event:
        if isinstance(event, Finished):
            self.outcome = event.finish_reason
        elif isinstance(event, Failed):
            self.outcome = "error"
        return event

    def close(self) -> None:
        if self.outcome is None:
            self.scheduler.cancel(self.seq)
        self.count(self.outcome or "cancelled")


class Handler:
    """Serves generation requests for both endpoints; `fmt` supplies what differs."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        scheduler: Scheduler,
        metrics: ServerMetrics,
        config: ServeConfig,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.metrics = metrics
        self.config = config
        self.mailbox: Mailbox | None = None  # made on the event loop, by the first request
        # templating and tokenizing a prompt (~9 ms for 4k tokens on a 2-core EPYC, more for
        # longer ones) would stall every stream's delivery on the event loop; one thread, so the
        # prompt-id cache (`ktinject.prompt_tokens`) is only ever used from it
        self.preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktinject-prompts")

    def count(self, endpoint: str, outcome: str) -> None:
        self.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    async def handle(
        self,
        request: Request,
        body: GenerationRequest,
        fmt: Format,
        prompt_ids: Callable[[], list[int]],
    ) -> Response:
        try:
            events = await self._queue(request, body, fmt, prompt_ids)
        except KtinjectError as exc:
            self.count(fmt.endpoint, "rejected")
            return error_response(exc, prompt_param=fmt.prompt_param)
        except Exception as exc:  # answered here, the connection stays open for the next one
            log.error("request failed before it was queued", exc_info=exc)
            self.count(fmt.endpoint, "error")
            return error_response(exc, prompt_param=fmt.prompt_param)
        reply = Reply.new(fmt.prefix, self.config.model_name)
        if body.stream:
            return EventStream(self._stream(fmt, reply, body.include_usage, events), events.close)
        try:
            return await self._collect(fmt, reply, events)
        finally:
            events.close()

    def close(self) -> None:
        self.preparing.shutdown(wait=False)

    def _prepare(
        self, body: GenerationRequest, fmt: Format, prompt_ids: Callable[[], list[int]]
    ) -> tuple[list[int], SamplingParams]:
        """Everything that can reject the request, before it is queued (on `preparing`)."""
        refused = body.unsupported()
        if refused is not None:
            raise RequestError(refused[1], param=refused[0])
        ids = prompt_ids()
        if not ids:
            raise RequestError(
                "The prompt is empty; give at least one token.", param=fmt.prompt_param
            )
        max_new_tokens = max_new_tokens_for(
            self.engine,
            len(ids),
            body.requested_max_tokens,
            default=self.config.max_new_tokens,
            strict=self.config.strict_context,
            prompt_param=fmt.prompt_param,
            tokens_param=body.max_tokens_param,
        )
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stops,
            ignore_eos=body.ignore_eos,
        )
        return ids, params

    async def _queue(
        self,
        request: Request,
        body: GenerationRequest,
        fmt: Format,
        prompt_ids: Callable[[], list[int]],
    ) -> RequestEvents:
        """Prepare the request and hand it to the scheduler, both on `preparing`: the scheduler
        starts on it without waiting for the event loop to wake up first."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        inbox = Inbox()
        emit = functools.partial(self.mailbox.post, inbox)
        queued = self.preparing.submit(self._prepare_and_submit, body, fmt, prompt_ids, emit)
        try:
            seq = await asyncio.wrap_future(queued)
        except asyncio.CancelledError:  # nobody will read its events: drop it once queued
            queued.add_done_callback(self._cancel_queued)
            raise
        count = functools.partial(self.count, fmt.endpoint)
        return RequestEvents(request, seq, inbox, self.scheduler, count)

    def _prepare_and_submit(
        self,
        body: GenerationRequest,
        fmt: Format,
        prompt_ids: Callable[[], list[int]],
        emit: Callable[[Event], None],
    ) -> Sequence:
        ids, params = self._prepare(body, fmt, prompt_ids)
        seq = Sequence(
            ids,
            params,
            tokenizer=self.tokenizer,
            eos_ids=self.engine.eos_ids,
            device=self.engine.device,
            emit=emit,
        )
        self.scheduler.submit(seq)
        return seq

    def _cancel_queued(self, queued: Future[Sequence]) -> None:
        if not queued.cancelled() and queued.exception() is None:
            self.scheduler.cancel(queued.result())

    async def _collect(self, fmt: Format, reply: Reply, events: RequestEvents) -> Response:
        """The whole answer as one JSON body, or the error that ended it."""
        parts: list[str] = []
        event = await events.next()
        while isinstance(event, Delta):
            parts.append(event.text)
            event = await events.next()
        if isinstance(event, Finished):
            response = fmt.response(reply, "".join(parts), event.finish_reason, event.usage)
            return JSONResponse(response.model_dump(mode="json"))
        if isinstance(event, Failed):
            return error_response(event.error, prompt_param=fmt.prompt_param)
        return Response(status_code=CLIENT_GONE)

    async def _stream(
        self, fmt: Format, reply: Reply, include_usage: bool, events: RequestEvents
    ) -> AsyncIterator[str]:
        """SSE chunks until `data: [DONE]`; a failure becomes an `error` event."""
        opening = fmt.opening(reply)
        if opening is not None:
            yield _sse(opening)
        chunks = TextChunks(fmt, reply)
        event = await events.next()
        while isinstance(event, Delta):
            # Text that arrived while the last chunk was being sent goes out as one chunk:
            # under load (many streams, a slow client) the stream catches up instead of
            # paying for a JSON chunk and a write per token.
            text, event = event.text, events.queued()
            while isinstance(event, Delta):
                text, event = text + event.text, events.queued()
            yield chunks.event(text)
            if event is None:
                event = await events.next()
        if isinstance(event, Finished):
            yield _sse(fmt.chunk(reply, None, event.finish_reason))
            if include_usage:
                yield _sse(fmt.usage_chunk(reply, event.usage))
        elif isinstance(event, Failed):
            yield _sse(describe(event.error, prompt_param=fmt.prompt_param)[1])
        if event is not None:
            yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A server-sent-event response that calls `close` however it ends: finished, failed, or
    its client gone -- also before the headers were written, when the body's generator never
    starts, or between two chunks, when it is never resumed (and only closed once collected)."""

    def __init__(self, content: AsyncIterator[str], close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_end = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"
