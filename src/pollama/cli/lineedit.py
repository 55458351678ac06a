"""Where the REPL's lines come from: a prompt that behaves like Ollama's ``readline`` package.

:class:`TerminalReader` is a prompt_toolkit prompt with Ollama's prompts (``>>> ``, ``... ``),
grey placeholders and keys (emacs editing, Ctrl+C, Ctrl+D, Ctrl+J for a newline, Ctrl+G for
the editor); :class:`OllamaHistory` keeps ``~/.ollama/history`` in Ollama's own format, so
both programs share it. :class:`ScriptedReader` replays lines for tests.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import History
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from pollama.format import go_quote

HISTORY_LIMIT = 100


class Interrupted(Exception):
    """Ctrl+C at the prompt."""


class EditRequested(Exception):
    """Ctrl+G at the prompt: compose the message in an editor."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class LineReader(Protocol):
    """Where the REPL's lines come from. ``read`` raises EOFError (Ctrl+D on an empty line),
    :class:`Interrupted` or :class:`EditRequested`."""

    alt: bool
    prefill: str
    history_enabled: bool

    def read(self) -> str: ...


class ScriptedReader:
    """Lines from a list, then EOF (tests, and a model's scripted demo)."""

    def __init__(self, lines: Iterable[str | BaseException]) -> None:
        self._lines = list(lines)
        self.alt = False
        self.prefill = ""
        self.history_enabled = True

    def read(self) -> str:
        if not self._lines:
            raise EOFError
        item = self._lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class OllamaHistory(History):
    """``~/.ollama/history``, Ollama's format: one line per entry, the last 100, rewritten
    whole (through a temp file) after each entry. Disabled history still recalls entries in
    the session but writes nothing, as Ollama's ``HistoryDisable``."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        super().__init__()
        self.path = path
        self.enabled = enabled
        self._entries: list[str] = []
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        self._entries = [ln.strip() for ln in text.splitlines() if ln.strip()][-HISTORY_LIMIT:]

    def load_history_strings(self) -> Iterable[str]:
        return list(reversed(self._entries))

    def store_string(self, string: str) -> None:
        self._entries.append(string)
        del self._entries[:-HISTORY_LIMIT]
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(entry + "\n" for entry in self._entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # history is a convenience; a read-only home must not end the chat


class TerminalReader:
    """A prompt_toolkit prompt that behaves like Ollama's readline: ``>>> `` / ``... ``,
    the grey placeholder, emacs keys, Ctrl+J for a newline, Ctrl+G for the editor."""

    def __init__(self, history_path: Path, *, history_enabled: bool) -> None:
        self.alt = False
        self.prefill = ""
        self.history = OllamaHistory(history_path, enabled=history_enabled)
        keys = KeyBindings()

        @keys.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            event.app.exit(exception=Interrupted())

        @keys.add("c-g")
        def _edit(event: KeyPressEvent) -> None:
            event.app.exit(exception=EditRequested(event.current_buffer.text))

        @keys.add("c-j")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        self._session: PromptSession[str] = PromptSession(
            history=self.history, key_bindings=keys, multiline=False,
            prompt_continuation="... ", enable_open_in_editor=False,
        )

    @property
    def history_enabled(self) -> bool:
        return self.history.enabled

    @history_enabled.setter
    def history_enabled(self, value: bool) -> None:
        self.history.enabled = value

    def read(self) -> str:
        placeholder = "Press Enter to send" if self.alt else "Send a message (/? for help)"
        default, self.prefill = self.prefill, ""
        return self._session.prompt(
            "... " if self.alt else ">>> ",
            placeholder=FormattedText([("fg:#8a8a8a", placeholder)]),
            default=default,
        )


def edit_in_editor(text: str, editor: str) -> str:
    """Ollama's ``editInExternalEditor``: ``OLLAMA_EDITOR``, ``VISUAL``, ``EDITOR``, ``vi``."""
    command = editor or os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    args = shlex.split(command)
    if not args or shutil.which(args[0]) is None:
        name = args[0] if args else command
        raise OSError(
            f"editor {go_quote(name)} not found, set OLLAMA_EDITOR to the path of your "
            "preferred editor"
        )
    fd, path = tempfile.mkstemp(prefix="ollama-prompt-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if subprocess.call([*args, path]) != 0:
            raise OSError("editor exited with error")
        return Path(path).read_text(encoding="utf-8").rstrip("\n")
    finally:
        os.unlink(path)
