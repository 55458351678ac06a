"""Rendering a chat or completion request into a prompt, as Ollama's ``Template.Execute`` does.

Three modes, chosen exactly as in ``template/template.go``:

1. **fill-in-the-middle**: a non-empty ``prompt`` *and* ``suffix``: the template sees only
   ``.Prompt``, ``.Suffix``, ``.Response`` ("") and the ``.Think*`` values;
2. **messages**: the template references ``.Messages`` (anywhere, in any case): it sees
   ``.System`` (every system message joined by a blank line), ``.Messages`` (consecutive
   messages of one role merged with a blank line, except ``tool`` messages), ``.Tools``,
   ``.Response`` ("") and ``.Think``/``.ThinkLevel``/``.IsThinkSet``;
3. **legacy**: otherwise the template is executed once per user/assistant exchange with
   ``.System``/``.Prompt``/``.Response`` and the results concatenated; in the last exchange
   everything after ``{{ .Response }}`` is cut, so the prompt ends where the model answers.

Messages and tools arrive as plain dicts (the wire shapes of ``/api/chat``) and are turned into
the Go values Ollama's templates see (``templateMessage``, ``templateTool``...), field for
field, so that ``{{ .Tools }}``, ``{{ json .Tools }}`` and ``{{ .Function.Arguments }}`` print
the same JSON Ollama prints: struct fields in declaration order, map keys sorted, numbers as
float64, ``<``/``>``/``&`` escaped.

One deliberate difference from Ollama HEAD: ``{{ .Function }}`` and ``{{ .Function.Parameters }}``
of a tool print as JSON here. Ollama's ``templateToolFunction`` lost its ``String`` method when
the template types were introduced, so Ollama now prints Go struct syntax there (``{get_weather
... {object <nil> ...}}``), which breaks the Qwen 2.5/3 style templates that embed
``{"type": "function", "function": {{ .Function }}}``; JSON is what those templates expect and
what Ollama printed before.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidRequest, TemplateError
from ._budget import RenderBudget
from ._nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
)
from ._template import Template
from ._values import GoList, GoMap, GoStruct, PropertyType


def think_values(think: bool | str | None) -> dict[str, Any]:
    """``.Think``, ``.ThinkLevel`` and ``.IsThinkSet`` from a request's ``think`` value.

    ``True`` means level ``"medium"``; a level string (``high``/``medium``/``low``/``max``)
    enables thinking; ``None`` means "not set" (``IsThinkSet`` false).
    """
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, bool):
        return {"Think": think, "ThinkLevel": "medium" if think else "", "IsThinkSet": True}
    return {
        "Think": think in ("high", "medium", "low", "max"),
        "ThinkLevel": think,
        "IsThinkSet": True,
    }


def collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's ``collate``: the joined system text and the merged message list.

    Consecutive messages with the same role are merged (contents joined by a blank line),
    except ``tool`` messages, which keep their own tool name and id. Inputs are not mutated.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = str(msg.get("role") or "").lower()
        content = str(msg.get("content") or "")
        if role == "system":
            system.append(content)
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] += "\n\n" + content
        else:
            item = dict(msg)
            item["role"], item["content"] = role, content
            out.append(item)
    return "\n\n".join(system), out


# -- Go values for messages and tools ------------------------------------------------------


def _json_value(v: Any) -> Any:
    """A JSON value as Go decodes it into ``any``: numbers become float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str | float):
        return v
    if isinstance(v, int):
        return float(v)
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    raise InvalidRequest(f"unsupported value of type {type(v).__name__} in tool data")


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str):
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            return image.encode("utf-8")
    raise InvalidRequest("images must be bytes or base64 strings")


def _arguments(value: Any) -> GoMap:
    if value is None:
        return GoMap(type_name="template.templateArgs", nil=True, stringer=True, nil_text="{}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidRequest("tool call arguments must be a JSON object") from None
    if not isinstance(value, Mapping):
        raise InvalidRequest("tool call arguments must be a JSON object")
    return GoMap(
        {str(k): _json_value(v) for k, v in value.items()},
        type_name="template.templateArgs",
        stringer=True,
        nil_text="{}",
    )


def template_tool_call(call: Mapping[str, Any]) -> GoStruct:
    """A ``templateToolCall`` (``.ID``, ``.Function.Index/.Name/.Arguments``)."""
    function = call.get("function") or {}
    index = function.get("index") or 0
    return GoStruct(
        "template.templateToolCall",
        {
            "ID": str(call.get("id") or ""),
            "Function": GoStruct(
                "template.templateToolCallFunction",
                {
                    "Index": int(index),
                    "Name": str(function.get("name") or ""),
                    "Arguments": _arguments(function.get("arguments")),
                },
            ),
        },
    )


def template_message(msg: Mapping[str, Any]) -> GoStruct:
    """A ``*templateMessage`` from a wire message dict."""
    images = msg.get("images") or []
    calls = msg.get("tool_calls") or []
    return GoStruct(
        "*template.templateMessage",
        {
            "Role": str(msg.get("role") or ""),
            "Content": str(msg.get("content") or ""),
            "Thinking": str(msg.get("thinking") or ""),
            "Images": GoList(
                (_image_bytes(i) for i in images), type_name="[]api.ImageData", nil=True
            ),
            "ToolCalls": GoList(
                (template_tool_call(c) for c in calls),
                type_name="[]template.templateToolCall",
                nil=True,
            ),
            "ToolName": str(msg.get("tool_name") or ""),
            "ToolCallID": str(msg.get("tool_call_id") or ""),
        },
    )


_PROPERTY_JSON = (
    ("AnyOf", "anyOf", True),
    ("Type", "type", True),
    ("Items", "items", True),
    ("Description", "description", True),
    ("Enum", "enum", True),
    ("Properties", "properties", True),
    ("Required", "required", True),
)


def _string_list(value: Any, type_name: str = "[]string") -> GoList:
    if value is None:
        return GoList(type_name=type_name, nil=True)
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        raise InvalidRequest("expected a list of strings in tool definition")
    return GoList(value, type_name=type_name)


def tool_property(prop: Mapping[str, Any]) -> GoStruct:
    """An ``api.ToolProperty`` (what ``toTypeScriptType`` understands)."""
    if not isinstance(prop, Mapping):
        raise InvalidRequest("tool property must be an object")
    raw_type = prop.get("type")
    if raw_type is None:
        ptype = PropertyType()
    elif isinstance(raw_type, str):
        ptype = PropertyType([raw_type])
    else:
        ptype = PropertyType(_string_list(raw_type))
    any_of = prop.get("anyOf")
    nested = prop.get("properties")
    enum = prop.get("enum")
    return GoStruct(
        "api.ToolProperty",
        {
            "AnyOf": GoList(
                (tool_property(p) for p in any_of or []),
                type_name="[]api.ToolProperty",
                nil=any_of is None,
            ),
            "Type": ptype,
            "Items": _json_value(prop.get("items")),
            "Description": str(prop.get("description") or ""),
            "Enum": GoList(
                (_json_value(e) for e in enum or []), type_name="[]interface {}", nil=enum is None
            ),
            "Properties": None
            if nested is None
            else GoMap(
                {str(k): tool_property(v) for k, v in nested.items()},
                type_name="*api.ToolPropertiesMap",
                ordered=True,
            ),
            "Required": _string_list(prop.get("required")),
        },
        json_fields=_PROPERTY_JSON,
    )


def template_tool(tool: Mapping[str, Any]) -> GoStruct:
    """A ``templateTool``: prints (and JSON-encodes) as Ollama's tool JSON."""
    function = tool.get("function") or {}
    params = function.get("parameters") or {}
    props = params.get("properties")
    return GoStruct(
        "template.templateTool",
        {
            "Type": str(tool.get("type") or ""),
            "Items": _json_value(tool.get("items")),
            "Function": GoStruct(
                "template.templateToolFunction",
                {
                    "Name": str(function.get("name") or ""),
                    "Description": str(function.get("description") or ""),
                    "Parameters": GoStruct(
                        "template.templateToolFunctionParameters",
                        {
                            "Type": str(params.get("type") or ""),
                            "Defs": _json_value(params.get("$defs")),
                            "Items": _json_value(params.get("items")),
                            "Required": _string_list(params.get("required")),
                            "Properties": GoMap(
                                {str(k): tool_property(v) for k, v in (props or {}).items()},
                                type_name="template.templateProperties",
                                nil=props is None,
                                stringer=True,
                                nil_text="{}",
                            ),
                        },
                        json_fields=(
                            ("Type", "type", False),
                            ("Defs", "$defs", True),
                            ("Items", "items", True),
                            ("Required", "required", True),
                            ("Properties", "properties", False),
                        ),
                        stringer=True,
                    ),
                },
                json_fields=(
                    ("Name", "name", False),
                    ("Description", "description", False),
                    ("Parameters", "parameters", False),
                ),
                stringer=True,
            ),
        },
        json_fields=(
            ("Type", "type", False),
            ("Items", "items", True),
            ("Function", "function", False),
        ),
        stringer=True,
    )


def template_tools(tools: Sequence[Mapping[str, Any]] | None) -> GoList:
    """``templateTools``; nil (JSON ``null``) when the request has no ``tools`` at all."""
    return GoList(
        (template_tool(t) for t in tools or []),
        type_name="template.templateTools",
        nil=tools is None,
        stringer=True,
    )


# -- legacy mode -----------------------------------------------------------------------------


def cut_after_response(root: ListNode) -> ListNode:
    """A copy of ``root`` with everything after the first ``.Response`` field removed.

    A port of Ollama's ``deleteNode`` walk: nodes are visited in document order, the field
    naming ``Response`` is kept and every node visited after it is dropped; conditions of
    ``if``/``range``/``with`` are not visited (so ``{{ if .Response }}`` does not cut), and an
    action whose pipeline loses all its commands disappears. ``root`` is not modified.
    """
    cut = False

    def dropped(node: Node) -> bool:
        nonlocal cut
        if isinstance(node, FieldNode) and "Response" in node.ident:
            cut = True
            return False
        return cut

    def walk_list(node: ListNode) -> ListNode | None:
        if dropped(node):
            return None
        return ListNode(node.pos, [n for n in (walk(c) for c in node.nodes) if n is not None])

    def walk_pipe(node: PipeNode) -> PipeNode | None:
        if dropped(node):
            return None
        cmds: list[CommandNode] = []
        for cmd in node.cmds:
            args = [a for a in (walk(x) for x in cmd.args) if a is not None]
            if not args:
                return None
            cmds.append(CommandNode(cmd.pos, args))
        return PipeNode(node.pos, node.line, node.is_assign, node.decl, cmds)

    def walk(node: Node) -> Node | None:
        if isinstance(node, ListNode):
            return walk_list(node)
        if isinstance(node, PipeNode):
            return walk_pipe(node)
        if dropped(node):
            return None
        if isinstance(node, BranchNode):
            body = walk_list(node.list) or ListNode(node.list.pos)
            other = walk_list(node.else_list) if node.else_list is not None else None
            return type(node)(node.pos, node.line, node.pipe, body, other)
        if isinstance(node, ActionNode):
            pipe = walk_pipe(node.pipe)
            return None if pipe is None else ActionNode(node.pos, node.line, pipe)
        return node

    try:
        return walk_list(root) or ListNode(root.pos)
    except RecursionError:
        raise TemplateError("template: nested too deeply") from None


def _render_legacy(
    template: Template, messages: list[dict[str, Any]], think: dict[str, Any], now: Any
) -> str:
    """One execution per exchange, all spending one budget: the prompt is what is bounded,
    not each exchange (a thousand turns must not buy a thousand budgets)."""
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}
    budget = RenderBudget()

    def execute() -> None:
        out.append(template.execute({**turn, **think}, now=now, budget=budget))
        turn.update(System="", Prompt="", Response="")

    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                execute()
            turn["System"] = content
        elif role == "user":
            if turn["Response"]:
                execute()
            turn["Prompt"] = content
        elif role == "assistant":
            turn["Response"] = content
    final = cut_after_response(template.root)
    out.append(template.execute_tree(final, {**turn, **think}, now=now, budget=budget))
    return "".join(out)


def render_prompt(
    template: Template,
    *,
    messages: Sequence[Mapping[str, Any]] = (),
    system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    think: bool | str | None = None,
    prompt: str = "",
    suffix: str = "",
    now: _dt.datetime | None = None,
) -> str:
    """Render a request into the prompt text Ollama would send to the model.

    ``messages`` are wire dicts (``role``, ``content``, ``thinking``, ``images``,
    ``tool_calls``, ``tool_name``, ``tool_call_id``). ``system``, when non-empty, is put
    first as a system message; callers decide when (Ollama uses the Modelfile ``SYSTEM``
    only if the request has no system message of its own). ``prompt`` with a non-empty
    ``suffix`` selects fill-in-the-middle mode. Raises ``TemplateError`` if execution fails.
    """
    think_vals = think_values(think)
    if prompt and suffix:
        data = {"Prompt": prompt, "Suffix": suffix, "Response": "", **think_vals}
        return template.execute(data, now=now)
    all_messages: list[Mapping[str, Any]] = list(messages)
    if system:
        all_messages.insert(0, {"role": "system", "content": system})
    system_text, collated = collate(all_messages)
    if template.has_var("messages"):
        data = {
            "System": system_text,
            "Messages": GoList(
                (template_message(m) for m in collated),
                type_name="[]*template.templateMessage",
                nil=True,
            ),
            "Tools": template_tools(tools),
            "Response": "",
            **think_vals,
        }
        return template.execute(data, now=now)
    return _render_legacy(template, collated, think_vals, now)
