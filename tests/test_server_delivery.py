"""How events reach a streaming request: the scheduler thread's hand-over (`Mailbox`), a request's
wait for its next event (`Inbox`) and the pre-rendered text chunks (`TextChunks`). The end-to-end
behaviour is tested through the `openai` client in test_server.py; these pin each piece's contract.
"""

from __future__ import annotations

import asyncio
import json
import threading

from hypothesis import given
from hypothesis import strategies as st

from ktinject.server.delivery import Inbox, Mailbox
from ktinject.server.formats import ChatFormat, CompletionFormat, Reply, TextChunks
from ktinject.server.sequence import Delta


def test_events_posted_from_a_thread_arrive_in_order_one_wake_up_per_burst():
    async def scenario() -> tuple[list[str], list[str], int]:
        loop = asyncio.get_running_loop()
        mailbox, first, second = Mailbox(loop), Inbox(), Inbox()
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):
            nonlocal wake_ups
            wake_ups += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        def burst() -> None:  # one decode step's events, as the scheduler emits them
            for i in range(50):
                mailbox.post(first, Delta(f"a{i}"))
                mailbox.post(second, Delta(f"b{i}"))

        poster = threading.Thread(target=burst)
        poster.start()
        poster.join()  # the loop was busy here: every post came before it could deliver
        got = [[], []]
        for inbox, out in ((first, got[0]), (second, got[1])):
            while len(out) < 50:
                event = await inbox.get(timeout=5)
                assert event is not None
                out.append(event.text)
        return got[0], got[1], wake_ups

    first, second, wake_ups = asyncio.run(scenario())
    assert first == [f"a{i}" for i in range(50)]
    assert second == [f"b{i}" for i in range(50)]
    assert wake_ups == 1


def test_a_waiting_request_wakes_on_its_event_or_times_out():
    async def scenario() -> tuple[object, object, object]:
        loop = asyncio.get_running_loop()
        mailbox, inbox = Mailbox(loop), Inbox()
        timed_out = await inbox.get(timeout=0.01)
        threading.Timer(0.05, mailbox.post, (inbox, Delta("x"))).start()
        woken = await inbox.get(timeout=5)
        # a wait that is cancelled (the client went away) leaves the inbox usable
        waiting = asyncio.ensure_future(inbox.get(timeout=5))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        inbox.put(Delta("y"))
        return timed_out, woken, await inbox.get(timeout=5)

    timed_out, woken, after_cancel = asyncio.run(scenario())
    assert timed_out is None
    assert woken == Delta("x")
    assert after_cancel == Delta("y")


@given(text=st.text(), chat=st.booleans())
def test_prerendered_text_chunk_equals_the_pydantic_one(text, chat):
    fmt = ChatFormat() if chat else CompletionFormat()
    reply = Reply.new(fmt.prefix, 'model "with" quotes \\ and ünïcode')
    event = TextChunks(fmt, reply).event(text)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :]) == fmt.chunk(reply, text, None).model_dump(
        mode="json"
    )
