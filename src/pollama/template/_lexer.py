"""Lexer for the Go ``text/template`` language, a port of ``text/template/parse/lex.go``.

The lexer turns template source into a flat list of items (tokens). It is a state machine,
as in Go, because the trim markers (``{{- `` and `` -}}``) and comments change what counts as
text, and matching Go's exact trimming rules is what makes rendered prompts byte-identical to
Ollama's. What must stay true:

* ``{{- `` trims all ASCII whitespace (space, tab, CR, LF) before the action, `` -}}`` all after
  it; the marker must be separated from the action by such a space (``{{-3}}`` is a number).
* Comments are ``{{/* ... */}}`` (optionally trimmed) and produce no item.
* Lexing stops at the first error, which becomes an ``ERROR`` item the parser reports.

Positions are character offsets into the source (Go uses byte offsets; they differ only in
error messages for non-ASCII text).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from ..format import go_quote


class Item(enum.IntEnum):
    """Token kinds; keywords sort after ``KEYWORD`` as in Go."""

    ERROR = enum.auto()
    BOOL = enum.auto()
    CHAR = enum.auto()
    CHAR_CONSTANT = enum.auto()
    COMPLEX = enum.auto()
    ASSIGN = enum.auto()
    DECLARE = enum.auto()
    EOF = enum.auto()
    FIELD = enum.auto()
    IDENTIFIER = enum.auto()
    LEFT_DELIM = enum.auto()
    LEFT_PAREN = enum.auto()
    NUMBER = enum.auto()
    PIPE = enum.auto()
    RAW_STRING = enum.auto()
    RIGHT_DELIM = enum.auto()
    RIGHT_PAREN = enum.auto()
    SPACE = enum.auto()
    STRING = enum.auto()
    TEXT = enum.auto()
    VARIABLE = enum.auto()
    KEYWORD = enum.auto()
    BLOCK = enum.auto()
    BREAK = enum.auto()
    CONTINUE = enum.auto()
    DOT = enum.auto()
    DEFINE = enum.auto()
    ELSE = enum.auto()
    END = enum.auto()
    IF = enum.auto()
    NIL = enum.auto()
    RANGE = enum.auto()
    TEMPLATE = enum.auto()
    WITH = enum.auto()


KEYWORDS: dict[str, Item] = {
    ".": Item.DOT,
    "block": Item.BLOCK,
    "break": Item.BREAK,
    "continue": Item.CONTINUE,
    "define": Item.DEFINE,
    "else": Item.ELSE,
    "end": Item.END,
    "if": Item.IF,
    "range": Item.RANGE,
    "nil": Item.NIL,
    "template": Item.TEMPLATE,
    "with": Item.WITH,
}

LEFT_DELIM = "{{"
RIGHT_DELIM = "}}"
LEFT_COMMENT = "/*"
RIGHT_COMMENT = "*/"
SPACE_CHARS = " \t\r\n"
TRIM_MARKER_LEN = 2  # the marker plus the space next to it
EOF = ""  # what next() returns at the end of input

_State: TypeAlias = Callable[[], "_State | None"]


@dataclass(frozen=True, slots=True)
class Token:
    """One lexed item: its kind, start offset, text, and 1-based line of its start."""

    typ: Item
    pos: int
    val: str
    line: int

    def describe(self) -> str:
        """Go's ``item.String()``, used in "unexpected X in Y" messages."""
        if self.typ == Item.EOF:
            return "EOF"
        if self.typ == Item.ERROR:
            return self.val
        if self.typ > Item.KEYWORD:
            return f"<{self.val}>"
        if len(self.val) > 10:
            return go_quote(self.val[:10]) + "..."
        return go_quote(self.val)




def _is_space(ch: str) -> bool:
    return ch != EOF and ch in SPACE_CHARS


def _is_alnum(ch: str) -> bool:
    return ch != EOF and (ch == "_" or ch.isalpha() or ch.isdigit())


def _has_left_trim_marker(s: str, at: int) -> bool:
    return len(s) >= at + 2 and s[at] == "-" and s[at + 1] in SPACE_CHARS


def _has_right_trim_marker(s: str, at: int) -> bool:
    return len(s) >= at + 2 and s[at] in SPACE_CHARS and s[at + 1] == "-"


def _rune_desc(ch: str) -> str:
    """Go's ``%#U`` formatting of a rune, e.g. ``U+0021 '!'``."""
    if ch == EOF:
        return "U+FFFFFFFFFFFFFFFF"
    code = ord(ch)
    if ch.isprintable():
        return f"U+{code:04X} '{ch}'"
    return f"U+{code:04X}"


class _Lexer:
    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0
        self.start = 0
        self.paren_depth = 0
        self.items: list[Token] = []
        self._line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self._line_starts.append(i + 1)

    def line_of(self, pos: int) -> int:
        """1-based line of an offset (binary search over line starts)."""
        lo, hi = 0, len(self._line_starts)
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if self._line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid
        return lo + 1

    # -- primitive operations, as in Go --------------------------------------------------
    def next(self) -> str:
        if self.pos >= len(self.input):
            self.pos = len(self.input) + 1  # so that backup() after EOF is a no-op
            return EOF
        ch = self.input[self.pos]
        self.pos += 1
        return ch

    def peek(self) -> str:
        if self.pos >= len(self.input):
            return EOF
        return self.input[self.pos]

    def backup(self) -> None:
        self.pos -= 1

    def emit(self, typ: Item) -> None:
        self.items.append(
            Token(typ, self.start, self.input[self.start : self.pos], self.line_of(self.start))
        )
        self.start = self.pos

    def ignore(self) -> None:
        self.start = self.pos

    def accept(self, valid: str) -> bool:
        ch = self.next()
        if ch != EOF and ch in valid:
            return True
        self.backup()
        return False

    def accept_run(self, valid: str) -> None:
        while True:
            ch = self.next()
            if ch == EOF or ch not in valid:
                break
        self.backup()

    def error(self, message: str) -> None:
        self.items.append(Token(Item.ERROR, self.start, message, self.line_of(self.start)))

    def at_right_delim(self) -> tuple[bool, bool]:
        s, p = self.input, self.pos
        if _has_right_trim_marker(s, p) and s.startswith(RIGHT_DELIM, p + TRIM_MARKER_LEN):
            return True, True
        if s.startswith(RIGHT_DELIM, p):
            return True, False
        return False, False

    def at_terminator(self) -> bool:
        ch = self.peek()
        if _is_space(ch):
            return True
        if ch in (EOF, ".", ",", "|", ":", ")", "("):
            return True
        return self.input.startswith(RIGHT_DELIM, self.pos)

    # -- states ----------------------------------------------------------------------------
    def run(self) -> list[Token]:
        state: _State | None = self.lex_text
        while state is not None:
            state = state()
        return self.items

    def lex_text(self) -> _State | None:
        x = self.input.find(LEFT_DELIM, self.pos)
        if x >= 0:
            self.pos = x
            trim = 0
            if _has_left_trim_marker(self.input, x + len(LEFT_DELIM)):
                chunk = self.input[self.start : self.pos]
                trim = len(chunk) - len(chunk.rstrip(SPACE_CHARS))
            self.pos -= trim
            if self.pos > self.start:
                self.emit(Item.TEXT)
            self.pos += trim
            self.ignore()
            return self.lex_left_delim
        self.pos = len(self.input)
        if self.pos > self.start:
            self.emit(Item.TEXT)
        self.emit(Item.EOF)
        return None

    def lex_left_delim(self) -> _State | None:
        self.pos += len(LEFT_DELIM)
        trim = _has_left_trim_marker(self.input, self.pos)
        after = TRIM_MARKER_LEN if trim else 0
        if self.input.startswith(LEFT_COMMENT, self.pos + after):
            self.pos += after
            self.ignore()
            return self.lex_comment
        self.emit(Item.LEFT_DELIM)
        self.pos += after
        self.ignore()
        self.paren_depth = 0
        return self.lex_inside_action

    def lex_comment(self) -> _State | None:
        self.pos += len(LEFT_COMMENT)
        i = self.input.find(RIGHT_COMMENT, self.pos)
        if i < 0:
            self.error("unclosed comment")
            return None
        self.pos = i + len(RIGHT_COMMENT)
        delim, trim = self.at_right_delim()
        if not delim:
            self.error("comment ends before closing delimiter")
            return None
        if trim:
            self.pos += TRIM_MARKER_LEN
        self.pos += len(RIGHT_DELIM)
        if trim:
            rest = self.input[self.pos :]
            self.pos += len(rest) - len(rest.lstrip(SPACE_CHARS))
        self.ignore()
        return self.lex_text

    def lex_right_delim(self) -> _State | None:
        trim = _has_right_trim_marker(self.input, self.pos)
        if trim:
            self.pos += TRIM_MARKER_LEN
            self.ignore()
        self.pos += len(RIGHT_DELIM)
        self.emit(Item.RIGHT_DELIM)
        if trim:
            rest = self.input[self.pos :]
            self.pos += len(rest) - len(rest.lstrip(SPACE_CHARS))
            self.ignore()
        return self.lex_text

    def lex_inside_action(self) -> _State | None:
        delim, _ = self.at_right_delim()
        if delim:
            if self.paren_depth == 0:
                return self.lex_right_delim
            self.error("unclosed left paren")
            return None
        ch = self.next()
        if ch == EOF:
            self.error("unclosed action")
            return None
        if _is_space(ch):
            self.backup()
            return self.lex_space
        if ch == "=":
            self.emit(Item.ASSIGN)
        elif ch == ":":
            if self.next() != "=":
                self.error("expected :=")
                return None
            self.emit(Item.DECLARE)
        elif ch == "|":
            self.emit(Item.PIPE)
        elif ch == '"':
            return self.lex_quote
        elif ch == "`":
            return self.lex_raw_quote
        elif ch == "$":
            return self.lex_variable
        elif ch == "'":
            return self.lex_char
        elif ch == "." and self.pos < len(self.input) and not "0" <= self.input[self.pos] <= "9":
            return self.lex_field
        elif ch in "+-." or "0" <= ch <= "9":
            self.backup()
            return self.lex_number
        elif _is_alnum(ch):
            self.backup()
            return self.lex_identifier
        elif ch == "(":
            self.emit(Item.LEFT_PAREN)
            self.paren_depth += 1
        elif ch == ")":
            self.emit(Item.RIGHT_PAREN)
            self.paren_depth -= 1
            if self.paren_depth < 0:
                self.error(f"unexpected right paren {_rune_desc(ch)}")
                return None
        elif ord(ch) < 0x80 and ch.isprintable():
            self.emit(Item.CHAR)
        else:
            self.error(f"unrecognized character in action: {_rune_desc(ch)}")
            return None
        return self.lex_inside_action

    def lex_space(self) -> _State | None:
        spaces = 0
        while _is_space(self.peek()):
            self.next()
            spaces += 1
        # A space may begin a trim-marked right delimiter " -}}".
        if _has_right_trim_marker(self.input, self.pos - 1) and self.input.startswith(
            RIGHT_DELIM, self.pos - 1 + TRIM_MARKER_LEN
        ):
            self.backup()
            if spaces == 1:
                return self.lex_right_delim
        self.emit(Item.SPACE)
        return self.lex_inside_action

    def lex_identifier(self) -> _State | None:
        while True:
            ch = self.next()
            if _is_alnum(ch):
                continue
            self.backup()
            word = self.input[self.start : self.pos]
            if not self.at_terminator():
                self.error(f"bad character {_rune_desc(self.peek())}")
                return None
            keyword = KEYWORDS.get(word)
            if keyword is not None and keyword > Item.KEYWORD:
                self.emit(keyword)
            elif word[0] == ".":
                self.emit(Item.FIELD)
            elif word in ("true", "false"):
                self.emit(Item.BOOL)
            else:
                self.emit(Item.IDENTIFIER)
            return self.lex_inside_action

    def lex_field(self) -> _State | None:
        return self._field_or_variable(Item.FIELD)

    def lex_variable(self) -> _State | None:
        if self.at_terminator():
            self.emit(Item.VARIABLE)
            return self.lex_inside_action
        return self._field_or_variable(Item.VARIABLE)

    def _field_or_variable(self, typ: Item) -> _State | None:
        if self.at_terminator():
            self.emit(Item.VARIABLE if typ == Item.VARIABLE else Item.DOT)
            return self.lex_inside_action
        while True:
            ch = self.next()
            if not _is_alnum(ch):
                self.backup()
                break
        if not self.at_terminator():
            self.error(f"bad character {_rune_desc(self.peek())}")
            return None
        self.emit(typ)
        return self.lex_inside_action

    def lex_char(self) -> _State | None:
        while True:
            ch = self.next()
            if ch == "\\":
                ch = self.next()
                if ch not in (EOF, "\n"):
                    continue
            if ch in (EOF, "\n"):
                self.error("unterminated character constant")
                return None
            if ch == "'":
                break
        self.emit(Item.CHAR_CONSTANT)
        return self.lex_inside_action

    def lex_number(self) -> _State | None:
        if not self._scan_number():
            self.error(f"bad number syntax: {go_quote(self.input[self.start : self.pos])}")
            return None
        if self.peek() in ("+", "-"):
            if not self._scan_number() or self.input[self.pos - 1] != "i":
                self.error(f"bad number syntax: {go_quote(self.input[self.start : self.pos])}")
                return None
            self.emit(Item.COMPLEX)
        else:
            self.emit(Item.NUMBER)
        return self.lex_inside_action

    def _scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            if self.accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self.accept("oO"):
                digits = "01234567_"
            elif self.accept("bB"):
                digits = "01_"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if len(digits) == 11 and self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789_")
        if len(digits) == 23 and self.accept("pP"):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        if _is_alnum(self.peek()):
            self.next()
            return False
        return True

    def lex_quote(self) -> _State | None:
        while True:
            ch = self.next()
            if ch == "\\":
                ch = self.next()
                if ch not in (EOF, "\n"):
                    continue
            if ch in (EOF, "\n"):
                self.error("unterminated quoted string")
                return None
            if ch == '"':
                break
        self.emit(Item.STRING)
        return self.lex_inside_action

    def lex_raw_quote(self) -> _State | None:
        end = self.input.find("`", self.pos)
        if end < 0:
            self.error("unterminated raw quoted string")
            return None
        self.pos = end + 1
        self.emit(Item.RAW_STRING)
        return self.lex_inside_action


def lex(text: str) -> list[Token]:
    """Tokenize a whole template; the list ends with an ``EOF`` or an ``ERROR`` item."""
    return _Lexer(text).run()
