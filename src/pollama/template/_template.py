"""``Template``: a parsed Go template as Ollama uses it (``template/template.go``).

Parsing follows Ollama's ``template.Parse``: the text is parsed with Ollama's function set,
every identifier in it is collected (``vars``), and when the template mentions neither
``.Messages`` nor ``.Response`` a ``{{ .Response }}`` action is appended, so that legacy
prompt-only templates still mark where the model's answer goes. ``text`` is always the source
exactly as given (what ``/api/show`` returns and what is stored in the template layer).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from typing import Any

from ..errors import TemplateError
from ._budget import RenderBudget
from ._exec import DEFAULT_MAX_OUTPUT, DEFAULT_MAX_STEPS, Executor
from ._funcs import FUNCTION_NAMES
from ._nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    TemplateNode,
    VariableNode,
)
from ._parser import parse


def identifiers(node: Node | None, strict: bool = True) -> Iterator[str]:
    """Every field and variable identifier under ``node`` (Ollama's ``Identifiers``).

    Like Ollama it looks into actions, control structures, command arguments and
    parenthesized pipelines, but not into ``(pipeline).Field`` chains. A ``{{template}}``
    without a pipeline is an error there (``undefined template specified``), and here too
    unless ``strict`` is false.
    """
    if node is None:
        return
    if isinstance(node, ListNode):
        for child in node.nodes:
            yield from identifiers(child, strict)
    elif isinstance(node, TemplateNode):
        if node.pipe is None and strict:
            raise TemplateError("undefined template specified")
        yield from identifiers(node.pipe, strict)
    elif isinstance(node, ActionNode):
        yield from identifiers(node.pipe, strict)
    elif isinstance(node, BranchNode):
        yield from identifiers(node.pipe, strict)
        yield from identifiers(node.list, strict)
        yield from identifiers(node.else_list, strict)
    elif isinstance(node, PipeNode):
        for cmd in node.cmds:
            for arg in cmd.args:
                yield from identifiers(arg, strict)
    elif isinstance(node, FieldNode | VariableNode):
        yield from node.ident


class Template:
    """A parsed Go template; create it with ``Template.parse``."""

    __slots__ = ("text", "root", "defined", "_vars")

    def __init__(self, text: str, root: ListNode, defined: dict[str, ListNode]) -> None:
        self.text = text
        self.root = root
        self.defined = defined
        self._vars: list[str] = []

    @classmethod
    def parse(cls, text: str, *, append_response: bool = True) -> Template:
        """Parse ``text``; raises ``TemplateError`` with Go's message if it does not parse.

        ``append_response=False`` skips Ollama's ``{{ .Response }}`` touch-up and gives plain
        Go ``text/template`` semantics (for templates that are not prompt templates).
        """
        root, defined = parse(text, FUNCTION_NAMES)
        template = cls(text, root, defined)
        names: set[str] = set()
        for tree in template.trees():
            names.update(n.lower() for n in identifiers(tree, strict=append_response))
        if append_response and "messages" not in names and "response" not in names:
            end = len(text)
            pipe = PipeNode(end, 0, cmds=[CommandNode(end, [FieldNode(end, ["Response"])])])
            root.nodes.append(ActionNode(end, 0, pipe))
            names.add("response")
        template._vars = sorted(names)
        return template

    def trees(self) -> Iterator[ListNode]:
        """The main tree, then each tree defined with ``define``/``block``."""
        yield self.root
        yield from self.defined.values()

    def vars(self) -> list[str]:
        """Ollama's ``Template.Vars``: all identifiers, lower-cased, sorted, de-duplicated.

        Includes nested field names (``content`` from ``.Content``) and variable names
        (``$system``); Ollama tests membership of ``messages``, ``response``, ``tools``,
        ``suffix``, ``toolcalls`` in this list.
        """
        return list(self._vars)

    def variables(self) -> set[str]:
        """Field names referenced anywhere, as written (``{"Messages", "Role", "System"}``)."""
        names: set[str] = set()
        for tree in self.trees():
            names.update(n for n in identifiers(tree, strict=False) if not n.startswith("$"))
        return names

    def has_var(self, name: str) -> bool:
        """Case-insensitive membership in ``vars()``, the test Ollama applies."""
        return name.lower() in self._vars

    def execute(
        self,
        data: Any,
        *,
        now: _dt.datetime | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        max_output: int = DEFAULT_MAX_OUTPUT,
        budget: RenderBudget | None = None,
    ) -> str:
        """Render the template over ``data`` (``$`` and the initial ``.``), usually a mapping.

        ``now`` fixes the clock for ``currentDate``/``yesterdayDate``. ``budget``, when
        given, is spent instead of a fresh one of ``max_steps``/``max_output`` (executions
        that make one prompt share it). Raises ``TemplateError`` when execution fails, and
        its subclass ``RenderLimitExceeded`` when it exceeds a bound.
        """
        return self.execute_tree(
            self.root, data, now=now, max_steps=max_steps, max_output=max_output, budget=budget
        )

    def execute_tree(
        self,
        root: ListNode,
        data: Any,
        *,
        now: _dt.datetime | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        max_output: int = DEFAULT_MAX_OUTPUT,
        budget: RenderBudget | None = None,
    ) -> str:
        """Execute ``root`` (this template's tree or a rewritten copy) with this template's
        named templates available."""
        templates = {"": self.root, **self.defined}
        executor = Executor(
            self.text,
            templates,
            now=now,
            max_steps=max_steps,
            max_output=max_output,
            budget=budget,
        )
        return executor.run(root, data)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        preview = self.text if len(self.text) < 40 else self.text[:37] + "..."
        return f"Template({preview!r})"
