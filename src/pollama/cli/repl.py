"""The interactive chat of ``pollama run`` (Ollama's ``cmd/interactive.go``,
docs/ollama-behaviour.md#the-interactive-chat).

:class:`Repl` reads lines from a :class:`~pollama.cli.lineedit.LineReader` (a prompt_toolkit
prompt on a terminal, a scripted list in tests), runs the ``/`` commands with Ollama's exact
output, and sends everything else as the next user message through ``/api/chat`` with the
whole history. For a model with ``vision`` (or ``audio``), the files a message names are
attached to it as Ollama does (``cli.attachments``), and a line that starts with such a path
is a message, not an unknown command.

Where this deliberately differs from Ollama, so that a session is never lost:

* an error from the server (a 400 for ``think`` or ``format``, an in-stream error, a server
  that dies mid-answer) prints one ``error: ...`` line and returns to the prompt, and the
  unanswered question is taken back out of the history;
* Ctrl+C during an answer keeps the part already shown as the assistant's message (it was
  seen, so the model should see it too); with nothing shown yet, the question is dropped;
* when the server has gone away, the next question starts it again (local hosts only).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from pollama.cli.attachments import extract_attachments, find_paths
from pollama.cli.lineedit import (
    EditRequested,
    Interrupted,
    LineReader,
    ScriptedReader,
    TerminalReader,
    edit_in_editor,
)
from pollama.cli.models import format_show
from pollama.cli.progress import WaitSpinner
from pollama.cli.render import AnswerDisplay, print_summary
from pollama.client import Client, ResponseError, ServerUnreachable
from pollama.errors import InvalidOption, PollamaError
from pollama.format import go_float, go_quote
from pollama.names import ModelName
from pollama.options import format_params

USAGE = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.
"""
# the commands, in the order Ollama tries them before taking a "/" line for a file path
_COMMANDS = ("/list", "/load", "/save", "/clear", "/set", "/show", "/help", "/?", "/exit",
             "/bye")
USAGE_MULTIMODAL = "Use /path/to/file to include .jpg, .png, .webp images, or .wav audio files.\n"
USAGE_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking

"""
USAGE_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
   Alt + b            Move back (left) one word
   Alt + f            Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor

  Ctrl + l            Clear the screen
  Ctrl + g            Open default editor to compose a prompt
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit pollama (/bye)

"""
USAGE_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template

"""
USAGE_PARAMETERS = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter num_gpu <int>          The number of layers to send to the GPU
  /set parameter stop <string> <string> ...   Set the stop parameters

"""


@dataclass
class Session:
    """Ollama's ``runOptions``: everything a chat request and ``/save`` are built from."""

    model: str
    parent_model: str = ""
    loaded_messages: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    word_wrap: bool = True
    format: str = ""
    system: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    keep_alive: str | None = None
    think: bool | str | None = None
    think_explicit: bool = False
    hide_thinking: bool = False
    verbose: bool = False

    def copy(self) -> Session:
        return copy.deepcopy(self)

    @property
    def multimodal(self) -> bool:
        return "vision" in self.capabilities or "audio" in self.capabilities

    def apply_show(self, info: dict[str, Any]) -> None:
        """Take what ``/api/show`` says about the model (Go ``applyShowResponseToRunOptions``
        plus ``inferThinkingOption``): thinking models think unless the user said otherwise."""
        self.parent_model = str((info.get("details") or {}).get("parent_model") or "")
        self.loaded_messages = list(info.get("messages") or [])
        self.capabilities = list(info.get("capabilities") or [])
        if not self.think_explicit:
            self.think = True if "thinking" in self.capabilities else None

    def request_fields(self) -> dict[str, Any]:
        """The optional fields every generate/chat request carries (omitted when unset)."""
        body: dict[str, Any] = {}
        if self.format:
            body["format"] = "json" if self.format == "json" else json.loads(self.format)
        if self.options:
            body["options"] = self.options
        if self.think is not None:
            body["think"] = self.think
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body


def go_print_value(value: Any) -> str:
    """Go ``%v`` of a typed option value: ``0.7``, ``42``, ``true``, ``[a b]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_print_value(v) for v in value) + "]"
    return str(value)


def load_model(api: Client, session: Session) -> None:
    """Ollama's ``loadOrUnloadModel``: an empty generate loads the model (and fails early
    for a ``think`` the model cannot do), with a spinner on stderr meanwhile."""
    body: dict[str, Any] = {"model": session.model}
    if session.keep_alive is not None:
        body["keep_alive"] = session.keep_alive
    if session.think is not None:
        body["think"] = session.think
    spinner = WaitSpinner()
    try:
        for _ in api.generate(body):
            pass
    finally:
        spinner.stop()


class Repl:
    """One interactive session. ``handle`` runs one line; ``run`` loops until /bye or EOF."""

    def __init__(
        self,
        api: Client,
        session: Session,
        reader: LineReader,
        *,
        editor: str = "",
        list_models: Callable[[str | None], None] | None = None,
        restart_server: Callable[[], bool] | None = None,
    ) -> None:
        self.api = api
        self.session = session
        self.reader = reader
        self.editor = editor
        self.list_models = list_models
        self.restart_server = restart_server
        self._sb: list[str] = []
        self._multiline: str | None = None  # None, "prompt" or "system"

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                line = self.reader.read()
            except EOFError:
                print()
                return
            except Interrupted:
                print("Use Ctrl + d or /bye to exit.")
                self._reset_input()
                continue
            except EditRequested as req:
                self._reset_input()
                try:
                    content = edit_in_editor(req.text, self.editor)
                except OSError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    continue
                if content.strip():
                    self.reader.prefill = content
                continue
            try:
                if not self.handle(line):
                    return
            except (PollamaError, httpx.HTTPError) as exc:
                print(f"error: {exc}")  # a failed command never ends the session

    def _reset_input(self) -> None:
        self._sb.clear()
        self._multiline = None
        self.reader.alt = False

    def handle(self, line: str) -> bool:
        """Run one input line; False means leave the session."""
        if self._multiline is not None:
            before, ended = _cut_suffix(line, '"""')
            self._sb.append(before)
            if not ended:
                self._sb.append("\n")
                self.reader.alt = True
                return True
            if self._multiline == "system":
                self._set_system("".join(self._sb), replace_last=False)
                self._sb.clear()
            self._multiline = None
            self.reader.alt = False
        elif line.startswith('"""'):
            text, ended = _cut_suffix(line[3:], '"""')
            self._sb.append(text)
            if not ended:
                self._sb.append("\n")
                self._multiline = "prompt"
                self.reader.alt = True
        elif "\n" in line:
            self._sb.append(line)  # pasted or Ctrl+J text is a message, never a command
        elif line.startswith("/") and not self._names_a_file(line):
            return self._command(line)
        else:
            self._sb.append(line)
        text = "".join(self._sb)
        if self._multiline is None and text.strip():
            self._sb.clear()
            self.send(text)
        elif self._multiline is None:
            self._sb.clear()
        return True

    def _names_a_file(self, line: str) -> bool:
        """Ollama sends ``/path/to/photo.png what is this?`` to a multimodal model as a
        message, not as an unknown command: a line whose first word begins a path the
        attachment regex finds (the file need not exist). The commands are checked first."""
        if line.startswith(_COMMANDS):
            return False
        first = line.split()[0]
        return any(path.startswith(first) for path in find_paths(line, self.session.capabilities))

    # -- commands ------------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        args = line.split()
        if line.startswith("/list"):
            if self.list_models is not None:
                self.list_models(args[1] if len(args) > 1 else None)
        elif line.startswith("/load"):
            self._load(args)
        elif line.startswith("/save"):
            self._save(args)
        elif line.startswith("/clear"):
            self.session.messages = []
            if self.session.system:
                self.session.messages.append({"role": "system", "content": self.session.system})
            print("Cleared session context")
        elif line.startswith("/set"):
            self._set(args)
        elif line.startswith("/show"):
            self._show(args)
        elif line.startswith(("/help", "/?")):
            topic = args[1] if len(args) > 1 else None
            if topic is None:
                usage = USAGE + (USAGE_MULTIMODAL if self.session.multimodal else "") + "\n"
                _err(usage)
            elif topic in ("set", "/set"):
                _err(USAGE_SET)
            elif topic in ("show", "/show"):
                _err(USAGE_SHOW)
            elif topic in ("shortcut", "shortcuts"):
                _err(USAGE_SHORTCUTS)
        elif line.startswith(("/exit", "/bye")):
            return False
        else:
            print(f"Unknown command '{args[0]}'. Type /? for help")
        return True

    def _load(self, args: list[str]) -> None:
        if len(args) != 2:
            print("Usage:\n  /load <modelname>")
            return
        original = self.session.copy()
        s = self.session
        s.model, s.messages, s.loaded_messages = args[1], [], []
        print(f"Loading model '{s.model}'")
        try:
            s.apply_show(self.api.show(s.model))
            load_model(self.api, s)
        except ResponseError as exc:
            self.session = original
            if exc.status_code == 404:
                print(f"Couldn't find model '{args[1]}'")
            else:
                print(f"error: {exc}")
        except ServerUnreachable as exc:
            self.session = original
            print(f"error: {exc}")

    def _save(self, args: list[str]) -> None:
        if len(args) != 2:
            print("Usage:\n  /save <modelname>")
            return
        name = args[1]
        if not ModelName.is_valid(name):
            print(f"error: The model name '{name}' is invalid")
            return
        s = self.session
        parent = s.parent_model if ModelName.is_valid(s.parent_model) else ""
        request: dict[str, Any] = {"model": name, "from": parent or s.model}
        if s.system:
            request["system"] = s.system
        if s.options:
            request["parameters"] = s.options
        messages = s.loaded_messages + s.messages
        if messages:
            request["messages"] = messages
        try:
            for _ in self.api.create(request):
                pass
        except (ResponseError, ServerUnreachable) as exc:
            print(f"error: {exc}")
            return
        print(f"Created new model '{name}'")

    def _set(self, args: list[str]) -> None:
        s = self.session
        if len(args) < 2:
            _err(USAGE_SET)
            return
        what = args[1]
        if what == "history":
            self.reader.history_enabled = True
        elif what == "nohistory":
            self.reader.history_enabled = False
        elif what in ("wordwrap", "nowordwrap"):
            s.word_wrap = what == "wordwrap"
            print(f"Set '{what}' mode.")
        elif what in ("verbose", "quiet"):
            s.verbose = what == "verbose"
            print(f"Set '{what}' mode.")
        elif what in ("think", "nothink"):
            level = args[2] if what == "think" and len(args) > 2 else ""
            s.think = (level or True) if what == "think" else False
            s.think_explicit = True
            if "thinking" not in s.capabilities:
                _err(f"warning: model {go_quote(s.model)} does not support thinking output\n")
            print(f"Set 'think' mode to '{level}'." if level else f"Set '{what}' mode.")
        elif what == "format":
            if len(args) < 3 or args[2] != "json":
                print("Invalid or missing format. For 'json' mode use '/set format json'")
            else:
                s.format = "json"
                print("Set format to 'json' mode.")
        elif what == "noformat":
            s.format = ""
            print("Disabled format.")
        elif what == "parameter":
            if len(args) < 4:
                _err(USAGE_PARAMETERS)
                return
            try:
                value = format_params({args[2]: args[3:]})[args[2]]
            except InvalidOption as exc:
                print(f"Couldn't set parameter: {go_quote(str(exc))}")
                return
            print(f"Set parameter '{args[2]}' to '{', '.join(args[3:])}'")
            s.options[args[2]] = value
        elif what == "system":
            if len(args) < 3:
                _err(USAGE_SET)
                return
            text = " ".join(args[2:])
            if text.startswith('"""'):
                text, ended = _cut_suffix(text[3:], '"""')
                if not ended:
                    # Ollama loses the line break after the first line; keep it
                    self._sb.append(text + "\n" if text else "")
                    self._multiline = "system"
                    self.reader.alt = True
                    return
            self._set_system(text, replace_last=True)
        else:
            print(f"Unknown command '/set {what}'. Type /? for help")

    def _set_system(self, text: str, *, replace_last: bool) -> None:
        """Ollama replaces a trailing system message for a one-line ``/set system`` but
        appends one for the multi-line form; both are kept as they are."""
        s = self.session
        s.system = text
        message = {"role": "system", "content": text}
        if replace_last and s.messages and s.messages[-1].get("role") == "system":
            s.messages[-1] = message
        else:
            s.messages.append(message)
        print("Set system message.")

    def _show(self, args: list[str]) -> None:
        s = self.session
        if len(args) < 2:
            _err(USAGE_SHOW)
            return
        extra: dict[str, Any] = {}
        if s.system:
            extra["system"] = s.system
        if s.options:
            extra["options"] = s.options
        try:
            info = self.api.show(s.model, **extra)
        except (ResponseError, ServerUnreachable):
            print("error: couldn't get model")
            return
        what = args[1]
        if what == "info":
            _err(format_show(info))
        elif what == "license":
            print(info.get("license") or "No license was specified for this model.")
        elif what == "modelfile":
            print(info.get("modelfile", ""))
        elif what == "parameters":
            print("Model defined parameters:")
            params = info.get("parameters") or ""
            if not params:
                print("  No additional parameters were specified for this model.")
            for ln in params.split("\n") if params else []:
                print(f"  {ln}")
            print()
            if s.options:
                print("User defined parameters:")
                for key, value in s.options.items():
                    print(f"  {key:<30} {go_print_value(value)}")
                print()
        elif what == "system":
            if s.system or info.get("system"):
                print((s.system or info.get("system", "")) + "\n")
            else:
                print("No system message was specified for this model.")
        elif what == "template":
            print(info.get("template") or "No prompt template was specified for this model.")
        else:
            print(f"Unknown command '/show {what}'. Type /? for help")

    # -- a chat turn ---------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Ask the model; the answer joins the history (see the module docstring). A file the
        message names that cannot be attached raises before anything is sent."""
        s = self.session
        # a multimodal model gets the files the message names; they stay in the history
        content, images = extract_attachments(text, s.capabilities)
        message: dict[str, Any] = {"role": "user", "content": content}
        if images:
            message["images"] = images
        s.messages.append(message)
        answer = self.chat()
        if answer is None:
            s.messages.pop()
        else:
            s.messages.append(answer)

    def chat(self, *, retry: bool = True) -> dict[str, Any] | None:
        """Stream one answer to the history as it stands; None when there is no answer to
        keep. Answers end with a blank line, then the statistics when verbose (Ollama)."""
        s = self.session
        body = {"model": s.model, "messages": s.messages, **s.request_fields()}
        out = sys.stdout
        display = AnswerDisplay(out, wrap=s.word_wrap and _isatty(out), plain=False,
                                hide_thinking=s.hide_thinking)
        spinner = WaitSpinner()
        final: dict[str, Any] = {}
        stream = self.api.chat(body)
        try:
            for item in stream:
                message = item.get("message") or {}
                if message.get("content") or not s.hide_thinking:
                    spinner.stop()
                display.feed(str(message.get("content") or ""), str(message.get("thinking") or ""),
                             message.get("tool_calls"))
                if item.get("done"):
                    final = item
        except KeyboardInterrupt:
            spinner.stop()
            display.finish()
            out.write("\n\n" if display.wrote else "\n")
            out.flush()
            if not (display.content or display.thinking):
                return None
            return _assistant(display)
        except ServerUnreachable as exc:
            spinner.stop()
            if retry and not display.wrote and self.restart_server and self.restart_server():
                return self.chat(retry=False)
            print(f"error: {exc}")
            return None
        except ResponseError as exc:
            return self._failed(spinner, display, str(exc))
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            return self._failed(
                spinner, display,
                f"the pollama server closed the connection before the answer was complete "
                f"({type(exc).__name__})",
            )
        finally:
            stream.close()
            spinner.stop()
        display.finish()
        out.write("\n\n")
        out.flush()
        if s.verbose and final:
            print_summary(final)
        return _assistant(display)

    @staticmethod
    def _failed(spinner: WaitSpinner, display: AnswerDisplay, message: str) -> None:
        spinner.stop()
        display.finish()
        if display.wrote:
            sys.stdout.write("\n")
        print(f"error: {message}")
        return None


def _assistant(display: AnswerDisplay) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": display.content}
    if display.thinking:
        message["thinking"] = display.thinking
    return message


def _cut_suffix(text: str, suffix: str) -> tuple[str, bool]:
    if text.endswith(suffix):
        return text[: -len(suffix)], True
    return text, False


def _err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = [
    "EditRequested",
    "Interrupted",
    "LineReader",
    "Repl",
    "ScriptedReader",
    "Session",
    "TerminalReader",
    "go_print_value",
    "load_model",
]
