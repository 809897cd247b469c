"""A multi-turn conversation over the engine, shared by `ktinject chat` and its tests.

Local mode (no `cache_lens`): every turn templates the whole conversation and prefills it from
scratch in a cache sized for that turn. With `cache_lens`: the cache is allocated once and each
turn reuses the KV of everything the conversation already holds, so only the new turn's tokens
are prefilled; when the conversation would outgrow the cache the turn is refused with one sentence
and the conversation is kept as it was (`/reset` starts over).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ktinject.engine import Engine, GenerationStats
from ktinject.prompt_tokens import PromptTokenizer
from ktinject.settings import SamplingParams


@dataclass
class TurnResult:
    """What one turn did: the answer and the engine's counts (prefilled = prompt - cached)."""

    answer: str
    stats: GenerationStats

    @property
    def prefilled_tokens(self) -> int:
        return self.stats.prompt_tokens - self.stats.cached_tokens


MULTILINE = '"""'  # as in ollama: a message between two of these keeps its newlines


def read_message(read_line: Callable[[str], str]) -> str | None:
    """One message typed at `ktinject chat`: a line, or everything between two triple quotes,
    so a pasted paragraph is one turn rather than one turn per line. None at end of input."""
    try:
        line = read_line("> ").strip()
    except EOFError:
        return None
    if not line.startswith(MULTILINE):
        return line
    lines = [line[len(MULTILINE) :]]
    while not lines[-1].rstrip().endswith(MULTILINE):
        try:
            lines.append(read_line("... "))
        except EOFError:
            break
    else:
        lines[-1] = lines[-1].rstrip()[: -len(MULTILINE)]
    return "\n".join(lines).strip()


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ending with the assistant's cue."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class ChatSession:
    """Holds the messages of one conversation and runs its turns on `engine` (slot 0, with the
    engine's tokenizer and chat template)."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.prompts = PromptTokenizer(self.tokenizer, capacity=1)  # each turn extends the last
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    @property
    def keeps_cache(self) -> bool:
        return self.engine.fixed_cache_lens is not None

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.reset(0)

    def abandon_turn(self) -> None:
        """After a turn was stopped mid-way (Ctrl-C): the conversation stays as it was before
        that turn. The interrupt may have come between a step's K/V write and its bookkeeping,
        so the slot is emptied rather than trusted; the next turn prefills the conversation."""
        self.engine.reset(0)

    def cache_usage(self) -> tuple[int, int | None]:
        """(positions in use, cache size) for the status line."""
        return self.engine.cached_length(0), self.engine.cache_lens

    last: TurnResult | None = None

    def turn(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text`; the finished turn is in `self.last`.

        Raises `ContextLengthError` (before any compute) when the turn cannot fit; the
        conversation is then unchanged."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        prompt = self.prompts.chat_ids(messages)
        generation = self.engine.generate(prompt, self.params, reuse=self.keeps_cache)
        yield from generation
        self.messages = [*messages, {"role": "assistant", "content": generation.text}]
        self.last = TurnResult(answer=generation.text, stats=generation.stats)
