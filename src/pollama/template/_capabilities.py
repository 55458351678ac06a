"""What a template says about a model: capabilities and the tags its output uses.

Ports of Ollama's heuristics, which read the *parse tree* of a Go template
(``thinking/template.go InferTags``, ``tools/template.go parseTag``) or the raw text of a Jinja
chat template (``server/images.go``):

* a Go template grants ``tools`` if it references ``.Tools``, ``insert`` if it references
  ``.Suffix``, and ``thinking`` if thinking tags can be inferred;
* a Jinja template grants ``tools`` if its text mentions ``tools`` or ``tool_call``, and
  ``thinking`` if it mentions both ``<think>`` and ``</think>`` (or strips reasoning with
  ``content.split('</think>')``);
* the thinking tags are the first and last text of the list enclosing ``{{ .Thinking }}``
  inside a ``range`` over ``.Messages``; the tool-call tag is the first non-blank text inside
  the ``{{ if ... .ToolCalls }}`` block, cut before any ``{`` (``{`` when there is none).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ._nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    IfNode,
    ListNode,
    Node,
    PipeNode,
    RangeNode,
    TemplateNode,
    TextNode,
    WithNode,
)
from ._template import Template


def _visit(node: Node | None, enter: Callable[[Node], None], leave: Callable[[Node], None]) -> None:
    """Ollama's ``templateVisit``: pre-order with enter/leave callbacks."""
    if node is None:
        return
    enter(node)
    if isinstance(node, ListNode):
        for child in node.nodes:
            _visit(child, enter, leave)
    elif isinstance(node, BranchNode):
        _visit(node.pipe, enter, leave)
        _visit(node.list, enter, leave)
        _visit(node.else_list, enter, leave)
    elif isinstance(node, ActionNode | TemplateNode):
        _visit(node.pipe, enter, leave)
    elif isinstance(node, PipeNode):
        for cmd in node.cmds:
            _visit(cmd, enter, leave)
    elif isinstance(node, CommandNode):
        for arg in node.args:
            _visit(arg, enter, leave)
    leave(node)


def _range_uses_field(node: RangeNode, name: str) -> bool:
    found = False

    def enter(n: Node) -> None:
        nonlocal found
        if isinstance(n, FieldNode) and n.ident and n.ident[0] == name:
            found = True

    _visit(node.pipe, enter, lambda n: None)
    return found


def infer_thinking_tags(template: Template) -> tuple[str, str] | None:
    """The (opening, closing) thinking tags of a Go template, e.g. ``("<think>", "</think>")``.

    None unless both tags are found (Ollama enables thinking parsing only then).
    """
    ancestors: list[Node] = []
    opening = closing = ""

    def enter(n: Node) -> None:
        nonlocal opening, closing
        ancestors.append(n)
        if not (isinstance(n, FieldNode) and n.ident and n.ident[0] == "Thinking"):
            return
        enclosing_range = next((a for a in reversed(ancestors) if isinstance(a, RangeNode)), None)
        if enclosing_range is None or not _range_uses_field(enclosing_range, "Messages"):
            return
        lst = next((a for a in reversed(ancestors) if isinstance(a, ListNode)), None)
        if lst is None or not lst.nodes:
            return
        if isinstance(lst.nodes[0], TextNode):
            opening = lst.nodes[0].text.strip()
        if isinstance(lst.nodes[-1], TextNode):
            closing = lst.nodes[-1].text.strip()

    def leave(n: Node) -> None:
        ancestors.pop()

    _visit(template.root, enter, leave)
    if opening and closing:
        return opening, closing
    return None


def _is_tool_calls_if(node: IfNode) -> bool:
    return any(
        isinstance(arg, FieldNode) and "ToolCalls" in arg.ident
        for cmd in node.pipe.cmds
        for arg in cmd.args
    )


def _find_tool_call_node(nodes: list[Node]) -> IfNode | None:
    for node in nodes:
        if isinstance(node, IfNode) and _is_tool_calls_if(node):
            return node
        if isinstance(node, BranchNode):
            found = _find_tool_call_node(node.list.nodes)
            if found is None and node.else_list is not None:
                found = _find_tool_call_node(node.else_list.nodes)
            if found is not None:
                return found
        elif isinstance(node, ListNode):
            found = _find_tool_call_node(node.nodes)
            if found is not None:
                return found
    return None


def _find_text_node(nodes: list[Node]) -> TextNode | None:
    for node in nodes:
        if isinstance(node, TextNode):
            if node.text.strip(" \t\r\n\v\f"):
                return node
        elif isinstance(node, IfNode | RangeNode | WithNode):
            found = _find_text_node(node.list.nodes)
            if found is None and node.else_list is not None:
                found = _find_text_node(node.else_list.nodes)
            return found
        elif isinstance(node, ListNode):
            found = _find_text_node(node.nodes)
            if found is not None:
                return found
        elif isinstance(node, ActionNode):
            return None
    return None


def infer_tool_call_tag(template: Template) -> str:
    """The text a model emits before a tool call (``<tool_call>``, ``[TOOL_CALLS]``), or ``{``.

    ``{`` means "no tag": any JSON object in the output may be a tool call.
    """
    block = _find_tool_call_node(template.root.nodes)
    if block is None:
        return "{"
    text = _find_text_node(block.list.nodes)
    if text is None:
        return "{"
    tag = text.text.replace("\r\n", "\n").split("{", 1)[0].strip()
    return tag or "{"


def template_capabilities(template: Template) -> set[str]:
    """Capabilities a Go template grants: ``tools``, ``insert``, ``thinking``."""
    caps: set[str] = set()
    if template.has_var("tools"):
        caps.add("tools")
    if template.has_var("suffix"):
        caps.add("insert")
    if infer_thinking_tags(template) is not None:
        caps.add("thinking")
    return caps


def jinja_capabilities(text: str) -> set[str]:
    """Capabilities a GGUF Jinja chat template grants (a text heuristic, as in Ollama)."""
    caps: set[str] = set()
    if not text:
        return caps
    if "tools" in text or "tool_call" in text:
        caps.add("tools")
    if _jinja_has_thinking(text):
        caps.add("thinking")
    return caps


def _jinja_has_thinking(text: str) -> bool:
    if "<think>" in text and "</think>" in text:
        return True
    # Some Qwen/DeepSeek templates strip earlier reasoning by splitting content at </think>.
    return (
        ("content.split('</think>')" in text or 'content.split("</think>")' in text)
        and "reasoning_content" not in text
        and "<SPECIAL_12>" not in text
    )


def jinja_has_tool_round_trip(text: str) -> bool:
    """Whether a Jinja template renders both assistant tool calls and tool results."""
    if "tools" not in text and "tool_call" not in text:
        return False
    if "tool_calls" not in text and "assistant_tool_call" not in text:
        return False
    markers = (
        "tool_response",
        "tool_results",
        "role'] == 'tool'",
        'role\'] == "tool"',
        "role\"] == 'tool'",
        'role"] == "tool"',
        "message.role == 'tool'",
        'message.role == "tool"',
        "ipython",
    )
    return any(m in text for m in markers)


def go_template_has_tool_round_trip(template: Template) -> bool:
    """Whether a Go template renders tools, assistant tool calls and tool results."""
    if not template.has_var("tools") or not template.has_var("toolcalls"):
        return False
    return any(m in template.text for m in ('eq .Role "tool"', "tool_response", "TOOL_RESULTS"))


def prefer_jinja_template(
    jinja_text: str,
    jinja_caps: Collection[str],
    go_template: Template | None,
    go_caps: Collection[str],
) -> bool:
    """Ollama's ``shouldPreferChatTemplate``: use the GGUF Jinja template over the Go one?

    Yes when the Jinja template grants more capabilities (unless only the Go template
    round-trips tool calls), or when both grant the same capabilities including ``tools``
    and only the Jinja template round-trips tool calls. Only consulted when
    ``OLLAMA_GO_TEMPLATE`` is unset.
    """
    go_round_trip = go_template is not None and go_template_has_tool_round_trip(go_template)
    if len(set(jinja_caps)) > len(set(go_caps)):
        return not go_round_trip or jinja_has_tool_round_trip(jinja_text)
    if set(jinja_caps) != set(go_caps) or "tools" not in jinja_caps:
        return False
    return jinja_has_tool_round_trip(jinja_text) and not go_round_trip
