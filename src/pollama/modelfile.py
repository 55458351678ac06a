"""The Modelfile language: parser, writer, and conversion to an ``/api/create`` request.

The lexer is a port of Ollama's ``parser.ParseFile`` state machine (``parser/parser.go``), so
that every Modelfile Ollama accepts parses here to the same commands:

* instructions are case-insensitive; ``#`` starts a comment only at the start of a line;
* after the instruction, blanks, then the value up to the end of the line, ``TrimSpace``d;
* ``\"\"\"…\"\"\"`` and ``"…"`` values may span lines and keep their text verbatim (no escapes); a
  value ends at the first line break where the text so far is a closed quote;
* ``\\n`` and ``\\r`` break lines; runes that are not printable (Go ``strconv.IsPrint``, which
  is Python's ``str.isprintable``) are dropped, except blanks and line breaks inside values;
* input bytes may start with a UTF-8 or UTF-16 byte-order mark.

Where we do better than Ollama: every error carries the 1-based line of the instruction it is
about (Ollama counts a line break as part of the next line and reports ``unexpected EOF``
without a line); ``PARAMETER`` names and values, ``REQUIRES`` and a second ``ADAPTER`` are
checked while parsing rather than when the request is built, so they also get a line; an
unknown parameter's message lists the valid names; and the writer quotes every value that
would not read back the same (``FROM`` included), so ``Modelfile.parse(str(m)) == m`` for every
``m`` that ``parse`` returns.

What must stay true: :meth:`Modelfile.parse` and ``str()`` are inverses on parsed Modelfiles;
deprecated parameters are dropped with a warning and never reach the commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pollama.errors import InvalidOption, ModelfileError
from pollama.format import go_float
from pollama.options import DEPRECATED_PARAMETERS, OPTIONS, format_params

__all__ = [
    "INSTRUCTIONS",
    "MESSAGE_ROLES",
    "Command",
    "CreateFields",
    "Modelfile",
    "render_modelfile",
]

INSTRUCTIONS: tuple[str, ...] = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
"""Every instruction, lowercased, in the order Ollama's error message lists them."""

MESSAGE_ROLES: tuple[str, ...] = ("system", "user", "assistant")

_TEXT_COMMANDS = frozenset(INSTRUCTIONS) - {"from", "parameter", "message"}

ERR_INVALID_COMMAND = (
    'command must be one of "from", "license", "template", "system", "adapter", "draft", '
    '"renderer", "parser", "parameter", "message", or "requires"'
)
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"
ERR_REQUIRES = "requires must be a valid semver (e.g. 0.14.0)"
ERR_ONE_ADAPTER = "only one adapter is currently supported"

_BLANKS = " \t"
_BREAKS = "\r\n"
_WHITESPACE = _BLANKS + _BREAKS  # the only whitespace that can reach a value's buffer


@dataclass
class Command:
    """One instruction. ``name`` is the lowercased instruction (``from``, ``system``, …) or,
    for ``PARAMETER``, the parameter's own name (as in Ollama); ``MESSAGE`` args are
    ``"role: text"``. ``line`` (1-based, 0 when built in code) is not part of equality."""

    name: str
    args: str
    line: int = field(default=0, compare=False)

    def __str__(self) -> str:
        if self.name == "from":
            return f"FROM {_quote(self.args)}"
        if self.name in _TEXT_COMMANDS:
            return f"{self.name.upper()} {_quote(self.args)}"
        if self.name == "message":
            role, _, content = self.args.partition(": ")
            return f"MESSAGE {role} {_quote(content)}"
        return f"PARAMETER {self.name} {_quote(self.args)}"


@dataclass
class CreateFields:
    """The pieces of an ``/api/create`` request a Modelfile describes (``CreateRequest``).

    ``froms`` keeps every ``FROM`` value in order (a model name or a path: the caller decides,
    as Ollama's client does by checking whether the path exists). Single-valued instructions
    keep the last value given; ``license`` and ``messages`` accumulate; ``parameters`` are typed
    and repeated ``stop`` values accumulate into one list. ``requires`` has no ``v`` prefix.
    """

    froms: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    draft: str | None = None
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None

    @property
    def from_(self) -> str | None:
        """The first ``FROM`` value (the base model or main weights file)."""
        return self.froms[0] if self.froms else None


@dataclass
class Modelfile:
    """A parsed Modelfile: its commands in file order, and the warnings parsing produced
    (deprecated parameters that were dropped). Warnings are not part of equality."""

    commands: list[Command] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def parse(cls, source: str | bytes) -> Modelfile:
        """Parse a Modelfile; raises :class:`ModelfileError` with the instruction's line."""
        text = _decode(source) if isinstance(source, bytes) else source.removeprefix("\ufeff")
        modelfile = cls()
        adapters = drafts = 0
        for command, is_parameter in _lex(text):
            line = command.line
            if is_parameter:
                if command.name in DEPRECATED_PARAMETERS:
                    modelfile.warnings.append(f"parameter {command.name} is deprecated")
                    continue
                try:
                    format_params({command.name: [command.args]})
                except InvalidOption as exc:
                    raise ModelfileError(exc.message, line) from None
            elif command.name == "requires" and _normalize_requires(command.args) is None:
                raise ModelfileError(ERR_REQUIRES, line)
            elif command.name == "adapter":
                adapters += 1
                if adapters > 1:
                    raise ModelfileError(ERR_ONE_ADAPTER, line)
            elif command.name == "draft":
                drafts += 1
                if drafts > 1:
                    raise ModelfileError("only one draft model is currently supported", line)
            modelfile.commands.append(command)
        if not any(c.name == "from" for c in modelfile.commands):
            raise ModelfileError(ERR_MISSING_FROM)
        return modelfile

    def __str__(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)

    def to_create_fields(self) -> CreateFields:
        """The ``/api/create`` fields, as Ollama's ``Modelfile.CreateRequest`` builds them
        (without touching the file system: paths are resolved by the caller)."""
        fields = CreateFields()
        for command in self.commands:
            name, args = command.name, command.args
            if name == "from":
                fields.froms.append(args)
            elif name == "adapter":
                fields.adapters.append(args)
            elif name == "draft":
                fields.draft = args
            elif name == "template":
                fields.template = args
            elif name == "system":
                fields.system = args
            elif name == "license":
                fields.license.append(args)
            elif name == "renderer":
                fields.renderer = args
            elif name == "parser":
                fields.parser = args
            elif name == "requires":
                requires = _normalize_requires(args)
                if requires is None:
                    raise ModelfileError(ERR_REQUIRES, command.line)
                fields.requires = requires
            elif name == "message":
                role, _, content = args.partition(": ")
                fields.messages.append({"role": role, "content": content})
            elif name not in DEPRECATED_PARAMETERS:
                try:
                    typed = format_params({name: [args]})
                except InvalidOption as exc:
                    raise ModelfileError(exc.message, command.line) from None
                for key, value in typed.items():
                    previous = fields.parameters.get(key)
                    if isinstance(previous, list) and isinstance(value, list):
                        previous.extend(value)
                    else:
                        fields.parameters[key] = value
        return fields


def render_modelfile(
    from_: str,
    *,
    name: str | None = None,
    adapters: Sequence[str] = (),
    draft: str | None = None,
    projectors: Sequence[str] = (),
    template: str | None = None,
    system: str | None = None,
    renderer: str | None = None,
    parser: str | None = None,
    requires: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    license: Sequence[str] = (),
    messages: Iterable[Mapping[str, str]] = (),
) -> str:
    """The ``modelfile`` that ``show`` returns (Ollama's ``Model.String`` plus the header).

    ``from_`` is the model's weights path, ``name`` the short model name the header suggests
    to build on (Ollama's ``ShortName``; without it only the first header line is written). Commands
    come in Ollama's order: FROM, ADAPTER, DRAFT, FROM per projector, TEMPLATE, SYSTEM,
    RENDERER, PARSER, (REQUIRES, which Ollama leaves out: pass ``None`` to match it), PARAMETER
    (list values one line each, numbers in Go's ``%v`` form), LICENSE, MESSAGE. Empty
    ``system``/``renderer``/``parser`` are left out as Ollama does; ``template=None`` too.
    """
    commands = [Command("from", from_)]
    commands += [Command("adapter", a) for a in adapters]
    if draft:
        commands.append(Command("draft", draft))
    commands += [Command("from", p) for p in projectors]
    if template is not None:
        commands.append(Command("template", template))
    for instruction, text in (
        ("system", system),
        ("renderer", renderer),
        ("parser", parser),
        ("requires", requires),
    ):
        if text:
            commands.append(Command(instruction, text))
    for key, value in (parameters or {}).items():
        for item in value if isinstance(value, list | tuple) else [value]:
            commands.append(Command(key, _go_value(key, item)))
    commands += [Command("license", text) for text in license]
    commands += [Command("message", f"{m['role']}: {m['content']}") for m in messages]

    header = '# Modelfile generated by "pollama show"\n'
    if name:
        header += f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {name}\n\n"
    return header + str(Modelfile(commands))


# --- lexer ------------------------------------------------------------------------------------

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _decode(data: bytes) -> str:
    """Go's ``unicode.BOMOverride(UTF8 decoder)``: a BOM picks UTF-8 or UTF-16, else UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace")
    if data.startswith(b"\xff\xfe"):
        return data[2:].decode("utf-16-le", "replace")
    if data.startswith(b"\xfe\xff"):
        return data[2:].decode("utf-16-be", "replace")
    return data.decode("utf-8", "replace")


def _is_alpha(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _is_param_char(ch: str) -> bool:
    return _is_alpha(ch) or "0" <= ch <= "9" or ch == "_"


def _unquote(value: str) -> tuple[str, bool]:
    """Go ``unquote``: strip ``\"\"\"`` or ``"``; ``False`` while a quote is still open."""
    if value.startswith('"""'):
        if len(value) >= 6 and value.endswith('"""'):
            return value[3:-3], True
        return "", False
    if value.startswith('"'):
        if len(value) >= 2 and value.endswith('"'):
            return value[1:-1], True
        return "", False
    return value, True


class _ValueBuffer:
    """The text of a value being read, with the positions of its first and last non-blank
    characters, so that "is the quote closed?" at each line break costs O(1), not O(len)."""

    __slots__ = ("chars", "first", "last")

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.first = -1
        self.last = -1

    def append(self, ch: str) -> None:
        if ch not in _WHITESPACE:
            if self.first < 0:
                self.first = len(self.chars)
            self.last = len(self.chars)
        self.chars.append(ch)

    def closed(self) -> bool:
        if self.first < 0:
            return True
        c, first, last = self.chars, self.first, self.last
        size = last - first + 1
        if size >= 3 and c[first] == c[first + 1] == c[first + 2] == '"':
            return size >= 6 and c[last] == c[last - 1] == c[last - 2] == '"'
        if c[first] == '"':
            return size >= 2 and c[last] == '"'
        return True

    def value(self) -> tuple[str, bool]:
        return _unquote("".join(self.chars).strip(_WHITESPACE))


# Longer than this codebase's ~60 lines on purpose: a port of Ollama's ``parser.ParseFile``
# state machine, kept in its shape so that it can be read against the original.
def _lex(text: str) -> Iterable[tuple[Command, bool]]:
    """Yield each command with whether it came from ``PARAMETER``, in file order."""
    state = _NIL
    word: list[str] = []  # instruction, parameter name or message role being read
    value = _ValueBuffer()
    name = role = ""
    line = cmd_line = 1
    is_parameter = False

    def finish() -> tuple[Command, bool]:
        args, ok = value.value()
        if not ok:
            raw = "".join(value.chars).strip(_WHITESPACE)
            quote = '"""' if raw.startswith('"""') else '"'
            raise ModelfileError(f"unexpected EOF: unterminated {quote} quote", cmd_line)
        if role:
            args = f"{role}: {args}"
        return Command(name, args, cmd_line), is_parameter

    for index, ch in enumerate(text):
        is_break = ch in _BREAKS
        if state == _NIL:
            if ch == "#":
                state = _COMMENT
            elif ch not in _BLANKS and not is_break:
                state, cmd_line = _NAME, line
                word = [ch] if ch.isprintable() else []
        elif state == _COMMENT:
            if is_break:
                state = _NIL
        elif state == _NAME:
            if _is_alpha(ch):
                word.append(ch)
            else:
                instruction = "".join(word).lower()
                if instruction in INSTRUCTIONS and is_break:
                    raise ModelfileError(
                        f"unexpected EOF: missing value for {instruction.upper()}", cmd_line
                    )
                if instruction not in INSTRUCTIONS or ch not in _BLANKS:
                    raise ModelfileError(ERR_INVALID_COMMAND, cmd_line)
                word, role, is_parameter = [], "", instruction == "parameter"
                if instruction == "parameter":
                    state = _PARAMETER
                elif instruction == "message":
                    state, name = _MESSAGE, "message"
                else:
                    state, name, value = _VALUE, instruction, _ValueBuffer()
        elif state in (_PARAMETER, _MESSAGE):
            accept = _is_param_char if state == _PARAMETER else _is_alpha
            if accept(ch):
                word.append(ch)
            elif ch in _BLANKS:
                if word:  # Ollama would read an empty name after two blanks
                    if state == _PARAMETER:
                        name = "".join(word)
                    else:
                        role = "".join(word)
                        if role not in MESSAGE_ROLES:
                            raise ModelfileError(ERR_INVALID_ROLE, cmd_line)
                    state, value = _VALUE, _ValueBuffer()
            elif is_break:
                what = "PARAMETER value" if state == _PARAMETER else "MESSAGE text"
                raise ModelfileError(f"unexpected EOF: missing {what}", cmd_line)
            elif state == _PARAMETER:
                raise ModelfileError(f"invalid character {ch!r} in parameter name", cmd_line)
            else:
                raise ModelfileError(ERR_INVALID_ROLE, cmd_line)
        else:  # _VALUE: blanks always belong to the value; a break ends it once quotes close
            if is_break and value.closed():
                yield finish()
                state = _NIL
            elif ch in _WHITESPACE or ch.isprintable():
                value.append(ch)

        if ch == "\n" or (ch == "\r" and text[index + 1 : index + 2] != "\n"):
            line += 1

    if state == _VALUE:
        yield finish()
    elif state == _NAME:
        instruction = "".join(word).lower()
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(ERR_INVALID_COMMAND, cmd_line)
        raise ModelfileError(f"unexpected EOF: missing value for {instruction.upper()}", cmd_line)
    elif state == _PARAMETER:
        raise ModelfileError("unexpected EOF: missing PARAMETER value", cmd_line)
    elif state == _MESSAGE:
        raise ModelfileError("unexpected EOF: missing MESSAGE text", cmd_line)


# --- writer -----------------------------------------------------------------------------------


def _quote(value: str) -> str:
    """Go ``quote``, widened so that every value ``parse`` can produce reads back the same.

    Ollama quotes values with a newline or a leading/trailing space (``\"\"\"`` when they
    contain ``"``, else ``"``). We also quote values with a ``\\r``, leading/trailing tabs, a
    leading ``"`` (which the reader would take as a quote), and the empty value (``""``, which
    survives editors that strip trailing blanks).
    """
    if value and value == value.strip(_WHITESPACE) and "\n" not in value and "\r" not in value:
        if not value.startswith('"'):
            return value
    return f'"""{value}"""' if '"' in value else f'"{value}"'


def _go_value(name: str, value: Any) -> str:
    """A parameter value as Go's ``fmt.Sprintf("%v", v)`` prints it (JSON-decoded: bools,
    numbers, strings), except that integral floats of integer options print as integers
    (Go would print ``1.048576e+06`` for a ``num_ctx`` of 1048576, which does not parse back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        spec = OPTIONS.get(name)
        if spec is not None and spec.kind == "int" and value.is_integer():
            return str(int(value))
        return go_float(value)
    return str(value)


# --- REQUIRES: golang.org/x/mod/semver.IsValid ------------------------------------------------

_SEMVER = re.compile(
    r"v(?:0|[1-9][0-9]*)"
    r"(?:\.(?:0|[1-9][0-9]*)"
    r"(?:\.(?:0|[1-9][0-9]*)"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
    r")?)?"
)
_BAD_NUMBER = re.compile(r"0[0-9]+")


def _normalize_requires(value: str) -> str | None:
    """Ollama's REQUIRES check: a ``v`` is added when missing, the result must be valid for
    ``semver.IsValid`` (which also accepts ``v1`` and ``v1.2``); returns it without the ``v``."""
    version = value if value.startswith("v") else "v" + value
    match = _SEMVER.fullmatch(version)
    if match is None:
        return None
    pre = match.group("pre")
    if pre and any(_BAD_NUMBER.fullmatch(part) for part in pre.split(".")):
        return None
    return version[1:]
