"""`ktinject chat`: with --cache-lens, turns 2 and 3 prefill only their new tokens and answer
exactly as local mode (which re-prefills the whole conversation every turn); a conversation that
outgrows the cache gets one sentence and keeps working after /reset."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from ktinject.chat import ChatSession, chat_prompt_ids, read_message
from ktinject.engine import Engine
from ktinject.errors import ContextLengthError
from ktinject.sampling import SamplingParams

TURNS = ["Hi! Who are you?", "What is 2 + 2?", "Name a color."]
PARAMS = SamplingParams(max_new_tokens=24)


def typed(*lines: str):
    """An `input` that returns `lines` one by one, then raises EOFError (end of stdin)."""
    queue = list(lines)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read_line


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["  hello  "], "hello"),
        (['"""first line', "", "  indented", 'last"""', "next"], "first line\n\n  indented\nlast"),
        (['"""', "a", '"""'], "a"),
        (['"""one line"""'], "one line"),
        (['"""never closed', "b"], "never closed\nb"),
        ([], None),
    ],
)
def test_a_message_is_a_line_or_the_lines_between_triple_quotes(lines, message) -> None:
    """A pasted paragraph is one turn, as in ollama; the line after the closing quotes is not
    part of it."""
    assert read_message(typed(*lines)) == message


def run_turns(session: ChatSession, turns: list[str]) -> list[tuple[str, int, int]]:
    """(answer, prompt tokens, prefilled tokens) per turn."""
    results = []
    for text in turns:
        for _ in session.turn(text):
            pass
        stats = session.last.stats
        results.append((session.last.answer, stats.prompt_tokens, session.last.prefilled_tokens))
    return results


@pytest.mark.slow
def test_cached_chat_prefills_only_new_turns_and_matches_local_mode(smollm2) -> None:
    local = run_turns(ChatSession(Engine(smollm2.model, smollm2.tokenizer), PARAMS), TURNS)
    cached_engine = Engine(smollm2.model, smollm2.tokenizer, cache_lens=2048)
    cached = run_turns(ChatSession(cached_engine, PARAMS), TURNS)
    assert [a for a, _, _ in cached] == [a for a, _, _ in local]
    assert all(prefilled == prompt for _, prompt, prefilled in local)
    assert cached[0][2] == cached[0][1]
    for turn in (1, 2):
        _, prompt, prefilled = cached[turn]
        new_turn_tokens = (
            prompt
            - cached[turn - 1][1]
            - len(smollm2.tokenizer(cached[turn - 1][0], add_special_tokens=False)["input_ids"])
        )
        assert prefilled < prompt // 2, "history was prefilled again"
        assert prefilled <= new_turn_tokens + 4  # the new turn plus template glue


@pytest.mark.slow
def test_outgrowing_the_cache_is_one_sentence_and_reset_recovers(smollm2) -> None:
    prompt_len = len(chat_prompt_ids(smollm2.tokenizer, [{"role": "user", "content": TURNS[0]}]))
    engine = Engine(smollm2.model, smollm2.tokenizer, cache_lens=prompt_len + 40)
    session = ChatSession(engine, PARAMS)
    run_turns(session, TURNS[:1])
    with pytest.raises(ContextLengthError, match="--cache-lens"):
        run_turns(session, TURNS[1:2])
    assert len(session.messages) == 2  # the refused turn left the conversation as it was
    session.reset()
    assert run_turns(session, TURNS[1:2])[0][0]


def chat_cli(stdin: str, *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ktinject", "chat", "--max-new-tokens", "24", *flags],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_chat_cli_three_turns_with_cache_match_local_mode() -> None:
    script = "\n".join([*TURNS, "/exit"]) + "\n"
    local = chat_cli(script)
    cached = chat_cli(script, "--cache-lens", "2048")
    status = re.compile(r"\[prompt ([\d,]+) tok · prefilled ([\d,]+) .*cache ([\d,]+)/2,048\]")
    counts = [tuple(int(x.replace(",", "")) for x in m) for m in status.findall(cached)]
    assert len(counts) == 3
    assert counts[1][1] < counts[1][0] // 2 and counts[2][1] < counts[2][0] // 2
    strip = re.compile(r"\[prompt .*\]\n|\(.*mode.*\)|cache [\d,]+ positions")
    assert strip.sub("", local).split("> ")[1:] == strip.sub("", cached).split("> ")[1:]


@pytest.mark.slow
def test_chat_cli_overflow_then_reset_keeps_working() -> None:
    script = "\n".join([TURNS[0], TURNS[1], "/reset", TURNS[1], "/exit"]) + "\n"
    out = chat_cli(script, "--cache-lens", "80")
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--cache-lens" in errors[0] and "/reset" in errors[0]
    assert "(conversation reset)" in out
    assert out.count("[prompt") == 2


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on() -> None:
    """Ctrl-C during an answer drops that turn (the conversation is as before it) and returns
    to the prompt; the next turn answers as a fresh chat would."""
    command = [sys.executable, "-m", "ktinject", "chat", "--cache-lens", "2048"]
    chat = subprocess.Popen(
        [*command, "--max-new-tokens", "400"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    chat.stdin.write("Tell me a long story about a dragon and a knight.\n")
    chat.stdin.flush()
    seen = ""
    while "> " not in seen or len(seen.split("> ", 1)[1]) < 20:  # some of the answer streamed
        char = chat.stdout.read(1)
        assert char, f"chat ended before answering: {seen!r}"
        seen += char
    chat.send_signal(signal.SIGINT)
    out, _ = chat.communicate(f"{TURNS[1]}\n/exit\n", timeout=300)
    assert chat.returncode == 0
    assert "(answer stopped; this turn is not kept)" in out
    answer = out.split("(answer stopped; this turn is not kept)\n> ")[1].split("\n[prompt")[0]
    fresh = chat_cli(f"{TURNS[1]}\n/exit\n", "--cache-lens", "2048")
    assert answer == fresh.split("> ")[1].split("\n[prompt")[0]


@pytest.mark.slow
def test_chat_cli_takes_messages_of_several_lines_and_names_unknown_commands() -> None:
    """A /word that is no command (/help, a typo of /reset) is not sent to the model; a message
    that merely starts with a slash is."""
    script = '/help\n/rest\n"""What is\n2 + 2?"""\n/etc/hosts is what?\n/exit\n'
    out = chat_cli(script, "--cache-lens", "2048")
    assert "(unknown command /help;" in out and "(unknown command /rest;" in out
    assert out.count("[prompt") == 2 and "... " in out
