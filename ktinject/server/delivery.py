"""Events from the scheduler's thread to the requests that wait for them on the event loop.

Every decode step emits one event per running request. Handing each over with its own
`call_soon_threadsafe` cost a self-pipe write and a loop wake-up per token, and waiting on an
`asyncio.Queue` through `asyncio.wait_for` a task and a timer per token: with 8 streams those
were about a fifth of the event loop's time, and the loop shares the GIL with the scheduler. Here
the events posted before the loop gets to them go over in one wake-up (`Mailbox`), and a request
with nothing to read parks on a bare future with a timer (`Inbox.get`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from ktinject.server.sequence import Event


class Inbox:
    """The events of one request, in order; used on the event loop only."""

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        self.events.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def get_nowait(self) -> Event | None:
        """The oldest event not read yet, or None."""
        return self.events.popleft() if self.events else None

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None when none came within `timeout` seconds."""
        if not self.events:
            loop = asyncio.get_running_loop()
            self.waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        return self.get_nowait()


class Mailbox:
    """Carries events posted from any thread to their inboxes on `loop`, a burst at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.posted: list[tuple[Inbox, Event]] = []

    def post(self, inbox: Inbox, event: Event) -> None:
        with self.lock:
            self.posted.append((inbox, event))
            wake = len(self.posted) == 1  # later posts ride on the wake-up already scheduled
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            posted, self.posted = self.posted, []
        for inbox, event in posted:
            inbox.put(event)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
