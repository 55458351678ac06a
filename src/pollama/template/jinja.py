"""GGUF ``tokenizer.chat_template`` rendering: Jinja in a hardened sandbox.

A chat template comes from the model file, so it is untrusted code (CVE-2024-34359: a GGUF
whose template ran ``os.popen`` through an unsandboxed Jinja environment). Every template is
compiled in one place, :class:`_SandboxEnvironment`, an ``ImmutableSandboxedEnvironment``
that also:

* raises at once on any ``_``-prefixed or internal attribute (``cycler.__init__``,
  ``''.__class__``) instead of returning a silent undefined, so an escape attempt fails the
  render with ``TemplateError`` and never reaches Python internals;
* bounds the work and memory of each render with one ``RenderBudget`` (``_budget.py``,
  spent as ``_jinja_limits.py`` describes): steps for every loop pass, macro, function,
  filter and method call; a length check *before* every operation that can multiply one
  (``*``, ``~``, ``%``, ``format``, ``replace``, ``join``, ``center``, ``indent``,
  ``wordwrap``, widths, ``range()``); the characters built, the rendered output
  (:data:`MAX_OUTPUT_CHARS`) and how deep macros nest. A template that exceeds any of them
  fails with ``RenderLimitExceeded`` (a ``TemplateError``) in well under a second.

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

import datetime as _dt
import functools
import json
import math
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import TemplateError
from . import _jinja_limits as limits
from ._budget import MAX_RENDER_OUTPUT, RenderBudget, RenderLimitExceeded
from ._prompt import think_values

__all__ = [
    "CACHE_SIZE",
    "MAX_OUTPUT_CHARS",
    "MAX_TEMPLATE_CHARS",
    "JinjaChatTemplate",
    "compile_chat_template",
    "jinja_messages",
    "render_chat_template",
]

MAX_OUTPUT_CHARS = MAX_RENDER_OUTPUT
"""The longest prompt (and the longest string any one expression may build) a template may
produce, in characters."""

MAX_TEMPLATE_CHARS = 1024 * 1024
"""The longest chat template compiled. The largest real ones are tens of kilobytes; Python's
``compile`` of what Jinja generates holds the interpreter lock throughout, so a template of
megabytes would stall every other request while it compiles."""

CACHE_SIZE = 32
"""Compiled templates kept, keyed by their text (one per loaded model is the common case)."""

_MAX_POW_BITS = 1 << 16
_DIGITS = re.compile(r"\d+")
_BUILTINS = (types.BuiltinMethodType, types.BuiltinFunctionType)


class _RaisedException(jinja2.TemplateError):
    """``raise_exception(msg)`` called by the template itself: its message is kept verbatim."""


def _check_widths(fmt: str) -> None:
    """Reject format strings whose field widths or precisions could build a huge string."""
    spend = limits.budget()
    for digits in _DIGITS.findall(fmt):
        spend.check_size(int(digits) if len(digits) <= 9 else 10**9, "a format width")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_args(args: Iterable[Any]) -> None:
    spend = limits.budget()
    for arg in args:
        if _is_int(arg):
            spend.check_size(abs(arg), "an argument")


_NESTED_FIELD = re.compile(r"\{[^{}]*\{")  # "{0:{1}}": a width taken from an argument


def _check_format(fmt: str, args: Iterable[Any], marker: str) -> None:
    """Refuse ``fmt % args`` or ``fmt.format(args)`` whose result could be too long: every
    field may print all the arguments at the widest width the format (or, with ``*`` or a
    nested field, an integer argument) gives."""
    _check_widths(fmt)
    values = list(args)
    widest = max([0, *(int(d) for d in _DIGITS.findall(fmt) if len(d) <= 9)])
    dynamic = "*" in fmt if marker == "%" else _NESTED_FIELD.search(fmt) is not None
    if dynamic:
        _check_int_args(values)
        widest = max([widest, *(abs(v) for v in values if _is_int(v))])
    longest = sum(limits.text_size(v) for v in values)
    limits.budget().check_size(len(fmt) + fmt.count(marker) * (widest + longest), "a format")


def _budget_range(*args: int) -> range:
    """``range()``: its items cost steps when it is made (a ``list`` of it is built in C)."""
    rng = range(*args)
    spend = limits.budget()
    spend.check_size(len(rng), "a range", items=True)
    spend.step(len(rng))
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
        raise SecurityError("a JSON indent in the chat template is too large")
    # Each node is printed with its separators and, indented, a new line at its depth.
    unit = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    seps = sum(len(str(s)) for s in separators) if isinstance(separators, tuple) else 2
    size = limits.text_size(value, per_node=seps + 1, per_level=max(unit or 0, 0))
    limits.budget().check_size(size, "a value turned into JSON")
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    return str(limits.produced(text, "the result of tojson"))


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_format(str(value), [*args, *kwargs.values()], "%")
    return jinja2.filters.do_format(value, *args, **kwargs)


class _Generation(jinja2.ext.Extension):
    """HF's ``{% generation %}…{% endgeneration %}`` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


@jinja2.pass_context
def _finalize(_context: Any, value: Any) -> Any:
    """Every ``{{ … }}`` costs steps, and a container is measured before it is printed.
    (Being ``pass_context`` also keeps Jinja from printing constants at compile time.)"""
    limits.budget().step(limits.OUTPUT_STEPS)
    if not isinstance(value, str):
        limits.text_size(value)
    return value


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """The one environment every chat template is compiled in (see the module docstring)."""

    code_generator_class = limits.BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[jinja2.ext.loopcontrols, _Generation],
            finalize=_finalize,
        )
        self.globals["range"] = _budget_range
        del self.globals["lipsum"]  # lipsum(n) builds n paragraphs; no chat template needs it
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters["format"] = _format_filter
        self.filters = limits.guard_filters(self.filters)
        self.tests = limits.guard_tests(self.tests)

    def tick(self, cost: int) -> None:
        """Called by the generated code at the start of each block (see ``_jinja_limits``)."""
        limits.budget().step(cost)

    def tick_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Called by the generated code on each ``for`` iterable."""
        return limits.tick_iter(iterable)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        spend = limits.budget()
        spend.step(limits.OPERATOR_STEPS)
        if operator == "*":
            seq, count = (left, right) if _is_int(right) else (right, left)
            if _is_int(seq) and _is_int(count):
                if seq.bit_length() + count.bit_length() > _MAX_POW_BITS:
                    raise SecurityError("a product in the chat template is too large")
            elif isinstance(seq, str | list | tuple) and _is_int(count):
                times = max(count, 0)
                spend.check_size(len(seq) * times, "a repeated value", not isinstance(seq, str))
                if not isinstance(seq, str):
                    spend.check_size(limits.text_size(seq) * times, "a repeated value")
        elif operator == "**" and _is_int(left) and _is_int(right):
            if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > _MAX_POW_BITS:
                raise SecurityError("a power in the chat template is too large")
        elif operator == "+" and isinstance(left, str) and isinstance(right, str):
            spend.check_size(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,), "%")
        return limits.produced(self.binop_table[operator](left, right))

    def guarded_join(self, parts: Sequence[Any]) -> str:
        """``a ~ b``: measured, then built."""
        spend = limits.budget()
        spend.step(limits.OUTPUT_STEPS)
        spend.check_size(sum(limits.text_size(p) for p in parts), "a concatenation")
        return str(limits.produced("".join(str(p) for p in parts)))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = str(value.__self__)

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, [*args, *kwargs.values()], "{")
            return str(limits.produced(wrapped(*args, **kwargs)))

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        spend = limits.budget()
        if isinstance(__obj, _BUILTINS):
            spend.step(limits.CALL_STEPS)
            receiver = getattr(__obj, "__self__", None)
            if isinstance(receiver, str | list | tuple | dict):
                _check_int_args([*args, *kwargs.values()])
                if isinstance(receiver, str):
                    args = limits.check_method(receiver, __obj.__name__, args)
                elif __obj.__name__ in ("index", "count"):
                    spend.step(len(receiver))
            return limits.produced(super().call(__context, __obj, *args, **kwargs))
        spend.step(limits.MACRO_STEPS)
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's loop(children)
            args = (limits.tick_iter(args[0]), *args[1:])
        spend.enter("macro calls")
        try:
            return limits.produced(super().call(__context, __obj, *args, **kwargs))
        finally:
            spend.leave()


_ENV = _SandboxEnvironment()


def _template_error(exc: BaseException) -> TemplateError:
    if isinstance(exc, RenderLimitExceeded):
        return RenderLimitExceeded(f"chat template error: {exc.message}", exc.limit)
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
    """The compiled template for ``text`` (cached); ``TemplateError`` if it does not parse
    or is longer than :data:`MAX_TEMPLATE_CHARS`."""
    if len(text) > MAX_TEMPLATE_CHARS:
        limit = MAX_TEMPLATE_CHARS
        raise TemplateError(f"chat template has {len(text)} characters, over the limit of {limit}")
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
    budget: RenderBudget | None = None,
) -> str:
    """Render a Jinja chat template as HF's ``apply_chat_template`` does, inside the sandbox.

    ``messages`` and ``tools`` are HF-shaped dicts (see :func:`jinja_messages`); ``extra``
    adds variables (``enable_thinking``…). ``now`` fixes ``strftime_now`` (local time when
    None). ``budget`` bounds the render (a fresh default one when None). Raises
    ``TemplateError`` for every failure, the template's own ``raise_exception`` included,
    and its subclass ``RenderLimitExceeded`` when a bound is hit.
    """
    template = compile_chat_template(text)
    moment = now

    def strftime_now(fmt: str) -> str:
        _check_widths(str(fmt))
        limits.budget().check_size(len(str(fmt)) * 16, "a strftime format")
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
    with limits.rendering(budget or RenderBudget()) as spend:
        try:
            return _collect(template.generate(variables), spend)
        except Exception as exc:  # untrusted code: any failure is the template's
            raise _template_error(exc) from None


def _collect(chunks: Iterator[str], spend: RenderBudget) -> str:
    out: list[str] = []
    for chunk in chunks:
        spend.write(len(chunk))
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
def _system_role_probe(text: str) -> bool | RenderLimitExceeded:
    """minja's probe: does a system message's text reach the output at all? A template that
    exceeds a render bound on this two-message chat is remembered as such."""
    probe = [{"role": "system", "content": _SYSTEM_NEEDLE}, {"role": "user", "content": "Hey"}]
    try:
        out = render_chat_template(text, probe, add_generation_prompt=False)
    except RenderLimitExceeded as exc:
        return RenderLimitExceeded(exc.message, exc.limit)  # kept without its traceback
    except TemplateError:
        return False
    return _SYSTEM_NEEDLE in out


def _supports_system_role(text: str) -> bool:
    """The probe's answer; ``RenderLimitExceeded`` (kind ``"template"``) for a template that
    cannot even render two short messages within bounds: it is refused at once, every time,
    without another render, and without trying shorter conversations."""
    found = _system_role_probe(text)
    if isinstance(found, RenderLimitExceeded):
        raise RenderLimitExceeded(f"{found.message} (rendering a two-message chat)", "template")
    return found


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
