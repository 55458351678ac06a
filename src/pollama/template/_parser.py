"""Parser for the Go template subset, a port of ``text/template/parse/parse.go``.

It builds the node tree of ``_nodes`` from the lexer's items, with Go's grammar and Go's error
messages (``template: :LINE: message``), so that a template Ollama rejects is rejected here with
the same words. What must stay true:

* variables are checked at parse time and scoped as in Go: a variable declared inside
  ``if``/``range``/``with`` is visible until that block's ``{{end}}``;
* ``{{else if}}`` (and Go 1.23's ``{{else with}}``) nest a new block in the else branch;
* ``{{break}}``/``{{continue}}`` are only allowed inside ``range``;
* identifiers must name a known function;
* ``define``/``block`` register named templates; two non-empty definitions of one name in a
  single source are an error.

Nesting is capped (``MAX_NESTING``) so hostile input cannot exhaust the Python stack.
"""

from __future__ import annotations

import re

from ..errors import TemplateError
from ..format import go_quote
from ._lexer import Item, Token, lex
from ._nodes import (
    ActionNode,
    BoolNode,
    BranchNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    ElseNode,
    EndNode,
    FieldNode,
    IdentifierNode,
    IfNode,
    ListNode,
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    RangeNode,
    StringNode,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
)

MAX_NESTING = 100
"""Deepest nesting of blocks and parentheses accepted; real templates use fewer than 10."""


def go_unquote(quoted: str) -> str:
    """``strconv.Unquote`` for double-quoted, raw (backquoted) and single-quoted literals.

    Raises ``ValueError("invalid syntax")`` as Go does for malformed literals.
    """
    if len(quoted) < 2:
        raise ValueError("invalid syntax")
    q = quoted[0]
    if q != quoted[-1]:
        raise ValueError("invalid syntax")
    body = quoted[1:-1]
    if q == "`":
        if "`" in body:
            raise ValueError("invalid syntax")
        return body.replace("\r", "")
    if q not in "\"'":
        raise ValueError("invalid syntax")
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == q and q == '"':
            raise ValueError("invalid syntax")
        if ch == "\n":
            raise ValueError("invalid syntax")
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        value, i = _unquote_escape(body, i + 1, q)
        out.append(value)
    result = "".join(out)
    if q == "'" and len(result) != 1:
        raise ValueError("invalid syntax")
    return result


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unquote_escape(body: str, i: int, quote: str) -> tuple[str, int]:
    if i >= len(body):
        raise ValueError("invalid syntax")
    c = body[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], i + 1
    if c == "\\":
        return "\\", i + 1
    if c in "'\"":
        if c != quote:
            raise ValueError("invalid syntax")
        return c, i + 1
    if c in "xuU":
        n = {"x": 2, "u": 4, "U": 8}[c]
        digits = body[i + 1 : i + 1 + n]
        if len(digits) != n or not re.fullmatch(r"[0-9a-fA-F]+", digits):
            raise ValueError("invalid syntax")
        code = int(digits, 16)
        if c == "x":
            # Go strings are bytes; a \x escape above 0x7f is a raw byte. Keep it as the
            # Latin-1 code point, the closest text equivalent.
            return chr(code), i + 1 + n
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError("invalid syntax")
        return chr(code), i + 1 + n
    if c in "01234567":
        digits = body[i : i + 3]
        if len(digits) != 3 or not re.fullmatch(r"[0-7]{3}", digits) or int(digits, 8) > 255:
            raise ValueError("invalid syntax")
        return chr(int(digits, 8)), i + 3
    raise ValueError("invalid syntax")


_OCTAL = re.compile(r"[+-]?0[0-7_]+")


def _parse_int(text: str) -> int | None:
    """``strconv.ParseInt(text, 0, 64)``: Go literal syntax, None when it does not parse."""
    t = text
    if _OCTAL.fullmatch(t):
        sign = -1 if t[0] == "-" else 1
        digits = t.lstrip("+-")[1:].replace("_", "")
        if not digits:
            return 0
        return sign * int(digits, 8)
    try:
        value = int(t, 0)
    except ValueError:
        return None
    return value


def number_value(text: str, typ: Item) -> int | float:
    """The ideal-constant value of a number literal (``exec.go idealConstant``)."""
    if typ == Item.CHAR_CONSTANT:
        # strconv.UnquoteChar on what follows the opening quote, then exactly "'" must remain.
        body = text[1:]
        if not body or body[0] == "'" or body[0] == "\n":
            raise ValueError("invalid syntax")
        if body[0] == "\\":
            char, end = _unquote_escape(body, 1, "'")
        else:
            char, end = body[0], 1
        if body[end:] != "'":
            raise ValueError(f"malformed character constant: {text}")
        return ord(char)
    if typ == Item.COMPLEX or text.endswith("i"):
        raise ValueError(f"complex constants are not supported: {text}")
    lower = text.lower()
    is_hex = lower.lstrip("+-").startswith("0x")
    looks_float = ("." in lower or "p" in lower) if is_hex else ("." in lower or "e" in lower)
    if looks_float:
        if is_hex and "p" not in lower:
            raise ValueError(f"illegal number syntax: {go_quote(text)}")
        try:
            return float.fromhex(lower.replace("_", "")) if is_hex else float(text)
        except ValueError:
            raise ValueError(f"illegal number syntax: {go_quote(text)}") from None
    value = _parse_int(text)
    if value is None:
        try:
            float(text)
        except ValueError:
            raise ValueError(f"illegal number syntax: {go_quote(text)}") from None
        raise ValueError(f"integer overflow: {go_quote(text)}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{text} overflows int")
    return value


class _ParseError(Exception):
    pass


class _Tree:
    """Parsing state for one template source: the shared token stream and the template set."""

    def __init__(self, text: str, funcs: frozenset[str]) -> None:
        self.text = text
        self.tokens = lex(text)
        self.index = 0
        self.seen = 0
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.nesting = 0
        self.action_line = 0
        self.defined: dict[str, ListNode] = {}

    # -- token stream ------------------------------------------------------------------------
    def next(self) -> Token:
        tok = self.tokens[min(self.index, len(self.tokens) - 1)]
        self.index += 1
        self.seen = max(self.seen, self.index - 1)
        return tok

    def backup(self, n: int = 1) -> None:
        self.index -= n

    def peek(self) -> Token:
        tok = self.next()
        self.backup()
        return tok

    def next_non_space(self) -> Token:
        while True:
            tok = self.next()
            if tok.typ != Item.SPACE:
                return tok

    def peek_non_space(self) -> Token:
        """The next non-space token; like Go, the spaces before it stay consumed."""
        tok = self.next_non_space()
        self.backup()
        return tok

    # -- errors ------------------------------------------------------------------------------
    def errorf(self, message: str) -> _ParseError:
        line = self.tokens[min(self.seen, len(self.tokens) - 1)].line
        return _ParseError(f"template: :{line}: {message}")

    def unexpected(self, tok: Token, context: str) -> _ParseError:
        if tok.typ == Item.ERROR:
            extra = ""
            if self.action_line and self.action_line != tok.line:
                extra = f" in action started at :{self.action_line}"
                if tok.val.endswith(" action"):
                    extra = extra[len(" in action") :]
            return self.errorf(f"{tok.val}{extra}")
        return self.errorf(f"unexpected {tok.describe()} in {context}")

    def expect(self, typ: Item, context: str) -> Token:
        tok = self.next_non_space()
        if tok.typ != typ:
            raise self.unexpected(tok, context)
        return tok

    def enter(self) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise self.errorf(f"template nested more than {MAX_NESTING} levels deep")

    # -- grammar -----------------------------------------------------------------------------
    def parse(self) -> ListNode:
        root = ListNode(self.peek().pos)
        while self.peek().typ != Item.EOF:
            if self.peek().typ == Item.LEFT_DELIM:
                delim_index = self.index
                self.next()
                if self.next_non_space().typ == Item.DEFINE:
                    self.parse_definition()
                    continue
                self.index = delim_index
            node = self.text_or_action()
            if isinstance(node, EndNode | ElseNode):
                raise self.errorf(f"unexpected {node}")
            root.nodes.append(node)
        return root

    def add(self, name: str, root: ListNode) -> None:
        old = self.defined.get(name)
        if old is None or _is_empty_tree(old):
            self.defined[name] = root
        elif not _is_empty_tree(root):
            raise self.errorf(f"template: multiple definition of template {go_quote(name)}")

    def parse_definition(self) -> None:
        context = "define clause"
        tok = self.next_non_space()
        if tok.typ not in (Item.STRING, Item.RAW_STRING):
            raise self.unexpected(tok, context)
        try:
            name = go_unquote(tok.val)
        except ValueError as exc:
            raise self.errorf(str(exc)) from None
        self.expect(Item.RIGHT_DELIM, context)
        saved_vars, self.vars = self.vars, ["$"]
        root, end = self.item_list()
        self.vars = saved_vars
        if not isinstance(end, EndNode):
            raise self.errorf(f"unexpected {end} in {context}")
        self.add(name, root)

    def item_list(self) -> tuple[ListNode, Node]:
        self.enter()
        lst = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().typ != Item.EOF:
            node = self.text_or_action()
            if isinstance(node, EndNode | ElseNode):
                self.nesting -= 1
                return lst, node
            lst.nodes.append(node)
        raise self.errorf("unexpected EOF")

    def text_or_action(self) -> Node:
        tok = self.next_non_space()
        if tok.typ == Item.TEXT:
            return TextNode(tok.pos, tok.val)
        if tok.typ == Item.LEFT_DELIM:
            self.action_line = tok.line
            try:
                return self.action()
            finally:
                self.action_line = 0
        raise self.unexpected(tok, "input")

    def action(self) -> Node:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == Item.BLOCK:
            return self.block_control()
        if typ in (Item.BREAK, Item.CONTINUE):
            word = "break" if typ == Item.BREAK else "continue"
            after = self.next_non_space()
            if after.typ != Item.RIGHT_DELIM:
                raise self.unexpected(after, "{{" + word + "}}")
            if self.range_depth == 0:
                raise self.errorf("{{" + word + "}} outside {{range}}")
            return (
                BreakNode(tok.pos, tok.line)
                if typ == Item.BREAK
                else ContinueNode(tok.pos, tok.line)
            )
        if typ == Item.ELSE:
            return self.else_control()
        if typ == Item.END:
            return EndNode(self.expect(Item.RIGHT_DELIM, "end").pos)
        if typ == Item.IF:
            return self.branch_control(IfNode, "if")
        if typ == Item.RANGE:
            return self.branch_control(RangeNode, "range")
        if typ == Item.TEMPLATE:
            return self.template_control()
        if typ == Item.WITH:
            return self.branch_control(WithNode, "with")
        self.backup()
        first = self.peek()
        return ActionNode(first.pos, first.line, self.pipeline("command", Item.RIGHT_DELIM))

    def else_control(self) -> Node:
        peek = self.peek_non_space()
        if peek.typ in (Item.IF, Item.WITH):
            # "{{else if ...}}": leave the "if" pending for the enclosing control to parse.
            return ElseNode(peek.pos, peek.line)
        tok = self.expect(Item.RIGHT_DELIM, "else")
        return ElseNode(tok.pos, tok.line)

    def branch_control(self, cls: type[BranchNode], context: str) -> BranchNode:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(context, Item.RIGHT_DELIM)
            if context == "range":
                self.range_depth += 1
            lst, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list: ListNode | None = None
            if isinstance(nxt, ElseNode):
                follow = self.peek().typ
                if context == "if" and follow == Item.IF:
                    self.next()
                    else_list = ListNode(nxt.pos, [self.branch_control(IfNode, "if")])
                elif context == "with" and follow == Item.WITH:
                    self.next()
                    else_list = ListNode(nxt.pos, [self.branch_control(WithNode, "with")])
                else:
                    else_list, nxt = self.item_list()
                    if not isinstance(nxt, EndNode):
                        raise self.errorf(f"expected end; found {nxt}")
            return cls(pipe.pos, pipe.line, pipe, lst, else_list)
        finally:
            del self.vars[mark:]

    def block_control(self) -> Node:
        context = "block clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = self.pipeline(context, Item.RIGHT_DELIM)
        saved_vars, self.vars = self.vars, ["$"]
        saved_depth, self.range_depth = self.range_depth, 0
        root, end = self.item_list()
        self.vars, self.range_depth = saved_vars, saved_depth
        if not isinstance(end, EndNode):
            raise self.errorf(f"unexpected {end} in {context}")
        self.add(name, root)
        return TemplateNode(tok.pos, tok.line, name, pipe)

    def template_control(self) -> Node:
        context = "template clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe: PipeNode | None = None
        if self.next_non_space().typ != Item.RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, Item.RIGHT_DELIM)
        return TemplateNode(tok.pos, tok.line, name, pipe)

    def template_name(self, tok: Token, context: str) -> str:
        if tok.typ not in (Item.STRING, Item.RAW_STRING):
            raise self.unexpected(tok, context)
        try:
            return go_unquote(tok.val)
        except ValueError as exc:
            raise self.errorf(str(exc)) from None

    def pipeline(self, context: str, end: Item) -> PipeNode:
        first = self.peek_non_space()
        pipe = PipeNode(first.pos, first.line)
        self._declarations(pipe, context)
        while True:
            tok = self.next_non_space()
            if tok.typ == end:
                self._check_pipeline(pipe, context)
                return pipe
            if tok.typ in _TERM_STARTS:
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(tok, context)

    def _declarations(self, pipe: PipeNode, context: str) -> None:
        while True:
            v = self.peek_non_space()
            if v.typ != Item.VARIABLE:
                return
            start = self.index
            self.next_non_space()
            token_after = self.peek()
            nxt = self.peek_non_space()
            if nxt.typ in (Item.ASSIGN, Item.DECLARE):
                pipe.is_assign = nxt.typ == Item.ASSIGN
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
                return
            if nxt.typ == Item.CHAR and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in (
                        Item.VARIABLE,
                        Item.RIGHT_DELIM,
                        Item.RIGHT_PAREN,
                    ):
                        continue
                    raise self.errorf("range can only initialize variables")
                raise self.errorf(f"too many declarations in {context}")
            del token_after
            self.index = start
            return

    def _check_pipeline(self, pipe: PipeNode, context: str) -> None:
        if not pipe.cmds:
            raise self.errorf(f"missing value for {context}")
        for i, cmd in enumerate(pipe.cmds[1:]):
            if isinstance(cmd.args[0], BoolNode | DotNode | NilNode | NumberNode | StringNode):
                raise self.errorf(f"non executable command in pipeline stage {i + 2}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            tok = self.next()
            if tok.typ == Item.SPACE:
                continue
            if tok.typ in (Item.RIGHT_DELIM, Item.RIGHT_PAREN):
                self.backup()
            elif tok.typ != Item.PIPE:
                raise self.unexpected(tok, "operand")
            break
        if not cmd.args:
            raise self.errorf("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ == Item.FIELD:
            fields: list[str] = []
            chain_pos = self.peek().pos
            while self.peek().typ == Item.FIELD:
                fields.append(self.next().val[1:])
            if isinstance(node, FieldNode):
                return FieldNode(chain_pos, node.ident + fields)
            if isinstance(node, VariableNode):
                return VariableNode(chain_pos, node.ident + fields)
            if isinstance(node, BoolNode | StringNode | NumberNode | NilNode | DotNode):
                raise self.errorf(f"unexpected . after term {go_quote(str(node))}")
            return ChainNode(chain_pos, node, fields)
        return node

    def term(self) -> Node | None:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == Item.IDENTIFIER:
            if tok.val not in self.funcs:
                raise self.errorf(f"function {go_quote(tok.val)} not defined")
            return IdentifierNode(tok.pos, tok.val)
        if typ == Item.DOT:
            return DotNode(tok.pos)
        if typ == Item.NIL:
            return NilNode(tok.pos)
        if typ == Item.VARIABLE:
            return self.use_var(tok)
        if typ == Item.FIELD:
            return FieldNode(tok.pos, [tok.val[1:]])
        if typ == Item.BOOL:
            return BoolNode(tok.pos, tok.val == "true")
        if typ in (Item.CHAR_CONSTANT, Item.COMPLEX, Item.NUMBER):
            try:
                return NumberNode(tok.pos, tok.val, number_value(tok.val, typ))
            except ValueError as exc:
                raise self.errorf(str(exc)) from None
        if typ == Item.LEFT_PAREN:
            self.enter()
            pipe = self.pipeline("parenthesized pipeline", Item.RIGHT_PAREN)
            self.nesting -= 1
            return pipe
        if typ in (Item.STRING, Item.RAW_STRING):
            try:
                return StringNode(tok.pos, tok.val, go_unquote(tok.val))
            except ValueError as exc:
                raise self.errorf(str(exc)) from None
        self.backup()
        return None

    def use_var(self, tok: Token) -> VariableNode:
        parts = tok.val.split(".")
        if parts[0] not in self.vars:
            raise self.errorf(f"undefined variable {go_quote(parts[0])}")
        return VariableNode(tok.pos, parts)


_TERM_STARTS = frozenset(
    {
        Item.BOOL,
        Item.CHAR_CONSTANT,
        Item.COMPLEX,
        Item.DOT,
        Item.FIELD,
        Item.IDENTIFIER,
        Item.NUMBER,
        Item.NIL,
        Item.RAW_STRING,
        Item.STRING,
        Item.VARIABLE,
        Item.LEFT_PAREN,
    }
)


def _is_empty_tree(node: Node | None) -> bool:
    if node is None:
        return True
    if isinstance(node, ListNode):
        return all(_is_empty_tree(n) for n in node.nodes)
    if isinstance(node, TextNode):
        return not node.text.strip(" \t\r\n\v\f")
    return False


def parse(text: str, funcs: frozenset[str]) -> tuple[ListNode, dict[str, ListNode]]:
    """Parse ``text`` into its main tree and the templates it defines (``define``/``block``).

    Raises ``TemplateError`` with Go's message on any syntax error.
    """
    tree = _Tree(text, funcs)
    try:
        root = tree.parse()
    except _ParseError as exc:
        raise TemplateError(str(exc)) from None
    except RecursionError:
        raise TemplateError("template: nested too deeply") from None
    return root, tree.defined
