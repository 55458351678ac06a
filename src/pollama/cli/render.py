"""How ``pollama run`` writes an answer: word wrap, the thinking block, tool calls, statistics.

These are Ollama's ``displayResponse``, ``thinkingOutputOpeningText``/``ClosingText``,
``renderToolCalls`` and ``Metrics.Summary`` (``cmd/cmd.go``, ``api/types.go``), written
against a stream so that tests can feed them a scripted answer.

Word wrap happens as the tokens arrive: characters are printed at once, and when a line would
pass ``width - 5`` columns the word being written is moved to the next line (cursor back over
it, clear to the end of the line, newline, the word again). The width is read for every
chunk, so a resized terminal keeps wrapping right. It writes escape codes, so callers turn it
on only for a terminal. Two things are done better than Ollama: a word longer than the line
is broken at the margin instead of being printed twice, and the word buffer keeps the
character that triggered a wrap, so the next wrap moves the whole word.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from prompt_toolkit.utils import get_cwidth

from pollama.cli.progress import terminal_size
from pollama.format import go_duration

COLOR_GREY = "\x1b[38;5;245m"
COLOR_DEFAULT = "\x1b[0m"
COLOR_BOLD = "\x1b[1m"


def _width(text: str) -> int:
    return sum(get_cwidth(ch) for ch in text)


class WordWrapper:
    """Ollama's ``displayResponseState``: the column reached and the word being written."""

    def __init__(
        self, out: TextIO, *, wrap: bool, width: Callable[[], int] | None = None
    ) -> None:
        self.out = out
        self.wrap = wrap
        self._width = width or (lambda: terminal_size(out)[0])
        self.line_length = 0
        self.word = ""

    def reset(self) -> None:
        self.line_length = 0
        self.word = ""

    def write(self, content: str) -> None:
        if not content:
            return
        width = self._width() or 80
        if not self.wrap or width < 10:
            self.out.write(content)
            self.out.flush()
            return
        limit = width - 5
        parts: list[str] = []
        for ch in content:
            w = get_cwidth(ch)
            if ch in "\n\r":
                parts.append(ch)
                self.reset()
                continue
            if self.line_length + max(w, 1) > limit:
                if ch in " \t":
                    parts.append("\n")  # the space ends the line instead of starting the next
                    self.reset()
                    continue
                word_width = _width(self.word)
                if not self.word or word_width > width - 10:
                    parts.append("\n")  # nothing to move (or too long to move): break here
                    self.reset()
                else:
                    parts.append(f"\x1b[{word_width}D\x1b[K\n{self.word}")
                    self.line_length = word_width
            parts.append(ch)
            self.line_length += w
            if w >= 2 or ch in " \t":
                self.word = ""  # wide (CJK) characters may break anywhere
            else:
                self.word += ch
        self.out.write("".join(parts))
        self.out.flush()


def thinking_opening(plain: bool) -> str:
    text = "Thinking...\n"
    return text if plain else COLOR_GREY + COLOR_BOLD + text + COLOR_DEFAULT + COLOR_GREY


def thinking_closing(plain: bool) -> str:
    text = "...done thinking.\n\n"
    return text if plain else COLOR_GREY + COLOR_BOLD + text + COLOR_DEFAULT


def render_tool_calls(tool_calls: list[dict[str, Any]], plain: bool) -> str:
    """The CLI registers no tools, so every call is reported as a call to a missing one."""
    explain = "" if plain else COLOR_GREY + COLOR_BOLD
    values = "" if plain else COLOR_DEFAULT
    lines = []
    for call in tool_calls:
        function = call.get("function") or {}
        args = json.dumps(function.get("arguments") or {}, separators=(",", ":"),
                          ensure_ascii=False)
        lines.append(
            f"  Model called a non-existent function '{values}{function.get('name', '')}"
            f"{explain}()' with arguments: {values}{args}{explain}"
        )
    out = "\n".join(lines)
    return out if plain else explain + out + COLOR_DEFAULT


class AnswerDisplay:
    """Streams one answer to ``out`` and keeps its text.

    Thinking (unless hidden) opens with ``Thinking...`` and is closed by
    ``...done thinking.`` when the content or a tool call begins; in colour on a terminal
    (``plain`` False), as plain text otherwise. ``tool_calls_first`` is the chat order
    (tool calls before the content of the same chunk); generate prints them after.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        wrap: bool,
        plain: bool,
        hide_thinking: bool = False,
        tool_calls_first: bool = True,
        width: Callable[[], int] | None = None,
    ) -> None:
        self.out = out
        self.plain = plain
        self.hide_thinking = hide_thinking
        self.tool_calls_first = tool_calls_first
        self._wrapper = WordWrapper(out, wrap=wrap, width=width)
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._open = False
        self._closed = False
        self.wrote = False

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def thinking(self) -> str:
        return "".join(self._thinking)

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.wrote = True

    def feed(self, content: str = "", thinking: str = "",
             tool_calls: list[dict[str, Any]] | None = None) -> None:
        if thinking:
            self._thinking.append(thinking)
            if not self.hide_thinking:
                if not self._open:
                    self._emit(thinking_opening(self.plain))
                    self._open, self._closed = True, False
                self._wrapper.write(thinking)
                self.wrote = True
        if self._open and not self._closed and (content or tool_calls):
            if not self.thinking.endswith("\n"):
                self._emit("\n")
            self._emit(thinking_closing(self.plain))
            self._open, self._closed = False, True
            self._wrapper.reset()
        if tool_calls and self.tool_calls_first:
            self._emit(render_tool_calls(tool_calls, self.plain))
        if content:
            self._content.append(content)
            self._wrapper.write(content)
            self.wrote = True
        if tool_calls and not self.tool_calls_first:
            self._emit(render_tool_calls(tool_calls, self.plain))

    def finish(self) -> None:
        """End an answer that stopped inside its thinking: the colour must not leak."""
        if self._open and not self._closed and not self.plain:
            self._emit(COLOR_DEFAULT)


def print_summary(final: dict[str, Any], out: TextIO | None = None) -> None:
    """Ollama's ``--verbose`` statistics block (``api.Metrics.Summary``), on stderr.

    A line appears only when its value is positive; durations are Go ``time.Duration``
    strings; rates have two decimals.
    """
    stream = out or sys.stderr

    def line(label: str, value: str) -> None:
        print(f"{label + ':':<22}{value}", file=stream)

    total, load = final.get("total_duration") or 0, final.get("load_duration") or 0
    p_count = final.get("prompt_eval_count") or 0
    p_dur = final.get("prompt_eval_duration") or 0
    e_count, e_dur = final.get("eval_count") or 0, final.get("eval_duration") or 0
    if total > 0:
        line("total duration", go_duration(total))
    if load > 0:
        line("load duration", go_duration(load))
    if p_count > 0:
        line("prompt eval count", f"{p_count} token(s)")
    if p_dur > 0:
        line("prompt eval duration", go_duration(p_dur))
        line("prompt eval rate", f"{p_count / (p_dur / 1e9):.2f} tokens/s")
    if e_count > 0:
        line("eval count", f"{e_count} token(s)")
    if e_dur > 0:
        line("eval duration", go_duration(e_dur))
        line("eval rate", f"{e_count / (e_dur / 1e9):.2f} tokens/s")
    stream.flush()
