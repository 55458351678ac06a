"""Stream parsers that split a model's raw output into thinking, content and tool calls.

Ports of Ollama's generic parsers, fed the output one chunk at a time so that streaming
clients see each part as soon as it is unambiguous:

* :class:`ThinkingParser` (``thinking/parser.go``): text between an opening and a closing
  tag (``<think>``/``</think>``) at the very start of the output is thinking; leading
  whitespace and the whitespace right after each tag are dropped; a partial tag at the end of
  a chunk is held back until the next chunk decides it.
* :class:`ToolCallParser` (``tools/tools.go``): text before the tool-call tag
  (``<tool_call>``, ``[TOOL_CALLS]``, or ``{`` for templates that emit bare JSON) is content;
  after it, each known tool name followed by a balanced JSON object becomes a call. With the
  tag ``{`` or ``[`` any non-blank text before it means "no tool calls in this answer".
* :class:`OutputParser` chains them: thinking first, then tool calls in what is left.

Deliberate differences from Ollama, so that nothing the model wrote is lost and small models
work: :meth:`OutputParser.finish` flushes what the parsers still hold back (a partial tag at
the very end); text after a tool-call tag that never parsed as a call is returned as content
for every tag (Ollama drops it unless the tag is ``{``/``[``); when one chunk carries both
content and a call, both are kept (Ollama's chat handler keeps only the content); and an
answer that begins with a JSON object naming a tool is a call even without the tag (as
llama.cpp's Hermes parser, which Ollama's native path uses, accepts).

Which tags a model uses comes from its template (:func:`thinking_tags_for`,
:func:`tool_call_tag_for`): for a Go template the parse-tree heuristics of
``pollama.template``; for a GGUF Jinja template, the markers its text mentions.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pollama.inference.types import ToolCall
from pollama.template import infer_thinking_tags, infer_tool_call_tag

__all__ = [
    "OutputParser",
    "Parsed",
    "ThinkingParser",
    "ToolCallParser",
    "new_tool_call_id",
    "thinking_tags_for",
    "tool_call_tag_for",
]

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_tool_call_id() -> str:
    """Ollama's ``toolCallId``: ``call_`` and 8 random ``[a-z0-9]``."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def _overlap(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# -- thinking ------------------------------------------------------------------------------

_LOOKING, _STARTED, _THINKING, _DONE_EATING, _DONE = range(5)


class ThinkingParser:
    """Ollama's thinking state machine (``thinking.Parser``).

    Invariant: text is only ever returned once, as thinking or as content; what is not yet
    returned sits in ``_acc``.
    """

    def __init__(self, opening: str, closing: str) -> None:
        self.opening = opening
        self.closing = closing
        self._state = _LOOKING
        self._acc = ""

    @property
    def done(self) -> bool:
        """True once the thinking (if any) is over and everything else is content."""
        return self._state in (_DONE_EATING, _DONE)

    def add(self, text: str) -> tuple[str, str]:
        """Feed output; returns ``(thinking, content)`` that is now unambiguous."""
        self._acc += text
        thinking: list[str] = []
        content: list[str] = []
        more = True
        while more:
            t, c, more = self._eat()
            thinking.append(t)
            content.append(c)
        return "".join(thinking), "".join(content)

    def finish(self) -> tuple[str, str]:
        """At the end of the output: whatever is still held back, classified as best it can."""
        acc, self._acc = self._acc, ""
        if self._state == _LOOKING:
            # Only whitespace or a partial opening tag was seen: it is content after all.
            return "", acc
        if self._state in (_STARTED, _THINKING):
            return acc, ""  # a partial closing tag that never completed
        return "", acc.lstrip() if self._state == _DONE_EATING else acc

    def _eat(self) -> tuple[str, str, bool]:
        acc = self._acc
        if self._state == _LOOKING:
            trimmed = acc.lstrip()
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening) :].lstrip()
                self._acc = after
                self._state = _THINKING if after else _STARTED
                return "", "", True
            if self.opening.startswith(trimmed):  # blank, or a partial opening tag
                return "", "", False
            self._state = _DONE
            self._acc = ""
            return "", acc, False  # no thinking: the untrimmed text is content
        if self._state == _STARTED:
            trimmed = acc.lstrip()
            self._acc = ""
            if not trimmed:
                return "", "", False
            self._state = _THINKING
            self._acc = trimmed
            return "", "", True
        if self._state == _THINKING:
            if self.closing in acc:
                thinking, remaining = acc.split(self.closing, 1)
                remaining = remaining.lstrip()
                self._acc = ""
                self._state = _DONE if remaining else _DONE_EATING
                return thinking, remaining, False
            n = _overlap(acc, self.closing)
            if n:
                self._acc = acc[-n:]
                return acc[:-n], "", False
            self._acc = ""
            return acc, "", False
        if self._state == _DONE_EATING:
            trimmed = acc.lstrip()
            self._acc = ""
            if trimmed:
                self._state = _DONE
            return "", trimmed, False
        self._acc = ""
        return "", acc, False


# -- tool calls ----------------------------------------------------------------------------


def _find_tool(names: Sequence[str], buf: str) -> tuple[str | None, int]:
    """The earliest (then longest) known tool name in ``buf`` and where it ends.

    None while ``buf`` ends with a proper prefix of a tool name (``get`` of ``get_weather``):
    more output is needed to tell them apart.
    """
    if not buf or not names:
        return None, 0
    longest = max(len(n) for n in names)
    for i in range(1, min(len(buf), longest) + 1):
        tail = buf[-i:]
        if any(len(tail) < len(n) and n.startswith(tail) for n in names):
            return None, 0
    found: str | None = None
    start = end = -1
    for name in names:
        pos = buf.find(name)
        if pos == -1:
            continue
        if found is not None and (pos > start or (pos == start and len(name) <= len(found))):
            continue
        found, start, end = name, pos, pos + len(name)
    return found, end


def _as_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _arguments_in(obj: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, bool]:
    """Ollama's ``findObject``: where in a parsed object the call's arguments are."""
    if "name" in obj:
        for key in ("arguments", "parameters"):
            args = _as_object(obj.get(key))
            if args is not None:
                return args, True
        return None, True
    args = _as_object(obj.get(name))
    if args is not None:
        return args, True
    for value in obj.values():
        children = value if isinstance(value, list) else [value]
        for child in children:
            if isinstance(child, dict):
                found, ok = _arguments_in(child, name)
                if ok:
                    return found, True
    return None, False


def _structural(buf: str) -> Iterator[tuple[int, str]]:
    """The characters of ``buf`` outside JSON strings, with their index (escape-aware), as
    Ollama's scanners walk them."""
    in_string = escaped = False
    for i, c in enumerate(buf):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            in_string = not in_string
        elif not in_string:
            yield i, c


def _find_arguments(name: str, buf: str) -> tuple[dict[str, Any] | None, int]:
    """The first balanced JSON object in ``buf`` that parses, as the call's arguments.

    Returns the arguments (None when no complete object is there yet) and the index just
    past the object. String- and escape-aware, as Ollama's scanner is.
    """
    start = -1
    depth = 0
    for i, c in _structural(buf):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0 and start != -1:
                try:
                    data = json.loads(buf[start : i + 1])
                except json.JSONDecodeError:
                    start = -1
                    continue
                if not isinstance(data, dict):
                    start = -1
                    continue
                args, ok = _arguments_in(data, name)
                if ok:
                    return (args if args is not None else {}), i + 1
                return data, i + 1
            depth = max(depth, 0)
    return None, 0


def _balanced_done(buf: str, tag: str) -> bool:
    """For the tags ``{``/``[``: has the first bracketed value closed?"""
    opening, closing = ("{", "}") if tag == "{" else ("[", "]")
    depth = 0
    for _i, c in _structural(buf):
        if c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return True
    return False


class ToolCallParser:
    """Ollama's ``tools.Parser`` over the names of the request's tools.

    ``add`` returns the calls completed by this chunk and the content that is now safe to
    show; :meth:`finish` returns what is left at the end. Invariant: ``_raw`` holds every
    character since the tag, so an answer in which no call parses can be given back whole.

    Like llama.cpp's Hermes parser (what Ollama's native path runs for Qwen-style Jinja
    templates), an answer that *starts* with a JSON object is also tried as a call when the
    tag is a marker such as ``<tool_call>``: small models often drop the marker. It becomes a
    call only if it names a known tool; otherwise it is content, as with the ``{`` tag.
    """

    def __init__(self, tag: str, tool_names: Sequence[str], *, bare_json: bool = True) -> None:
        self.tag = tag or "{"
        self.names = [n for n in dict.fromkeys(tool_names) if n]
        self.bare_json = bare_json and self.tag not in ("{", "[")
        self.count = 0  # calls parsed so far
        self._mode = ""  # the tag that opened the calls: self.tag, or "{" for bare JSON
        self._started = False  # non-blank output seen (a bare JSON call must come first)
        self._done = False
        self._buf = ""
        self._raw = ""

    def prime(self) -> None:
        """The prompt already ends with the tag (a forced tool call): start inside a call."""
        self._mode = self.tag

    def add(self, text: str) -> tuple[list[ToolCall], str]:
        if self._done:
            return [], text
        content = ""
        self._buf += text
        if self._mode:
            self._raw += text
        else:
            if self.bare_json and not self._started:
                lead = self._buf.lstrip()
                if not lead:
                    return [], ""  # only blanks so far: wait
                self._started = True
                if lead.startswith("{"):
                    self._mode, self._raw = "{", self._buf
            if not self._mode:
                i, found = self._find_tag()
                if i == -1:
                    content, self._buf = self._buf, ""
                else:
                    content, self._buf = self._buf[:i], self._buf[i:]
                if self.tag in ("{", "[") and content.strip():
                    # Bare-JSON models: text first means this answer has no tool call.
                    self._done = True
                    rest, self._buf = self._buf, ""
                    return [], content + rest
                if not found:
                    return [], content
                self._mode, self._raw = self.tag, self._buf
        calls: list[ToolCall] = []
        while (call := self._parse_one()) is not None:
            calls.append(call)
        if self._mode in ("{", "[") and not calls and _balanced_done(self._buf, self._mode):
            # The bracketed value closed without being a call: it was content.
            self._done = True
            self._buf = ""
            if not self.count:
                return [], content + self._raw
        return calls, content

    def finish(self) -> str:
        """Content still held back at the end: all text since the tag if no call parsed."""
        if self._done:
            return ""
        rest, self._buf = self._buf, ""
        if not self._mode:
            return rest  # blanks, or a partial tag that never completed
        return "" if self.count else self._raw

    def _find_tag(self) -> tuple[int, bool]:
        i = self._buf.find(self.tag)
        if i != -1:
            return i, True
        n = _overlap(self._buf, self.tag)
        return (len(self._buf) - n, False) if n else (-1, False)

    def _parse_one(self) -> ToolCall | None:
        name, end = _find_tool(self.names, self._buf)
        if name is None:
            return None
        args, args_end = _find_arguments(name, self._buf)
        if args is None:
            return None
        call = ToolCall(id=new_tool_call_id(), index=self.count, name=name, arguments=args)
        self.count += 1
        self._buf = self._buf[max(end, args_end) :]
        return call


# -- both ----------------------------------------------------------------------------------


@dataclass
class Parsed:
    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.thinking or self.content or self.tool_calls)

    def extend(self, other: Parsed) -> None:
        self.thinking += other.thinking
        self.content += other.content
        self.tool_calls += other.tool_calls


class OutputParser:
    """Thinking, then tool calls, over one response's raw output (either may be absent)."""

    def __init__(
        self, thinking: ThinkingParser | None = None, tools: ToolCallParser | None = None
    ) -> None:
        self.thinking = thinking
        self.tools = tools

    @property
    def thinking_done(self) -> bool:
        """Whether what follows is the answer (a thinking parser past its thinking)."""
        return self.thinking is not None and self.thinking.done

    def add(self, text: str) -> Parsed:
        thinking, content = self.thinking.add(text) if self.thinking else ("", text)
        return self._tools(thinking, content)

    def reset_tools(self) -> None:
        """Forget the tool-call state (the answer is being generated again)."""
        if self.tools is not None:
            old = self.tools
            self.tools = ToolCallParser(old.tag, old.names, bare_json=old.bare_json)

    def finish(self) -> Parsed:
        thinking, content = self.thinking.finish() if self.thinking else ("", "")
        out = self._tools(thinking, content)
        if self.tools is not None:
            out.content += self.tools.finish()
        return out

    def _tools(self, thinking: str, content: str) -> Parsed:
        if self.tools is None or not content:
            return Parsed(thinking, content)
        calls, content = self.tools.add(content)
        return Parsed(thinking, content, calls)


# -- tags from templates -------------------------------------------------------------------

# Markers a GGUF Jinja template uses before a tool call, most specific first.
_JINJA_TOOL_TAGS = ("<tool_call>", "[TOOL_CALLS]", "<|tool_call|>", "<|tool_call_start|>")


def tool_call_tag_for(template: Any) -> str:
    """The tool-call tag of a ``PromptTemplate`` (``{`` when it uses bare JSON)."""
    if template.jinja is not None:
        text = template.jinja.text
        return next((t for t in _JINJA_TOOL_TAGS if t in text), "{")
    return infer_tool_call_tag(template._go())


def thinking_tags_for(template: Any) -> tuple[str, str] | None:
    """The (opening, closing) thinking tags of a ``PromptTemplate``, or None."""
    if template.jinja is not None:
        return ("<think>", "</think>") if "thinking" in template.capabilities() else None
    return infer_thinking_tags(template._go())


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The function names of a request's tools, in order."""
    names: list[str] = []
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names
