"""Parse-tree nodes of the Go template subset (``text/template/parse/node.go``).

The node kinds and their fields mirror Go's so that the tree walks Ollama performs on a parsed
template (finding identifiers, cutting after ``{{ .Response }}``, inferring tool-call and
thinking tags) can be ported node for node. ``str(node)`` renders the node back to template
syntax the way Go's ``Node.String()`` does; execution errors quote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Node:
    """Base of every node; ``pos`` is the character offset of the node in the source."""

    pos: int


@dataclass(slots=True, eq=False)
class TextNode(Node):
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True, eq=False)
class ListNode(Node):
    nodes: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        return "".join(str(n) for n in self.nodes)


@dataclass(slots=True, eq=False)
class DotNode(Node):
    def __str__(self) -> str:
        return "."


@dataclass(slots=True, eq=False)
class NilNode(Node):
    def __str__(self) -> str:
        return "nil"


@dataclass(slots=True, eq=False)
class BoolNode(Node):
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(slots=True, eq=False)
class NumberNode(Node):
    """A numeric constant; ``value`` is an ``int`` or ``float`` by Go's ideal-constant rules."""

    text: str
    value: int | float

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True, eq=False)
class StringNode(Node):
    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@dataclass(slots=True, eq=False)
class IdentifierNode(Node):
    """A function name."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(slots=True, eq=False)
class FieldNode(Node):
    """``.A.B.C``; ``ident`` is ``["A", "B", "C"]``."""

    ident: list[str]

    def __str__(self) -> str:
        return "".join("." + i for i in self.ident)


@dataclass(slots=True, eq=False)
class VariableNode(Node):
    """``$x.A.B``; ``ident`` is ``["$x", "A", "B"]``."""

    ident: list[str]

    def __str__(self) -> str:
        return ".".join(self.ident)


@dataclass(slots=True, eq=False)
class ChainNode(Node):
    """``(pipeline).A.B`` or ``fn.A``: a term followed by field accesses."""

    node: Node
    fields: list[str]

    def __str__(self) -> str:
        inner = str(self.node)
        if isinstance(self.node, PipeNode):
            inner = f"({inner})"
        return inner + "".join("." + f for f in self.fields)


@dataclass(slots=True, eq=False)
class CommandNode(Node):
    args: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        for arg in self.args:
            parts.append(f"({arg})" if isinstance(arg, PipeNode) else str(arg))
        return " ".join(parts)


@dataclass(slots=True, eq=False)
class PipeNode(Node):
    line: int
    is_assign: bool = False
    decl: list[VariableNode] = field(default_factory=list)
    cmds: list[CommandNode] = field(default_factory=list)

    def __str__(self) -> str:
        s = ""
        if self.decl:
            s = ", ".join(str(v) for v in self.decl) + (" = " if self.is_assign else " := ")
        return s + " | ".join(str(c) for c in self.cmds)


@dataclass(slots=True, eq=False)
class ActionNode(Node):
    line: int
    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass(slots=True, eq=False)
class BranchNode(Node):
    """Shared shape of ``if``, ``range`` and ``with``."""

    line: int
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None

    keyword = "branch"

    def __str__(self) -> str:
        s = "{{" + self.keyword + " " + str(self.pipe) + "}}" + str(self.list)
        if self.else_list is not None:
            s += "{{else}}" + str(self.else_list)
        return s + "{{end}}"


@dataclass(slots=True, eq=False)
class IfNode(BranchNode):
    keyword = "if"


@dataclass(slots=True, eq=False)
class RangeNode(BranchNode):
    keyword = "range"


@dataclass(slots=True, eq=False)
class WithNode(BranchNode):
    keyword = "with"


@dataclass(slots=True, eq=False)
class TemplateNode(Node):
    """``{{template "name" pipeline}}``; ``pipe`` is None when no pipeline was given."""

    line: int
    name: str
    pipe: PipeNode | None

    def __str__(self) -> str:
        quoted = '"' + self.name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if self.pipe is None:
            return "{{template " + quoted + "}}"
        return "{{template " + quoted + " " + str(self.pipe) + "}}"


@dataclass(slots=True, eq=False)
class BreakNode(Node):
    line: int

    def __str__(self) -> str:
        return "{{break}}"


@dataclass(slots=True, eq=False)
class ContinueNode(Node):
    line: int

    def __str__(self) -> str:
        return "{{continue}}"


# Internal markers returned by the parser for {{end}} and {{else}}; never part of a tree.
@dataclass(slots=True, eq=False)
class EndNode(Node):
    def __str__(self) -> str:
        return "{{end}}"


@dataclass(slots=True, eq=False)
class ElseNode(Node):
    line: int

    def __str__(self) -> str:
        return "{{else}}"
