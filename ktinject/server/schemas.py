"""Request and response bodies of the OpenAI-compatible API (the subset ktinject serves).

Unknown request fields are ignored (pydantic's default), so clients that send options we do not
implement still work; fields we implement but whose value we cannot honour (`n` > 1) are refused
by the routes with a 400. `ignore_eos` is an extension (as in vLLM) for fixed-length benchmarks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` is the newer name; it wins when both are given."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    """`prompt` as OpenAI takes it: text, token ids, or a list of either (evaluation harnesses
    send their prompts tokenized, in lists); a list must hold one prompt, as `n` must be 1."""

    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One sentence instead of one error per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_type", "must be text, a list of token ids, or a list of one of those"
            ) from None


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
