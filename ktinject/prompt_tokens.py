"""Prompt token ids that reuse the ids of a recent prompt sharing a prefix with the new one.

Turn N of a conversation repeats turns 1..N-1 word for word, and tokenizing that history again
costs more than prefilling the few new tokens it leaves once the KV cache is reused: 6-9 ms for
a 4k-token history on a 2-core EPYC, against a few ms for the new turn's prefill on a GPU. A fast
(Rust) tokenizer splits its text at special tokens such as `<|im_start|>` before anything else
and tokenizes the pieces between them independently, so the ids of a text up to the start of a
special token do not depend on what follows it. A new prompt therefore takes the ids of a recent
prompt up to the last special token both texts share, and tokenizes only the rest.

That independence is what a tokenizer is built to do, not something every tokenizer promises, so
it is checked once per tokenizer on probe texts around its special tokens; a tokenizer that fails
the check (or is not a fast tokenizer, or has no special tokens) is always asked for the whole
text. The pieces are tokenized by the fast tokenizer's Rust backend directly: the `transformers`
call around it cost ~0.3 ms a request (2-core EPYC), more than the backend's work on a new turn,
and the check compares the pieces' ids with that call's ids of the whole text.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

PROBE_TEXT = " Hello  world, 12345 ünïcode\n\n\t end. "
# a tokenizer's verdict, probed once: ~18 ms for SmolLM2's 17 special tokens, more with hundreds
_probed: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()


@dataclass(eq=False)
class _Tokenized:
    """A text, its ids, and where its boundary special tokens start: (char offset, ids before)."""

    text: str
    ids: list[int]
    cuts: list[tuple[int, int]]

    def usable_cut(self, text: str, margin: int) -> int:
        """Index of the last cut whose text, plus `margin` characters after it, `text` repeats;
        -1 for none. Slices compare in C: a 20k-character history costs microseconds."""
        if text.startswith(self.text):  # the usual case: the new prompt extends this one
            return bisect_right(self.cuts, len(self.text) - margin, key=lambda cut: cut[0]) - 1
        found, hi, matched = -1, len(self.cuts) - 1, 0
        while found < hi:
            mid = (found + hi + 1) // 2
            end = self.cuts[mid][0] + margin
            if end <= len(self.text) and text.startswith(self.text[matched:end], matched):
                found, matched = mid, end
            else:
                hi = mid - 1
        return found


class PromptTokenizer:
    """Renders chat messages with the tokenizer's template and tokenizes prompts, reusing the
    ids of up to `capacity` recent prompts (see the module docstring). Not thread-safe: the
    server calls it on its event loop, the terminal chat from its one thread."""

    def __init__(self, tokenizer: Any, capacity: int = 8) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.recent: list[_Tokenized] = []  # least recently used first
        added = getattr(tokenizer, "added_tokens_decoder", {})
        # A boundary must match the raw text exactly where it stands: special, not normalized,
        # not swallowing the whitespace before it (lstrip moves its start), not word-bound.
        self.boundaries = {
            token_id: token.content
            for token_id, token in added.items()
            if token.special and not token.normalized and not token.lstrip and not token.single_word
        }
        # An added token that starts before a cut must not reach past what both texts share.
        self.margin = max((len(token.content) for token in added.values()), default=0)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow tokenizer
        verdict = _probed.get(tokenizer)
        if verdict is None:
            # the probe runs `encode` in this mode
            self.incremental = bool(self.boundaries) and self.backend is not None
            verdict = self.incremental and self._splits_at_boundaries()
            self.recent.clear()  # the probe's texts
            _probed[tokenizer] = verdict
        self.incremental = verdict

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of `messages` in the chat template, ending with the assistant's cue: the ids
        `apply_chat_template(messages, add_generation_prompt=True)` returns."""
        return self.encode(self.render(messages))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text of `messages` in the chat template, ending with the assistant's cue."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without added BOS/EOS (the template writes its own special tokens)."""
        if not self.incremental:
            return self._whole(text)
        base, index, reach = None, -1, 0
        for entry in reversed(self.recent):  # the latest first: usually the one `text` extends
            if reach and not text.startswith(entry.text[:reach]):
                continue  # a later cut than `base`'s needs `reach` shared characters
            found = entry.usable_cut(text, self.margin)
            if found >= 0 and entry.cuts[found][1] > (base.cuts[index][1] if base else 0):
                base, index = entry, found
                reach = entry.cuts[found][0] + self.margin + 1
        if base is None:
            tokenized = _Tokenized(text, *self._with_cuts(text))
        else:
            start, before = base.cuts[index]
            ids, cuts = self._with_cuts(text[start:])
            tokenized = _Tokenized(
                text,
                base.ids[:before] + ids,
                base.cuts[:index] + [(start + at, before + n) for at, n in cuts],
            )
        self._remember(tokenized, base)
        return list(tokenized.ids)

    def _whole(self, text: str) -> list[int]:
        """The tokenizer's own ids of `text`, as `apply_chat_template` tokenizes its rendering."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _with_cuts(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.backend.encode(text, add_special_tokens=False)
        ids = encoded.ids
        cuts = [
            (start, i)
            for i, (token_id, (start, _)) in enumerate(zip(ids, encoded.offsets, strict=True))
            if token_id in self.boundaries and text.startswith(self.boundaries[token_id], start)
        ]
        return ids, cuts

    def _remember(self, tokenized: _Tokenized, base: _Tokenized | None) -> None:
        # A prompt that extends its base serves every later prompt at least as well as the base.
        if base is not None and tokenized.text.startswith(base.text):
            self.recent.remove(base)
        self.recent.append(tokenized)
        del self.recent[: -self.capacity]

    def _splits_at_boundaries(self) -> bool:
        """Whether reused ids equal the tokenizer's own on probe texts around each boundary."""
        for content in self.boundaries.values():
            first = f"{PROBE_TEXT}{content}{PROBE_TEXT}{content}"
            for text in (first, f"{first}{PROBE_TEXT}", f"{first}\n{content}x{content}"):
                self.recent.clear()
                self.encode(first)
                if self.encode(text) != self._whole(text):
                    return False
        return True
