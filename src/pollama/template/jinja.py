"""GGUF ``tokenizer.chat_template`` rendering: Jinja in a hardened sandbox.

A chat template comes from the model file, so it is untrusted code (CVE-2024-34359: a GGUF
whose template ran ``os.popen`` through an unsandboxed Jinja environment). Every template is
compiled in one place, :class:`_SandboxEnvironment`, an ``ImmutableSandboxedEnvironment``
that also:

* raises at once on any ``_``-prefixed or internal attribute (``cycler.__init__``,
  ``''.__class__``) instead of returning a silent undefined, so an escape attempt fails the
  render with ``TemplateError`` and never reaches Python internals;
* bounds the amplifiers a template could use to exhaust memory or CPU: ``*``/``**``/``+``/
  ``%``/``~`` results, ``str.format`` and ``%`` widths, ``center``/``indent``/``slice``
  widths, integer arguments to ``str``/``list`` methods, the total length of every
  ``range()`` in one render (:data:`RANGE_BUDGET`), the rendered output
  (:data:`MAX_OUTPUT_CHARS`) and recursion depth.

The variables are those HF transformers' ``apply_chat_template`` and llama.cpp's minja pass:
``messages``, ``add_generation_prompt``, ``bos_token``/``eos_token``, ``tools`` (``None``
when the request has none), ``enable_thinking``/``reasoning_effort`` only when the request
sets ``think`` (Ollama's ``chat_template_kwargs``), ``raise_exception`` and
``strftime_now``; ``tojson`` is HF's (no HTML escaping, ``indent``/``separators``/
``sort_keys``/``ensure_ascii`` options), with ``trim_blocks``/``lstrip_blocks`` and the
``loopcontrols`` extension. As llama.cpp does, a template that ignores system messages (it
raises or drops them) gets them merged into the next user message (minja's polyfill), and a
leading ``bos_token`` is removed when the tokenizer adds BOS itself.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import functools
import json
import math
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import TemplateError
from ._prompt import think_values

__all__ = [
    "CACHE_SIZE",
    "MAX_OUTPUT_CHARS",
    "RANGE_BUDGET",
    "JinjaChatTemplate",
    "compile_chat_template",
    "jinja_messages",
    "render_chat_template",
]

MAX_OUTPUT_CHARS = 64 * 1024 * 1024
"""The longest prompt (and the longest string any one expression may build) a template may
produce, in characters."""

RANGE_BUDGET = 1_000_000
"""How many elements all ``range()`` calls of one render may produce together."""

CACHE_SIZE = 32
"""Compiled templates kept, keyed by their text (one per loaded model is the common case)."""

_MAX_POW_BITS = 1 << 16
_DIGITS = re.compile(r"\d+")

# Per render: the remaining range() budget. A ContextVar, so concurrent renders (threads or
# tasks) each have their own.
_range_budget: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "pollama_jinja_range_budget", default=None
)


class _RaisedException(jinja2.TemplateError):
    """``raise_exception(msg)`` called by the template itself: its message is kept verbatim."""


def _too_big(what: str) -> SecurityError:
    return SecurityError(f"{what} exceeds the chat template limit of {MAX_OUTPUT_CHARS} characters")


def _check_len(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_OUTPUT_CHARS:
        raise _too_big("a value")
    return value


def _check_widths(fmt: str) -> None:
    """Reject format strings whose field widths or precisions could build a huge string."""
    for digits in _DIGITS.findall(fmt):
        if len(digits) > 9 or int(digits) > MAX_OUTPUT_CHARS:
            raise _too_big("a format width")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_args(args: Sequence[Any]) -> None:
    if any(_is_int(a) and abs(a) > MAX_OUTPUT_CHARS for a in args):
        raise _too_big("an argument")


def _budget_range(*args: int) -> range:
    rng = range(*args)
    budget = _range_budget.get()
    if budget is None or len(rng) > budget[0]:
        raise SecurityError(f"chat template loops exceed the limit of {RANGE_BUDGET} iterations")
    budget[0] -= len(rng)
    return rng


def _raise_exception(message: Any) -> None:
    raise _RaisedException(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF transformers' ``tojson``: plain ``json.dumps`` (no HTML escaping), with options."""
    if _is_int(indent) and abs(indent) > 1024:  # type: ignore[arg-type]
        raise _too_big("a JSON indent")
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    return str(_check_len(text))


def _guarded_filter(name: str) -> Any:
    inner = jinja2.filters.FILTERS[name]

    @functools.wraps(inner)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_int_args([*args[1:], *kwargs.values()])
        return inner(*args, **kwargs)

    return guarded


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_widths(str(value))
    return str(_check_len(jinja2.filters.do_format(value, *args, **kwargs)))


class _Generation(jinja2.ext.Extension):
    """HF's ``{% generation %}…{% endgeneration %}`` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


class _CodeGenerator(CodeGenerator):
    """Routes ``~`` (string concatenation) through a length check."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guarded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """The one environment every chat template is compiled in (see the module docstring)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[jinja2.ext.loopcontrols, _Generation],
        )
        self.globals["range"] = _budget_range
        del self.globals["lipsum"]  # lipsum(n) builds n paragraphs; no chat template needs it
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters["format"] = _format_filter
        for name in ("center", "indent", "slice", "batch"):
            self.filters[name] = _guarded_filter(name)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, count = (left, right) if _is_int(right) else (right, left)
            if isinstance(seq, str | list | tuple) and _is_int(count):
                if len(seq) * max(count, 0) > MAX_OUTPUT_CHARS:
                    raise _too_big("a repeated value")
        elif operator == "**" and _is_int(left) and _is_int(right):
            if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > _MAX_POW_BITS:
                raise SecurityError("a power in the chat template is too large")
        elif operator == "%" and isinstance(left, str):
            _check_widths(left)
            if "*" in left:
                _check_int_args(right if isinstance(right, tuple) else (right,))
        return _check_len(self.binop_table[operator](left, right))

    def guarded_join(self, parts: Sequence[Any]) -> str:
        return str(_check_len("".join(str(p) for p in parts)))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_widths(str(value.__self__))

        def checked(*args: Any, **kwargs: Any) -> str:
            return str(_check_len(wrapped(*args, **kwargs)))

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(__obj, types.BuiltinMethodType | types.MethodType) and isinstance(
            getattr(__obj, "__self__", None), str | list | tuple | dict
        ):
            _check_int_args([*args, *kwargs.values()])
        return _check_len(super().call(__context, __obj, *args, **kwargs))


_ENV = _SandboxEnvironment()


def _template_error(exc: BaseException) -> TemplateError:
    if isinstance(exc, TemplateError):
        return exc
    if isinstance(exc, _RaisedException):
        return TemplateError(f"chat template error: {exc.message}")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return TemplateError(f"chat template: {exc.message} (line {exc.lineno})")
    if isinstance(exc, RecursionError):
        return TemplateError("chat template error: nested too deeply")
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return TemplateError(f"chat template error: {message}")


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile_chat_template(text: str) -> jinja2.Template:
    """The compiled template for ``text`` (cached); ``TemplateError`` if it does not parse."""
    try:
        return _ENV.from_string(text)
    except Exception as exc:  # untrusted code: any failure is the template's
        raise _template_error(exc) from None


def render_chat_template(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    extra: Mapping[str, Any] | None = None,
    now: _dt.datetime | None = None,
) -> str:
    """Render a Jinja chat template as HF's ``apply_chat_template`` does, inside the sandbox.

    ``messages`` and ``tools`` are HF-shaped dicts (see :func:`jinja_messages`); ``extra``
    adds variables (``enable_thinking``…). ``now`` fixes ``strftime_now`` (local time when
    None). Raises ``TemplateError`` for every failure, the template's own
    ``raise_exception`` included, and when a limit is hit.
    """
    template = compile_chat_template(text)
    moment = now

    def strftime_now(fmt: str) -> str:
        _check_widths(str(fmt))
        return (moment or _dt.datetime.now()).strftime(str(fmt))

    variables: dict[str, Any] = {
        **(extra or {}),
        "messages": [dict(m) for m in messages],
        "tools": None if tools is None else [dict(t) for t in tools],
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "strftime_now": strftime_now,
    }
    token = _range_budget.set([RANGE_BUDGET])
    try:
        return _collect(template.generate(variables))
    except Exception as exc:  # untrusted code: any failure is the template's
        raise _template_error(exc) from None
    finally:
        _range_budget.reset(token)


def _collect(chunks: Iterator[str]) -> str:
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise _too_big("the rendered prompt")
        out.append(chunk)
    return "".join(out)


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return {} if value is None else value


def jinja_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ollama wire messages as the dicts HF-style templates expect (llama-server's shape).

    ``thinking`` becomes ``reasoning_content``, ``tool_name`` becomes ``name``, tool calls get
    ``type: function`` and object ``arguments`` (a JSON string is decoded), ``content`` is
    always a string. Images are not passed: their ``[img-N]`` markers are in the content.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        item: dict[str, Any] = {
            "role": str(msg.get("role") or "").lower(),
            "content": str(msg.get("content") or ""),
        }
        if msg.get("thinking"):
            item["reasoning_content"] = str(msg["thinking"])
        if msg.get("tool_name"):
            item["name"] = str(msg["tool_name"])
        if msg.get("tool_call_id"):
            item["tool_call_id"] = str(msg["tool_call_id"])
        calls = msg.get("tool_calls") or []
        if calls:
            item["tool_calls"] = [_tool_call(c) for c in calls]
        out.append(item)
    return out


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    out: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": str(function.get("name") or ""),
            "arguments": _arguments(function.get("arguments")),
        },
    }
    if call.get("id"):
        out["id"] = str(call["id"])
    return out


_SYSTEM_NEEDLE = "<System Needle>"


@functools.lru_cache(maxsize=CACHE_SIZE)
def _supports_system_role(text: str) -> bool:
    """minja's probe: does a system message's text reach the output at all?"""
    probe = [{"role": "system", "content": _SYSTEM_NEEDLE}, {"role": "user", "content": "Hey"}]
    try:
        out = render_chat_template(text, probe, add_generation_prompt=False)
    except TemplateError:
        return False
    return _SYSTEM_NEEDLE in out


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """minja's system-role polyfill: system text goes into the next user message."""
    out: list[dict[str, Any]] = []
    pending = ""
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "system":
            pending = f"{pending}\n{content}" if pending else content
            continue
        if pending and role == "user":
            msg = {**msg, "content": pending + ("\n" + content if content else "")}
            pending = ""
        elif pending:
            out.append({"role": "user", "content": pending})
            pending = ""
        out.append(msg)
    if pending:
        out.append({"role": "user", "content": pending})
    return out


_ADD_BOS_BY_VOCAB = {"llama": True, "bert": True}


@dataclass(frozen=True, slots=True)
class JinjaChatTemplate:
    """A GGUF chat template with the vocabulary facts rendering needs."""

    text: str
    bos_token: str = ""
    eos_token: str = ""
    end_tokens: tuple[str, ...] = ()
    """Texts of the end-of-generation tokens (EOS, EOT, EOM), for default stop words."""
    add_bos: bool = False
    """Whether the tokenizer adds BOS itself (then a rendered leading ``bos_token`` is cut)."""

    @classmethod
    def from_gguf(cls, kv: Mapping[str, Any], text: str | None = None) -> JinjaChatTemplate:
        """From a GGUF header's key/values (``GGUFInfo.kv``); ``text`` overrides the template."""
        tokens = kv.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, Sequence) and not isinstance(tokens, str) else []

        def token(key: str) -> str:
            idx = kv.get(key)
            if _is_int(idx) and 0 <= idx < len(tokens) and isinstance(tokens[idx], str):
                return str(tokens[idx])
            return ""

        ends = (token(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
        add_bos = kv.get("tokenizer.ggml.add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _ADD_BOS_BY_VOCAB.get(str(kv.get("tokenizer.ggml.model")), False)
        if text is None:
            raw = kv.get("tokenizer.chat_template")
            text = raw if isinstance(raw, str) else ""
        return cls(
            text=text,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            end_tokens=tuple(dict.fromkeys(e for e in ends if e)),
            add_bos=add_bos,
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        add_generation_prompt: bool = True,
        now: _dt.datetime | None = None,
    ) -> str:
        """Render Ollama wire messages to a prompt, as llama-server's ``--jinja`` path does.

        Empty ``tools`` count as none. ``think`` set adds ``enable_thinking`` (and
        ``reasoning_effort`` for a level string), Ollama's ``chat_template_kwargs``.
        """
        msgs = jinja_messages(messages)
        if not _supports_system_role(self.text):
            msgs = _merge_system(msgs)
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = think_values(think)["Think"]
            if isinstance(think, str) and think:
                extra["reasoning_effort"] = think
        out = render_chat_template(
            self.text,
            msgs,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            extra=extra,
            now=now,
        )
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token) :]
        return out
