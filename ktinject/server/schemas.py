"""Request and response bodies of the OpenAI-compatible API (the subset ktinject serves).

Unknown request fields are ignored (pydantic's default), so clients that send options we do not
implement still work; fields we know but whose value we cannot honour (`n` > 1, log
probabilities, tools, JSON mode, `echo`...: `unsupported()`) are refused by the routes with a
400 rather than answered as if they had been honoured. Numbers and flags are not coerced from
other JSON types (`"stream": "yes"`, `"max_tokens": true` are 400s, as OpenAI answers them).
`ignore_eos` is an extension (as in vLLM) for fixed-length benchmarks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from ktinject.settings import SEED_RANGE

Count = Annotated[int, Field(strict=True, ge=1)]
TokenId = Annotated[int, Field(strict=True)]


def one_message(kind: str, expected: str) -> WrapValidator:
    """Answers a union's failure with one sentence (`expected`) instead of one error per
    member, each at a path that names the member's type (`stop.str`)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(kind, expected) from None

    return WrapValidator(check)


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: str
    content: Annotated[
        str | list[TextPart] | None,
        one_message(
            "content_type",
            'must be text or a list of text parts ({"type": "text", "text": ...}); this server '
            "reads text only",
        ),
    ] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: Count | None = None
    temperature: float = Field(default=1.0, ge=0, le=2, strict=True)
    top_p: float = Field(default=1.0, gt=0, le=1, strict=True)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], strict=True)
    stop: Annotated[
        str | list[str] | None, one_message("stop_type", "must be a string or a list of strings")
    ] = None
    n: int | None = Field(default=None, strict=True)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field that set `requested_max_tokens` (blamed when it does not fit)."""
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported(self) -> tuple[str, str] | None:
        """The first field that asks for what this server does not do, and the sentence that
        says so; None when there is none. A client that relies on such a field (a tool call,
        log probabilities for scoring) would otherwise be answered as if it had been honoured."""
        if self.n not in (None, 1):
            return "n", f"n is {self.n}; this server returns one choice per request (use n=1)."
        return None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None  # tools' older name
    tool_choice: Any = None
    response_format: Any = None

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` is the newer name; it wins when both are given."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            param = "logprobs" if self.logprobs else "top_logprobs"
            return param, f"This server returns no log probabilities; leave {param} out."
        if (self.tools or self.functions) and self.tool_choice != "none":
            param = "tools" if self.tools else "functions"
            return param, (
                f"This server makes no tool calls; leave {param} out (or set tool_choice to "
                '"none").'
            )
        if self.response_format not in (None, {"type": "text"}):
            return "response_format", (
                'This server has no JSON mode; leave response_format out (or {"type": "text"}).'
            )
        return super().unsupported()


class CompletionRequest(GenerationRequest):
    """`prompt` as OpenAI takes it: text, token ids, or a list of either (evaluation harnesses
    send their prompts tokenized, in lists); a list must hold one prompt, as `n` must be 1."""

    prompt: Annotated[
        str | list[TokenId] | list[str] | list[list[TokenId]],
        one_message("prompt_type", "must be text, a list of token ids, or a list of one of those"),
    ]
    echo: Any = None
    logprobs: Any = None
    suffix: Any = None
    best_of: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "This server does not echo the prompt; leave echo out."
        if self.logprobs is not None:
            return "logprobs", "This server returns no log probabilities; leave logprobs out."
        if self.suffix:
            return "suffix", "This server does not insert text before a suffix; leave it out."
        if self.best_of not in (None, 1):
            return "best_of", "This server returns one sample per request; leave best_of out."
        return super().unsupported()


# -- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str] = Field(default_factory=dict)  # {} in the closing chunk
    finish_reason: str | None = None
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class ResponseBase(BaseModel):
    id: str
    object: str
    created: int
    model: str
    usage: UsageInfo | None = None


class ChatCompletion(ResponseBase):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(ResponseBase):
    object: str = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(ResponseBase):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    object: str = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "ktinject"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
