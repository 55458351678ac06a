"""How the Jinja sandbox spends a :class:`RenderBudget`: the counting half of ``jinja.py``.

A chat template's work happens in four places, and each is charged here:

* **blocks**: the code generator (:class:`BoundedCodeGenerator`) wraps every ``for``
  iterable in :func:`tick_iter` (a step per item, filtered out or not) and starts every
  block (loop body, macro body, call block, ``if`` branch) with a tick worth the nodes that
  block executes, so a pass costs what it runs, and nested loops, fan-out and loops that
  print nothing all run out of steps;
* **calls**: functions, macros, methods, filters and tests cost steps each
  (:data:`CALL_STEPS`, :data:`MACRO_STEPS`, :data:`FILTER_STEPS`), plus the length of
  what they read;
* **values**: a call that would multiply a length (``replace``, ``join``, ``indent``,
  ``wordwrap``, ``batch``/``slice`` fill values, ``sum`` of lists) is predicted and
  refused before it runs (:func:`guard_filters`, :func:`check_method`); containers about to
  become text are measured first (:func:`text_size`), so shared references
  (``[s] * 1000``) cannot turn into a huge string; every string or list produced is
  accounted for (:func:`produced`);
* **output**: counted by the caller as chunks come out.

The budget of the render in progress lives in a ``ContextVar`` (each render thread has its
own). Outside a render (Jinja folding constants while it compiles) every guard raises
:class:`NotRendering`, which makes Jinja leave the expression to run time, where it is
counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.utils import Namespace

from ._budget import CHARS_PER_STEP, RenderBudget

__all__ = [
    "CALL_STEPS",
    "FILTER_STEPS",
    "ITEM_STEPS",
    "LOOKUP_STEPS",
    "MACRO_STEPS",
    "OPERATOR_STEPS",
    "OUTPUT_STEPS",
    "TEST_STEPS",
    "TEXT_STEPS",
    "BoundedCodeGenerator",
    "NotRendering",
    "budget",
    "check_method",
    "guard_filters",
    "guard_tests",
    "produced",
    "rendering",
    "text_size",
    "tick_iter",
]

_active: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar(
    "pollama_jinja_budget", default=None
)
_current = _active.get

# What things cost, in steps of about 0.1 µs (measured on the sandbox, checks included).
CALL_STEPS = 40
"""A call of a built-in function or method (the sandbox's checks make it ~4 µs)."""

MACRO_STEPS = 30
"""A macro call, on top of its body's blocks (~3 µs)."""

FILTER_STEPS = 15
"""A filter call, on top of reading its input (~1.5 µs)."""

ITEM_STEPS = 2
"""An item taken from a loop's iterable, or read by ``join``."""

TEST_STEPS = 5
"""A test (``is odd``), which ``select`` calls once per item."""

OUTPUT_STEPS = 8
"""An ``{{ … }}`` printed, or a ``~`` concatenation."""

OPERATOR_STEPS = 5
"""An operator the sandbox checks (``*``, ``**``, ``+``, ``%``)."""

LOOKUP_STEPS = 4
"""An attribute or item lookup (``m.role``, ``m['role']``), through the sandbox."""

TEXT_STEPS = 2
"""A node of a container measured before it becomes text."""


class NotRendering(Exception):
    """A guard ran outside a render: Jinja is folding constants at compile time."""


def budget() -> RenderBudget:
    """The budget of the render in progress (``NotRendering`` when there is none)."""
    current = _current()
    if current is None:
        raise NotRendering
    return current


@contextlib.contextmanager
def rendering(spend: RenderBudget) -> Iterator[RenderBudget]:
    """Make ``spend`` the budget of everything the template does in this block."""
    token = _active.set(spend)
    try:
        yield spend
    finally:
        _active.reset(token)


def tick_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """``iterable``, a step per item taken from it."""
    step = budget().step
    for item in iterable:
        step(ITEM_STEPS)
        yield item


# -- sizes ---------------------------------------------------------------------------------

_SCALAR_TEXT = 8  # what a number, None or other small object counts for as text
_CONTAINERS = (list, tuple, set, frozenset, dict)


def text_size(value: Any, per_node: int = 0, per_level: int = 0) -> int:
    """About how long ``str(value)`` is, found without building it; refused past one value.

    Containers are walked (steps per node) and shared references counted every time they
    occur, as ``str`` would print them; the walk stops as soon as the size is over the
    limit, so measuring costs at most what the limit allows. ``per_node`` and ``per_level``
    add what a JSON dump prints around each node (separators, and an indent per level).
    """
    if isinstance(value, str) and not per_node:
        return len(value)
    if not isinstance(value, (*_CONTAINERS, Mapping, Namespace)) and not per_node:
        return _SCALAR_TEXT
    spend = budget()
    total, visited = 0, 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        visited += 1
        total += per_node + per_level * depth
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            spend.check_size(total, "a value turned into text")
            stack.extend((i, depth + 1) for i in item)
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            spend.check_size(total, "a value turned into text")
            stack.extend((i, depth + 1) for i in itertools.chain(item.keys(), item.values()))
        elif isinstance(item, Namespace):
            stack.append((object.__getattribute__(item, "_Namespace__attrs"), depth))
        else:
            total += _SCALAR_TEXT
        if visited & 255 == 0:
            spend.check_size(total, "a value turned into text")
            spend.step(256 * TEXT_STEPS)
    spend.check_size(total, "a value turned into text")
    spend.step((visited & 255) * TEXT_STEPS)
    return total


def produced(value: Any, what: str = "a value") -> Any:
    """Account for a value a call made: strings by length, lists by items."""
    if isinstance(value, str):
        budget().build(len(value), what)
    elif isinstance(value, _CONTAINERS):
        budget().build(len(value), what, items=True)
    return value


def _read_cost(value: Any) -> int:
    """Steps to read ``value`` once: bulk characters of a string, an item of a list."""
    if isinstance(value, str):
        return len(value) // CHARS_PER_STEP
    if isinstance(value, _CONTAINERS):
        return len(value)
    return 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- methods of str ------------------------------------------------------------------------


def _replaced_size(s: str, old: str, new: str, count: Any = -1) -> int:
    hits = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def check_method(receiver: str, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuse a ``str`` method whose result would be too long; returns the arguments to call
    it with (``join`` gets its items as a list, having measured them)."""
    spend = budget()
    spend.bulk(len(receiver))
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        spend.check_size(_replaced_size(receiver, *args[:3]), "the result of replace")
    elif name == "join" and args:
        items = list(tick_iter(args[0]))
        size = sum(len(i) if isinstance(i, str) else 0 for i in items)
        spend.check_size(size + len(receiver) * max(len(items) - 1, 0), "the result of join")
        return (items, *args[1:])
    elif name == "expandtabs":
        tab = args[0] if args and _is_int(args[0]) else 8
        spend.check_size(len(receiver) + receiver.count("\t") * max(tab, 0), "expandtabs")
    elif name in ("split", "rsplit", "splitlines"):
        if name == "splitlines":
            seps: Iterable[str] = _LINE_BREAKS
        else:
            seps = [args[0]] if args and isinstance(args[0], str) and args[0] else _SPACES
        parts = 1 + sum(receiver.count(sep) for sep in seps)
        spend.check_size(parts, f"the result of {name}", items=True)
    return args


_SPACES = (" ", "\n", "\r", "\t", "\x0b", "\x0c")
_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


# -- filters -------------------------------------------------------------------------------

# Filters that do not read their whole input (they must not be charged its length: a
# template may ask ``messages|length`` on every message).
_CHEAP_FILTERS = frozenset({"length", "count", "first", "last", "default", "d", "attr"})

# Filters that read a container as data; every other filter turns its input into text,
# so a container given to one is measured first.
_STRUCTURAL_FILTERS = _CHEAP_FILTERS | {
    "list", "map", "select", "reject", "selectattr", "rejectattr", "sort", "unique", "min",
    "max", "reverse", "batch", "slice", "groupby", "dictsort", "items", "random", "sum",
    "abs", "int", "float", "round", "join", "tojson",
}  # fmt: skip

_Check = Callable[[RenderBudget, Any, list[Any], dict[str, Any]], None]


def _arg(rest: list[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """A filter argument after the input: ``rest[index]`` or keyword ``name``."""
    return rest[index] if len(rest) > index else kwargs.get(name, default)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _per_char(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    """``wordwrap``, ``urlize``, ``striptags``, ``xmlattr`` loop over characters in Python."""
    spend.step(2 * len(_text(value)))


def _wordwrap(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    text = _text(value)
    spend.step(2 * len(text))
    wrap = _arg(rest, kwargs, 2, "wrapstring", None)
    unit = len(wrap) if isinstance(wrap, str) else 1
    spend.check_size(len(text) * (1 + unit), "the result of wordwrap")


def _replace(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    if len(rest) >= 2:
        count = _arg(rest, kwargs, 2, "count", None)
        size = _replaced_size(_text(value), str(rest[0]), str(rest[1]), count)
        spend.check_size(size, "the result of replace")


def _center(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    width = _arg(rest, kwargs, 0, "width", 80)
    spend.check_size(max(len(_text(value)), width if _is_int(width) else 0), "center")


def _indent(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    text = _text(value)
    width = _arg(rest, kwargs, 0, "width", 4)
    unit = len(width) if isinstance(width, str) else max(width, 0) if _is_int(width) else 0
    lines = text.count("\n") + 1
    spend.step(2 * lines)
    spend.check_size(len(text) + lines * unit, "the result of indent")


def _filled(what: str) -> _Check:
    """``batch``/``slice``: the fill value is repeated up to the count."""

    def check(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
        count = _arg(rest, kwargs, 0, "linecount" if what == "batch" else "slices", None)
        fill = _arg(rest, kwargs, 1, "fill_with", None)
        if fill is not None and _is_int(count):
            spend.check_size(count, f"the fill of {what}", items=True)
            spend.check_size(count * text_size(fill), f"the fill of {what}")

    return check


def _list(spend: RenderBudget, value: Any, rest: list[Any], kwargs: dict[str, Any]) -> None:
    if isinstance(value, str):
        spend.check_size(len(value), "a list of characters", items=True)


_CHECKS: dict[str, _Check] = {
    "wordwrap": _wordwrap,
    "urlize": _per_char,
    "striptags": _per_char,
    "xmlattr": _per_char,
    "replace": _replace,
    "center": _center,
    "indent": _indent,
    "batch": _filled("batch"),
    "slice": _filled("slice"),
    "list": _list,
}


def _check_rest(spend: RenderBudget, name: str, rest: list[Any]) -> None:
    """Arguments after the input: strings cost their reading, integers must not exceed
    what one value may be (a width, a count)."""
    for arg in rest:
        if isinstance(arg, str):
            spend.bulk(len(arg))
        elif _is_int(arg):
            spend.check_size(abs(arg), f"an argument of {name}")


def _join_size(items: list[Any], sep: str, attribute: Callable[[Any], Any] | None) -> int:
    values = items if attribute is None else [attribute(i) for i in items]
    return sum(text_size(v) for v in values) + len(sep) * max(len(values) - 1, 0)


def _sum(inner: Callable[..., Any]) -> Callable[..., Any]:
    """``sum`` of lists with a list ``start`` is quadratic in Python: chain them instead."""

    @functools.wraps(inner)
    def summed(env: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
        if attribute is None and isinstance(start, list | tuple):
            items = list(tick_iter(iterable))
            if all(type(i) is type(start) for i in items):
                total = len(start) + sum(len(i) for i in items)
                budget().check_size(total, "the result of sum", items=True)
                return type(start)(itertools.chain(start, *items))
            iterable = items
        return inner(env, iterable, attribute, start)

    return summed


def _join(inner: Callable[..., Any]) -> Callable[..., Any]:
    """``join`` measured first: shared references would otherwise be joined in full."""
    from jinja2.filters import make_attrgetter

    @functools.wraps(inner)
    def joined(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> Any:
        items = list(tick_iter(value))
        getter = None if attribute is None else make_attrgetter(eval_ctx.environment, attribute)
        budget().check_size(_join_size(items, str(d), getter), "the result of join")
        return inner(eval_ctx, items, d, attribute)

    return joined


_WRAPPERS = {"sum": _sum, "join": _join}


def guard_filters(filters: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Every filter wrapped: charged, checked before it runs, its result accounted for, and
    a lazy result (``map``, ``select``…) charged per item as it is consumed."""
    return {name: _guard(name, fn) for name, fn in filters.items()}


def _guard(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if hasattr(inner, "jinja_pass_arg") else 0
    call = _WRAPPERS[name](inner) if name in _WRAPPERS else inner
    cheap = name in _CHEAP_FILTERS
    textual = name not in _STRUCTURAL_FILTERS
    check = _CHECKS.get(name)
    what = f"the result of {name}"

    @functools.wraps(inner)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        spend = budget()
        value = args[offset] if len(args) > offset else None
        spend.step(FILTER_STEPS if cheap else FILTER_STEPS + _read_cost(value))
        if textual:
            text_size(value)
        rest = list(args[offset + 1 :])
        if rest or kwargs:
            _check_rest(spend, name, [*rest, *kwargs.values()])
        if check is not None:
            check(spend, value, rest, kwargs)
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            return tick_iter(result)
        return produced(result, what)

    return guarded


def guard_tests(tests: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Every test wrapped to cost a step (``select``/``reject`` call one per item)."""

    def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def tested(*args: Any, **kwargs: Any) -> Any:
            budget().step(TEST_STEPS)
            return inner(*args, **kwargs)

        return tested

    return {name: wrap(fn) for name, fn in tests.items()}


# -- code generation -----------------------------------------------------------------------


def _cost(body: list[nodes.Node]) -> int:
    """The nodes a pass through ``body`` executes itself: blocks inside it (loop, macro and
    call bodies, ``if`` branches) are not counted, they charge their own passes."""
    count = 0
    stack: list[nodes.Node] = list(body)
    while stack:
        node = stack.pop()
        count += LOOKUP_STEPS if isinstance(node, nodes.Getattr | nodes.Getitem) else 1
        if isinstance(node, nodes.For | nodes.Macro | nodes.CallBlock):
            stack.extend(node.iter_child_nodes(exclude=("body",)))
        elif isinstance(node, nodes.If):
            stack.append(node.test)
            stack.extend(elif_.test for elif_ in node.elif_)
        else:
            stack.extend(node.iter_child_nodes())
    return count


class BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, plus the step charges of the module docstring: every ``for``
    iterable goes through ``environment.tick_iter``, and every block (loop, macro and
    call-block body, ``if`` branch) starts with ``environment.tick(cost)``, the cost of the
    nodes it executes itself. ``~`` goes through a length check."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._block_costs: dict[int, int] = {}  # id(body list) -> its cost, until written
        self._iterables: set[int] = set()  # ids of the ``for`` iterable nodes

    def _charge(self, body: list[nodes.Node]) -> None:
        self._block_costs[id(body)] = 1 + _cost(body)

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._charge(node.body)
        self._iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit_If(self, node: nodes.If, frame: Frame) -> None:
        for body in (node.body, *(e.body for e in node.elif_), node.else_):
            if body:
                self._charge(body)
        super().visit_If(node, frame)

    def macro_body(self, node: Any, frame: Frame) -> Any:
        self._charge(node.body)
        return super().macro_body(node, frame)

    def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
        cost = self._block_costs.pop(id(nodes), None)
        if cost is not None:
            self.writeline(f"environment.tick({cost})")
        super().blockvisit(nodes, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.tick_iter(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guarded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")
