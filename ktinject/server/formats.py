"""How results look on the wire for each endpoint: chat completions and text completions differ
only in object names and in where the text goes (`message`/`delta` vs `text`)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ktinject.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    PromptTokensDetails,
    ResponseBase,
    UsageInfo,
)
from ktinject.server.sequence import Usage


@dataclass(frozen=True)
class Reply:
    """The id, timestamp and model name every chunk of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str) -> Reply:
        return cls(id=f"{prefix}{uuid.uuid4().hex}", model=model)

    def header(self) -> dict[str, str | int]:
        return {"id": self.id, "created": self.created, "model": self.model}


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


class ChatFormat:
    endpoint = "chat.completions"
    prompt_param = "messages"
    prefix = "chatcmpl-"

    def opening(self, reply: Reply) -> ResponseBase | None:
        """The first chunk announces the assistant role, as OpenAI's does."""
        delta = {"role": "assistant", "content": ""}
        return ChatCompletionChunk(**reply.header(), choices=[ChatChunkChoice(delta=delta)])

    def chunk(self, reply: Reply, text: str | None, finish_reason: str | None) -> ResponseBase:
        delta = {} if text is None else {"content": text}
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(**reply.header(), choices=[choice])

    def usage_chunk(self, reply: Reply, usage: Usage) -> ResponseBase:
        return ChatCompletionChunk(**reply.header(), choices=[], usage=usage_info(usage))

    def response(self, reply: Reply, text: str, finish_reason: str, usage: Usage) -> ResponseBase:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletion(**reply.header(), choices=[choice], usage=usage_info(usage))


class CompletionFormat:
    endpoint = "completions"
    prompt_param = "prompt"
    prefix = "cmpl-"

    def opening(self, reply: Reply) -> ResponseBase | None:
        return None

    def chunk(self, reply: Reply, text: str | None, finish_reason: str | None) -> ResponseBase:
        choice = CompletionChoice(text=text or "", finish_reason=finish_reason)
        return Completion(**reply.header(), choices=[choice])

    def usage_chunk(self, reply: Reply, usage: Usage) -> ResponseBase:
        return Completion(**reply.header(), choices=[], usage=usage_info(usage))

    def response(self, reply: Reply, text: str, finish_reason: str, usage: Usage) -> ResponseBase:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return Completion(**reply.header(), choices=[choice], usage=usage_info(usage))


Format = ChatFormat | CompletionFormat


class TextChunks:
    """The server-sent events of one stream's text chunks. They differ only in their text, so the
    JSON around it is rendered once: building and serialising a pydantic model per token was
    about a tenth of the event loop's time with 8 streams."""

    def __init__(self, fmt: Format, reply: Reply) -> None:
        marker = uuid.uuid4().hex  # appears nowhere else in the chunk
        rendered = fmt.chunk(reply, marker, None).model_dump_json()
        self.before, self.after = rendered.split(json.dumps(marker))

    def event(self, text: str) -> str:
        return f"data: {self.before}{json.dumps(text, ensure_ascii=False)}{self.after}\n\n"
