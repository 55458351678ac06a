"""The evaluator: runs a parsed tree over data, a port of ``text/template/exec.go``.

Semantics kept from Go (they decide what Ollama's prompts look like):

* ``{{ x }}`` prints ``x`` with ``fmt`` rules; a nil value prints ``<no value>``;
* a missing map key yields nil (``missingkey=zero`` on ``map[string]any``), never an error;
* truth: false, 0, nil, and empty strings/slices/maps are false; structs are true;
* ``and``/``or`` short-circuit and return the deciding *value*, not a bool;
* variables declared inside ``if``/``with``/``range`` disappear at the block's ``end``;
  ``$x = v`` assigns to the nearest enclosing ``$x``; ``$`` is the data passed to execute;
* ``range`` over a map visits keys in sorted order; ``range`` over an int counts (Go 1.22);
* ``{{template}}`` starts with a fresh variable stack holding only ``$``.

Where Go would dereference through a nil interface and fail (``.Missing.Field``), this
evaluator yields nil instead: a template that works in Ollama renders the same here.

Execution is bounded by one ``RenderBudget`` (``_budget.py``), shared by every execution
that makes one prompt: every node walked, command and argument evaluated costs a step,
function calls also pay for the characters they read and build, no function may build a
string longer than one value may be (checked before ``printf``/``print`` build it), and the
output is capped; nested template calls stop at ``MAX_TEMPLATE_DEPTH``. So no template can
loop, fan out or recurse for long, or exhaust memory.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from ..errors import TemplateError
from ._budget import MAX_RENDER_OUTPUT, MAX_RENDER_STEPS, RenderBudget, RenderLimitExceeded
from ._funcs import Func, FuncError, make_functions
from ._nodes import (
    ActionNode,
    BoolNode,
    BranchNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
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
from ._values import GoStruct, format_value, is_supported, is_true, sorted_keys, type_name

MAX_TEMPLATE_DEPTH = 100
"""Deepest chain of ``{{template}}`` calls; Go allows 100000, Python's stack does not."""

DEFAULT_MAX_STEPS = MAX_RENDER_STEPS
DEFAULT_MAX_OUTPUT = MAX_RENDER_OUTPUT

NODE_STEPS = 5
"""Budget steps (about 0.1 µs each, see ``_budget.py``) of one node walked or evaluated."""

# Functions whose cost is a Python loop over every character of their string arguments (two
# steps per character), and how many characters each input character can become (checked
# before the call, so the long result is never built).
_PER_CHAR_FUNCS = frozenset({"js", "urlquery"})
_GROWTH = {"js": 6, "urlquery": 12, "print": 1, "println": 1}

_MISSING: Any = object()  # "no value piped in", Go's missingVal


class _ExecError(Exception):
    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit  # the RenderLimitExceeded kind, when a bound was hit


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class Executor:
    """One execution of a template set over one data value; not reusable."""

    def __init__(
        self,
        source: str,
        templates: Mapping[str, ListNode],
        *,
        now: _dt.datetime | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        max_output: int = DEFAULT_MAX_OUTPUT,
        budget: RenderBudget | None = None,
    ) -> None:
        self.source = source
        self.templates = templates
        today = (now or _dt.datetime.now()).date()
        if budget is None:
            budget = RenderBudget(max_steps=max_steps, max_output=max_output)
        self.budget = budget
        self.funcs: dict[str, Func] = make_functions(today, max_len=budget.max_value)
        self.out: list[str] = []
        self.vars: list[list[Any]] = []
        self.depth = 0
        self.node: Node | None = None
        self.name = ""

    # -- entry point ---------------------------------------------------------------------------
    def run(self, root: ListNode, data: Any) -> str:
        self.vars = [["$", data]]
        try:
            self.walk(data, root)
        except RenderLimitExceeded as exc:
            raise RenderLimitExceeded(str(self.error(exc.message)), exc.limit) from None
        except _ExecError as exc:
            if exc.limit:
                raise RenderLimitExceeded(str(exc), exc.limit) from None
            raise TemplateError(str(exc)) from None
        except RecursionError:
            raise TemplateError("template: execution nested too deeply") from None
        return "".join(self.out)

    # -- errors and bookkeeping --------------------------------------------------------------
    def error(self, message: str) -> _ExecError:
        name = '"' + self.name + '"'
        if self.node is None:
            return _ExecError(f"template: {self.name}: {message}")
        pos = min(self.node.pos, len(self.source))
        before = self.source[:pos]
        line = before.count("\n") + 1
        nl = before.rfind("\n")
        col = pos if nl < 0 else pos - (nl + 1)
        context = str(self.node)
        if len(context) > 200:
            context = context[:200] + "..."
        return _ExecError(f"template: :{line}:{col}: executing {name} at <{context}>: {message}")

    def write(self, text: str) -> None:
        self.budget.write(len(text))
        self.out.append(text)

    def var_value(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise self.error(f"undefined variable: {name}")

    # -- walking -----------------------------------------------------------------------------
    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        self.budget.step(NODE_STEPS)
        if isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.print_value(node, value)
        elif isinstance(node, IfNode | WithNode):
            self.walk_if_or_with(dot, node)
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        else:
            raise self.error(f"unknown node: {node}")

    def print_value(self, node: Node, value: Any) -> None:
        self.node = node
        if value is None:
            self.write("<no value>")
            return
        if not is_supported(value):
            raise self.error(f"can't print {node} of type {type_name(value)}")
        self.write(format_value(value))

    def walk_if_or_with(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            truth = is_true(value)
            if truth is None:
                raise self.error(f"if/with can't use {format_value(value)}")
            if truth:
                self.walk(value if isinstance(node, WithNode) else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        self.node = node
        outer = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            mark = len(self.vars)
            ndecl = len(node.pipe.decl)

            def one(index: Any, elem: Any) -> None:
                if ndecl > 0:
                    self.vars[-1][1] = elem
                if ndecl > 1:
                    self.vars[-2][1] = index
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                finally:
                    del self.vars[mark:]

            try:
                if isinstance(value, list | tuple | bytes):
                    if value:
                        for i, elem in enumerate(value):
                            one(i, elem)
                        return
                elif isinstance(value, Mapping):
                    if value:
                        for key in sorted_keys(value):
                            one(key, value[key])
                        return
                elif isinstance(value, int) and not isinstance(value, bool):
                    if ndecl > 1:
                        raise self.error(
                            f"can't use {value} to iterate over more than one variable"
                        )
                    if value > 0:
                        for i in range(value):
                            one(i, i)
                        return
                elif value is not None:
                    raise self.error(f"range can't iterate over {format_value(value)}")
            except _Break:
                return
            if node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[outer:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        self.node = node
        tree = self.templates.get(node.name)
        if tree is None:
            raise self.error(f'template "{node.name}" not defined')
        if self.depth >= MAX_TEMPLATE_DEPTH:
            message = f"exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})"
            raise _ExecError(str(self.error(message)), "depth")
        new_dot = self.eval_pipeline(dot, node.pipe)
        saved_vars, saved_name = self.vars, self.name
        self.vars, self.name = [["$", new_dot]], node.name
        self.depth += 1
        try:
            self.walk(new_dot, tree)
        finally:
            self.vars, self.name = saved_vars, saved_name
            self.depth -= 1

    # -- evaluation --------------------------------------------------------------------------
    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return None
        self.node = pipe
        value = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        for var in pipe.decl:
            if pipe.is_assign:
                self.set_var(var.ident[0], value)
            else:
                self.vars.append([var.ident[0], value])
        return value

    def not_a_function(self, args: list[Node] | None, final: Any) -> None:
        if (args is not None and len(args) > 1) or final is not _MISSING:
            first = args[0] if args else "?"
            raise self.error(f"can't give argument to non-function {first}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        self.budget.step(NODE_STEPS)
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            self.node = first
            return self.eval_field_chain(dot, dot, first, first.ident, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        return self.literal(dot, first)

    def literal(self, dot: Any, node: Node) -> Any:
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, DotNode):
            return dot
        if isinstance(node, NumberNode):
            return node.value
        if isinstance(node, StringNode):
            return node.text
        if isinstance(node, NilNode):
            return None
        raise self.error(f"can't evaluate command {node}")

    def eval_chain(self, dot: Any, chain: ChainNode, args: list[Node] | None, final: Any) -> Any:
        self.node = chain
        if isinstance(chain.node, NilNode):
            raise self.error(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.fields, args, final)

    def eval_variable(
        self, dot: Any, var: VariableNode, args: list[Node] | None, final: Any
    ) -> Any:
        self.node = var
        value = self.var_value(var.ident[0])
        if len(var.ident) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, var, var.ident[1:], args, final)

    def eval_field_chain(
        self,
        dot: Any,
        receiver: Any,
        node: Node,
        ident: list[str],
        args: list[Node] | None,
        final: Any,
    ) -> Any:
        for name in ident[:-1]:
            receiver = self.eval_field(name, node, None, _MISSING, receiver)
        return self.eval_field(ident[-1], node, args, final, receiver)

    def eval_field(
        self, name: str, node: Node, args: list[Node] | None, final: Any, receiver: Any
    ) -> Any:
        self.node = node
        if receiver is None:
            return None
        has_args = (args is not None and len(args) > 1) or final is not _MISSING
        if isinstance(receiver, GoStruct):
            if name in receiver.fields:
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return receiver.fields[name]
            raise self.error(f"can't evaluate field {name} in type {receiver.type_name}")
        if isinstance(receiver, Mapping):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            return receiver.get(name)
        raise self.error(f"can't evaluate field {name} in type {type_name(receiver)}")

    def eval_function(
        self, dot: Any, node: IdentifierNode, cmd: Node, args: list[Node] | None, final: Any
    ) -> Any:
        """Call a function; ``cmd`` is the node errors quote (the whole command, as in Go)."""
        self.node = node
        name = node.name
        fn = self.funcs.get(name)
        if fn is None:
            raise self.error(f'"{name}" is not a defined function')
        arg_nodes = args[1:] if args else []
        num_in = len(arg_nodes) + (0 if final is _MISSING else 1)
        if fn.variadic:
            if num_in < fn.fixed:
                raise self.error(
                    f"wrong number of args for {name}: want at least {fn.fixed} "
                    f"got {len(arg_nodes)}"
                )
        elif num_in != fn.fixed:
            raise self.error(f"wrong number of args for {name}: want {fn.fixed} got {num_in}")

        if name in ("and", "or"):
            want = name == "or"
            value: Any = None
            for arg in arg_nodes:
                value = self.eval_arg(dot, arg)
                if bool(is_true(value)) == want:
                    return value
            if final is not _MISSING:
                value = final
            return value

        values: list[Any] = []
        for i, arg in enumerate(arg_nodes):
            if self._is_string_param(fn, i):
                values.append(self.eval_string_arg(dot, arg))
            else:
                values.append(self.eval_arg(dot, arg))
        if final is not _MISSING:
            if self._is_string_param(fn, len(values)):
                self._check_string(final)
            values.append(final)
        self.node = cmd
        self.charge_call(name, values)
        try:
            result = fn.call(*values)
        except FuncError as exc:
            raise self.error(f"error calling {name}: {exc}") from None
        if isinstance(result, str):
            self.budget.build(len(result), f"the result of {name}")
        return result

    def charge_call(self, name: str, values: list[Any]) -> None:
        """Pay for a call before making it, and refuse one whose result would be too long.

        Reading a string costs steps (two per character for the functions that loop over
        characters in Python); ``print``/``println`` and the escapers build at most their
        input times ``_GROWTH``, and ``printf`` is checked while it formats."""
        chars = sum(len(v) for v in values if isinstance(v, str))
        self.budget.step(NODE_STEPS + (2 * chars if name in _PER_CHAR_FUNCS else 0))
        self.budget.bulk(chars)
        if name == "html":
            special = sum(v.count(c) for v in values if isinstance(v, str) for c in "&'\"<>")
            self.budget.check_size(chars + 4 * special, "the result of html")
        elif name in _GROWTH:
            self.budget.check_size(chars * _GROWTH[name], f"the result of {name}")

    @staticmethod
    def _is_string_param(fn: Func, i: int) -> bool:
        return i in fn.string_params or (fn.string_variadic and i >= fn.fixed)

    def _check_string(self, value: Any) -> None:
        if value is None:
            raise self.error("invalid value; expected string")
        if not isinstance(value, str):
            raise self.error(f"wrong type for value; expected string; got {type_name(value)}")

    def eval_string_arg(self, dot: Any, node: Node) -> str:
        self.node = node
        if isinstance(node, StringNode):
            return node.text
        if isinstance(node, NilNode):
            raise self.error("cannot assign nil to string")
        if isinstance(node, BoolNode | NumberNode):
            raise self.error(f"expected string; found {node}")
        value = self.eval_arg(dot, node)
        self._check_string(value)
        return str(value)

    def eval_arg(self, dot: Any, node: Node) -> Any:
        self.node = node
        self.budget.step(NODE_STEPS)
        if isinstance(node, FieldNode):
            return self.eval_field_chain(dot, dot, node, node.ident, [node], _MISSING)
        if isinstance(node, VariableNode):
            return self.eval_variable(dot, node, None, _MISSING)
        if isinstance(node, PipeNode):
            return self.eval_pipeline(dot, node)
        if isinstance(node, IdentifierNode):
            return self.eval_function(dot, node, node, None, _MISSING)
        if isinstance(node, ChainNode):
            return self.eval_chain(dot, node, None, _MISSING)
        return self.literal(dot, node)
