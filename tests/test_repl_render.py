"""How answers are written: word wrap, thinking blocks, tool calls, the --verbose block."""

from __future__ import annotations

import io
import re

from prompt_toolkit.utils import get_cwidth

from pollama.cli.render import (
    COLOR_DEFAULT,
    COLOR_GREY,
    AnswerDisplay,
    WordWrapper,
    print_summary,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills and "
    "the river keeps running toward the sea, carrying leaves and stories."
)
_CSI = re.compile(r"\x1b\[([\d;?]*)([A-Za-z])")


def screen(raw: str) -> list[str]:
    """What a terminal shows for text, CR/LF, cursor moves (left, right, up, column) and line
    clearing; other escape sequences (colours, modes) are ignored."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        m = _CSI.match(raw, i)
        if m:
            n = int(m[1]) if m[1].isdigit() else 1
            if m[2] == "D":
                col = max(0, col - n)
            elif m[2] == "C":
                col += n
            elif m[2] == "G":
                col = n - 1
            elif m[2] == "A":
                row = max(0, row - n)
            elif m[2] == "K" and m[1] == "2":
                lines[row] = []
            elif m[2] == "K":
                del lines[row][col:]
            i = m.end()
            continue
        ch = raw[i]
        i += 1
        if ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif ch == "\r":
            col = 0
        else:
            cells = [ch] + [""] * (max(1, get_cwidth(ch)) - 1)  # a wide char takes two cells
            line = lines[row]
            line.extend(" " * (col + len(cells) - len(line)))
            line[col:col + len(cells)] = cells
            col += len(cells)
    return ["".join(line) for line in lines]


def chunks(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_streamed_words_wrap_before_the_margin_and_stay_whole() -> None:
    out = io.StringIO()
    wrapper = WordWrapper(out, wrap=True, width=lambda: 40)
    for piece in chunks(TEXT):
        wrapper.write(piece)
    lines = screen(out.getvalue())
    assert len(lines) > 3
    assert all(len(line.rstrip()) <= 35 for line in lines)
    assert " ".join(line.strip() for line in lines) == TEXT


def test_resized_terminal_wraps_at_the_new_width() -> None:
    out = io.StringIO()
    width = [30]
    wrapper = WordWrapper(out, wrap=True, width=lambda: width[0])
    half = len(TEXT) // 2
    wrapper.write(TEXT[:half])
    narrow = len(screen(out.getvalue()))
    width[0] = 70
    wrapper.write(TEXT[half:])
    lines = screen(out.getvalue())
    assert all(len(line.rstrip()) <= 65 for line in lines)
    assert any(len(line.rstrip()) > 25 for line in lines[narrow - 1:])
    assert " ".join(line.strip() for line in lines) == TEXT


def test_a_word_longer_than_the_line_is_broken_not_repeated() -> None:
    out = io.StringIO()
    wrapper = WordWrapper(out, wrap=True, width=lambda: 20)
    url = "https://example.com/" + "x" * 30
    wrapper.write("see " + url)
    lines = screen(out.getvalue())
    assert "".join(lines) == "see " + url
    assert all(len(line) <= 15 for line in lines)


def test_wide_characters_wrap_anywhere_and_count_double() -> None:
    out = io.StringIO()
    wrapper = WordWrapper(out, wrap=True, width=lambda: 20)
    text = "我是由智谱公司开发的人工智能助手旨在为用户提供信息和帮助"
    wrapper.write(text)
    lines = screen(out.getvalue())
    assert "".join(lines) == text
    assert all(sum(get_cwidth(c) for c in line) <= 15 for line in lines)


def test_newlines_restart_the_column_and_no_wrap_writes_as_is() -> None:
    out = io.StringIO()
    wrapper = WordWrapper(out, wrap=True, width=lambda: 30)
    wrapper.write("short line\nanother short one\n")
    assert out.getvalue() == "short line\nanother short one\n"
    plain = io.StringIO()
    WordWrapper(plain, wrap=False, width=lambda: 20).write(TEXT)
    assert plain.getvalue() == TEXT


def test_thinking_block_plain() -> None:
    out = io.StringIO()
    display = AnswerDisplay(out, wrap=False, plain=True)
    for part in ("Let me ", "think about ", "it."):
        display.feed(thinking=part)
    display.feed(content="Done.")
    display.finish()
    assert out.getvalue() == "Thinking...\nLet me think about it.\n...done thinking.\n\nDone."
    assert display.thinking == "Let me think about it." and display.content == "Done."


def test_thinking_block_in_colour_on_a_terminal() -> None:
    out = io.StringIO()
    display = AnswerDisplay(out, wrap=False, plain=False)
    display.feed(thinking="Hmm.\n")
    display.feed(content="Yes.")
    assert out.getvalue() == (
        COLOR_GREY + "\x1b[1mThinking...\n" + COLOR_DEFAULT + COLOR_GREY + "Hmm.\n"
        + COLOR_GREY + "\x1b[1m...done thinking.\n\n" + COLOR_DEFAULT + "Yes."
    )


def test_hidden_thinking_is_kept_but_not_shown() -> None:
    out = io.StringIO()
    display = AnswerDisplay(out, wrap=False, plain=True, hide_thinking=True)
    display.feed(thinking="secret")
    display.feed(content="Answer.")
    assert out.getvalue() == "Answer." and display.thinking == "secret"


def test_an_answer_cut_inside_its_thinking_resets_the_colour() -> None:
    out = io.StringIO()
    display = AnswerDisplay(out, wrap=False, plain=False)
    display.feed(thinking="still thinking")
    display.finish()
    assert out.getvalue().endswith("still thinking" + COLOR_DEFAULT)


def test_tool_calls_are_reported_as_unknown_functions() -> None:
    out = io.StringIO()
    display = AnswerDisplay(out, wrap=False, plain=True, tool_calls_first=False)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    display.feed(content="", tool_calls=[call, call])
    assert out.getvalue() == (
        "  Model called a non-existent function 'get_weather()' with arguments: "
        '{"city":"Paris","days":2}\n'
        "  Model called a non-existent function 'get_weather()' with arguments: "
        '{"city":"Paris","days":2}'
    )


def test_verbose_summary_matches_ollama() -> None:
    out = io.StringIO()
    print_summary({"total_duration": 1_234_567_890, "load_duration": 12_345_678,
                   "prompt_eval_count": 12, "prompt_eval_duration": 60_000_000,
                   "eval_count": 30, "eval_duration": 500_000_000}, out)
    assert out.getvalue() == (
        "total duration:       1.23456789s\n"
        "load duration:        12.345678ms\n"
        "prompt eval count:    12 token(s)\n"
        "prompt eval duration: 60ms\n"
        "prompt eval rate:     200.00 tokens/s\n"
        "eval count:           30 token(s)\n"
        "eval duration:        500ms\n"
        "eval rate:            60.00 tokens/s\n"
    )
    zero = io.StringIO()
    print_summary({"total_duration": 5, "eval_count": 0}, zero)
    assert zero.getvalue() == "total duration:       5ns\n"
