"""How results look on the wire for each endpoint: chat completions and text completions differ
only in object names and in where the text goes (`message`/`delta` vs `text`)."""

from __future__ import annotations

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
