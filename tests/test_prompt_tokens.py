"""PromptTokenizer: ids reused from a recent prompt equal the tokenizer's ids of the whole text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktinject.chat import chat_prompt_ids
from ktinject.prompt_tokens import PromptTokenizer

PIECES = [
    "Hello",
    " world",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "12345",
    "ünïcode",
    "日本語",
    "!?",
    " <|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "don't",
]
CONTENT = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
TURNS = st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def conversation(turns: list[tuple[str, str]], upto: int) -> list[dict[str, str]]:
    """Turn `upto`'s prompt: the earlier turns with their answers, then its question."""
    messages = [{"role": "system", "content": "Be brief."}]
    for question, answer in turns[:upto]:
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return [*messages, {"role": "user", "content": turns[upto][0]}]


def test_smollm2_tokenizer_is_tokenized_incrementally(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    assert prompts.incremental  # its ChatML markers are special tokens matched on the raw text
    assert "<|im_start|>" in prompts.boundaries.values()


@settings(max_examples=40)
@given(turns=TURNS)
def test_each_turn_gets_the_ids_of_the_whole_template(tokenizer, turns):
    prompts = PromptTokenizer(tokenizer, capacity=2)
    for upto in range(len(turns)):
        messages = conversation(turns, upto)
        assert prompts.chat_ids(messages) == chat_prompt_ids(tokenizer, messages)


@settings(max_examples=40)
@given(turns=TURNS, edit=CONTENT, at=st.integers(min_value=0))
def test_an_edited_history_gets_the_ids_of_the_whole_template(tokenizer, turns, edit, at):
    """A prompt that shares only part of a remembered one (an earlier message changed)."""
    prompts = PromptTokenizer(tokenizer)
    messages = conversation(turns, len(turns) - 1)
    prompts.chat_ids(messages)
    edited = [dict(m) for m in messages]
    edited[at % len(edited)]["content"] += edit
    assert prompts.chat_ids(edited) == chat_prompt_ids(tokenizer, edited)


def test_a_later_turn_tokenizes_only_its_new_text(tokenizer):
    prompts = PromptTokenizer(tokenizer)
    history = [("A question about caches. " * 40, "An answer about caches. " * 40)] * 3
    turns = [*history, ("And after that?", "")]
    before = tokenizer.apply_chat_template(
        conversation(turns, 2), add_generation_prompt=True, tokenize=False
    )
    prompts.chat_ids(conversation(turns, 2))
    prompts.backend = spy = Spy(prompts.backend)
    messages = conversation(turns, 3)
    assert prompts.chat_ids(messages) == chat_prompt_ids(tokenizer, messages)
    # from the last turn's assistant cue on: its answer and the new question
    cue = "<|im_start|>assistant\n"
    assert before.endswith(cue)
    assert len(spy.texts) == 1 and spy.texts[0].startswith(cue + history[2][1])
    assert len(spy.texts[0]) == len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ) - len(before) + len(cue)


def test_among_conversations_sharing_a_history_a_turn_extends_its_own(tokenizer):
    """Prompts that share a long history and differ in their last question (the server's 4k
    benchmark): the next turn of one of them reuses that one's ids up to its assistant cue."""
    prompts = PromptTokenizer(tokenizer)
    history = [("A question about caches. " * 40, "An answer about caches. " * 40)] * 3
    asked = [[*history, (f"Question {i}?", f"Answer {i}.")] for i in range(4)]
    for turns in asked:
        prompts.chat_ids(conversation([*turns, ("", "")], 3))
    prompts.backend = spy = Spy(prompts.backend)
    messages = conversation([*asked[1], ("And after that?", "")], 4)
    assert prompts.chat_ids(messages) == chat_prompt_ids(tokenizer, messages)
    assert len(spy.texts) == 1 and spy.texts[0].startswith("<|im_start|>assistant\nAnswer 1.")


class Spy:
    """The tokenizer's backend, noting the texts it is asked to tokenize."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.texts: list[str] = []

    def encode(self, text: str, **kwargs):
        self.texts.append(text)
        return self.backend.encode(text, **kwargs)


def test_a_prompt_that_extends_a_remembered_one_replaces_it(tokenizer):
    prompts = PromptTokenizer(tokenizer, capacity=2)
    turns = [("one", "two"), ("three", "four"), ("five", "")]
    for upto in range(3):
        prompts.chat_ids(conversation(turns, upto))
    assert len(prompts.recent) == 1
    for other in ("a", "b", "c"):
        prompts.chat_ids([{"role": "user", "content": other}])
    assert len(prompts.recent) == 2  # capacity


class JoinedSpecialTokenizer:
    """A character tokenizer that writes a marker id before every text it is given, as a
    tokenizer whose pieces depend on where the text starts would: reusing ids is not exact."""

    class Token:
        special, normalized, lstrip, single_word = True, False, False, False
        content = "<s>"

    class Backend:
        def encode(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
            ids, offsets, i = [1], [(0, 0)], 0
            while i < len(text):
                step = 3 if text.startswith("<s>", i) else 1
                ids.append(0 if step == 3 else ord(text[i]) + 2)
                offsets.append((i, i + step))
                i += step
            return SimpleNamespace(ids=ids, offsets=offsets)

    added_tokens_decoder = {0: Token()}
    backend_tokenizer = Backend()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text).ids}


def test_a_tokenizer_failing_the_probe_is_always_asked_for_the_whole_text():
    tokenizer = JoinedSpecialTokenizer()
    prompts = PromptTokenizer(tokenizer)
    assert not prompts.incremental
    first = "ab<s>cd<s>"
    prompts.encode(first)
    assert prompts.encode(f"{first}ef") == tokenizer(f"{first}ef")["input_ids"]
