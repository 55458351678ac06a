"""From a request to the prompt text the model sees: Ollama's ``chatPrompt`` and generate rules.

Protocol-neutral: the routes translate their wire request into plain message dicts (Ollama's
``api.Message`` shape) and call :func:`build_chat_prompt` or :func:`build_generate_prompt`.

Which template renders (docs/ollama-behaviour.md#which-template-renders,
:func:`prompt_template_for`): a request ``template`` override; else the model's Go ``TEMPLATE``
layer unless ``OLLAMA_GO_TEMPLATE`` is false or, with that variable unset, the GGUF Jinja
template grants more (``prefer_jinja_template``); else the GGUF ``tokenizer.chat_template``
rendered in the sandbox (what Ollama's llama-server ``--jinja`` path does); else ``{{ .Prompt
}}``.

Truncation keeps Ollama's rule (``server/prompt.go``): drop the oldest messages one at a
time, always keeping every system message and the last message, until the rendered prompt
(plus ``image_tokens`` per image) fits ``num_ctx``. Unlike Ollama, nothing is silent: the
result says how many messages were dropped, and a prompt that cannot fit even at its minimum
raises ``ContextOverflow`` naming both token counts instead of being cut by the runner.
Since dropping more never makes a prompt longer, the number to drop is found by binary
search (:func:`_fit`): O(log n) renders and counts instead of one per message, and the
prompt returned is always one that was rendered and counted whole.

Rendering never runs on the event loop: templates are untrusted code, so every render goes
to a small pool of :data:`RENDER_THREADS` threads owned by this module, and is bounded by
the template engines' ``RenderBudget`` (steps, sizes), which is what makes it end soon: a
thread cannot be stopped. Every await (a render, a token count) is a cancellation point, so
a request whose client left stops between renders, and a render still queued never runs.

Images become ``[img-N]`` markers in their message's content (N counts the images sent, from
0): a literal ``[img]`` is replaced, otherwise the marker is prefixed (``imageTaggedMessages``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pollama.errors import CapabilityMissing, ContextOverflow, InvalidRequest
from pollama.gguf import FillInMiddleTokens, GGUFInfo
from pollama.store.models import LocalModel
from pollama.template import (
    DEFAULT_TEMPLATE,
    NamedTemplate,
    RenderLimitExceeded,
    Template,
    jinja_capabilities,
    named_template,
    named_templates,
    prefer_jinja_template,
    render_prompt,
    template_capabilities,
)
from pollama.template.jinja import JinjaChatTemplate

__all__ = [
    "RENDER_THREADS",
    "PromptResult",
    "PromptTemplate",
    "TokenCounter",
    "build_chat_prompt",
    "build_generate_prompt",
    "context_overflow",
    "default_stop_words",
    "prompt_template_for",
    "tag_images",
]

TokenCounter = Callable[[str], Awaitable[int]]
"""Counts the tokens the model's tokenizer makes of a prompt (special tokens parsed). A count
over ``num_ctx`` may be a lower bound; only a count within it must be exact."""

RENDER_THREADS = 2
"""Templates rendered at once, in threads owned by this module. Renders hold the interpreter
lock, so more threads would not render faster; two let a short render pass a long one, and
any number of hostile requests wait for these two instead of taking the server's threads."""

_T = TypeVar("_T")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _render_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="pollama-render")
        return _pool


async def _off_loop(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` in the render pool (see the module docstring). Cancelling the
    caller drops a call still queued; one already running ends within its render budget."""
    call = functools.partial(fn, *args, **kwargs)
    return await asyncio.wrap_future(_render_pool().submit(call))


@functools.cache
def _named_by_text() -> dict[str, NamedTemplate]:
    found: dict[str, NamedTemplate] = {}
    for name in named_templates():
        named = named_template(name)
        if named is not None:
            found.setdefault(named.template.strip(), named)
    return found


@functools.lru_cache(maxsize=64)
def _go_template(text: str) -> PromptTemplate:
    """Parsed Go templates, by text: every request of a model renders with the same one."""
    return PromptTemplate(go=Template.parse(text), named=_named_by_text().get(text.strip()))


@dataclass(frozen=True)
class PromptTemplate:
    """The template one request renders with: a Go template or a GGUF Jinja chat template.

    Exactly one of ``go`` and ``jinja`` is set. ``named`` is the built-in template whose text
    the Go template is (its stop words are the defaults), when it is one. ``fim`` is the
    model's fill-in-the-middle tokens, when its vocabulary has them: they grant ``insert``
    to a template that cannot place a suffix itself (:func:`_fill_in_middle`).
    """

    go: Template | None = None
    jinja: JinjaChatTemplate | None = None
    named: NamedTemplate | None = None
    fim: FillInMiddleTokens | None = None

    @classmethod
    def from_go(cls, text: str) -> PromptTemplate:
        """Parse a Go template (``TemplateError`` if it does not parse)."""
        return _go_template(text)

    @classmethod
    def from_jinja(cls, jinja: JinjaChatTemplate) -> PromptTemplate:
        return cls(jinja=jinja)

    @classmethod
    def default(cls) -> PromptTemplate:
        """``{{ .Prompt }}``: the prompt passes through verbatim."""
        return cls.from_go(DEFAULT_TEMPLATE)

    @property
    def kind(self) -> str:
        """``"go"`` or ``"jinja"``."""
        return "jinja" if self.jinja is not None else "go"

    @property
    def text(self) -> str:
        """The template source (what ``/api/show`` reports as ``template``)."""
        if self.jinja is not None:
            return self.jinja.text
        return self.go.text if self.go is not None else DEFAULT_TEMPLATE

    def capabilities(self) -> set[str]:
        """``tools``/``insert``/``thinking`` as this template (or, for ``insert``, the
        vocabulary's fill-in-the-middle tokens) grants them
        (docs/ollama-behaviour.md#capabilities)."""
        caps = self.own_capabilities()
        return caps | {"insert"} if self.fim is not None else caps

    def own_capabilities(self) -> set[str]:
        """What the template text alone grants."""
        if self.jinja is not None:
            return jinja_capabilities(self.jinja.text)
        return template_capabilities(self._go())

    def _go(self) -> Template:
        return self.go if self.go is not None else Template.parse(DEFAULT_TEMPLATE)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
    ) -> str:
        """Render a conversation ending where the model answers (``TemplateError`` on failure)."""
        if self.jinja is not None:
            return self.jinja.render(messages, tools=tools, think=think)
        return render_prompt(self._go(), messages=messages, tools=tools, think=think)

    def render_fill_in_middle(
        self, prompt: str, suffix: str, *, think: bool | str | None = None
    ) -> str:
        """Execute the Go template with ``.Prompt`` and ``.Suffix`` only."""
        return render_prompt(self._go(), prompt=prompt, suffix=suffix, think=think)

    def with_fim(self, fim: FillInMiddleTokens | None) -> PromptTemplate:
        """This template with the model's fill-in-the-middle tokens attached."""
        return self if fim is None else replace(self, fim=fim)


def prompt_template_for(
    model: LocalModel | None,
    info: GGUFInfo | None,
    *,
    go_template_enabled: bool = True,
    go_template_explicit: bool = False,
    override: str | None = None,
) -> PromptTemplate:
    """The template a request for ``model`` renders with
    (docs/ollama-behaviour.md#which-template-renders).

    ``go_template_enabled`` is ``OLLAMA_GO_TEMPLATE`` (default true); ``go_template_explicit``
    says the variable is set at all, which turns off the "prefer the richer Jinja template"
    rule. ``override`` is a request's ``template`` (always a Go template). With Go templates
    disabled and no GGUF chat template, the model's Go template is still used (Ollama's
    llama-server would fall back to its own built-in format).
    """
    fim = info.fim_tokens if info is not None else None
    if override:
        return PromptTemplate.from_go(override).with_fim(fim)
    go_text = model.template() if model is not None else None
    chat_text = info.chat_template if info is not None else None
    go = PromptTemplate.from_go(go_text) if go_text else None
    jinja = (
        PromptTemplate.from_jinja(JinjaChatTemplate.from_gguf(info.kv, chat_text))
        if info is not None and chat_text
        else None
    )
    if go is not None and go_template_enabled:
        prefer = (
            jinja is not None
            and not go_template_explicit
            and prefer_jinja_template(jinja.text, jinja.capabilities(), go.go, go.capabilities())
        )
        if not prefer:
            return go.with_fim(fim)
    if jinja is not None:
        return jinja.with_fim(fim)
    return (go if go is not None else PromptTemplate.default()).with_fim(fim)


def default_stop_words(params: Mapping[str, Any], template: PromptTemplate | None) -> list[str]:
    """Stop strings for a request whose options and Modelfile set no ``stop``.

    The model's ``stop`` parameter wins; else a built-in Go template's stop list (chatml:
    ``<|im_start|>``, ``<|im_end|>``); else, for a Jinja template, the texts of the GGUF's
    end-of-generation tokens. llama.cpp stops at those tokens by itself, so this matters most
    for Go templates whose model emits the end marker as text.
    """
    stop = params.get("stop")
    if isinstance(stop, str) and stop:
        return [stop]
    if isinstance(stop, list | tuple) and stop:
        return [str(s) for s in stop]
    if template is None:
        return []
    if template.jinja is not None:
        return list(template.jinja.end_tokens)
    if template.named is not None and template.named.stop:
        return list(template.named.stop)
    return []


@dataclass(frozen=True)
class PromptResult:
    """The rendered prompt and what was done to fit it."""

    prompt: str
    truncated: bool
    messages_dropped: int
    """Non-system messages left out, oldest first."""
    prompt_tokens: int
    """Tokens of ``prompt`` as counted (plus ``image_tokens`` per image)."""
    images: list[Any] = field(default_factory=list)
    """The images sent with the prompt, in ``[img-N]`` order."""


def _role(msg: Mapping[str, Any]) -> str:
    return str(msg.get("role") or "").lower()


def tag_images(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Ollama's ``imageTaggedMessages``: ``[img-N]`` markers in content, images in order."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for msg in messages:
        item = dict(msg)
        content = str(item.get("content") or "")
        prefix = ""
        for image in item.get("images") or []:
            tag = f"[img-{len(images)}]"
            images.append(image)
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        item["content"] = prefix + content
        out.append(item)
    return out, images


_PROMPT_ADVICE = "shorten the prompt or increase num_ctx"


def context_overflow(
    tokens: int, num_ctx: int, advice: str = _PROMPT_ADVICE, *, at_least: bool = False
) -> ContextOverflow:
    """The error of a prompt that cannot fit, naming both counts (``at_least``: ``tokens``
    is a floor, the prompt was never tokenized)."""
    count = f"at least {tokens}" if at_least else str(tokens)
    return ContextOverflow(
        f"prompt has {count} tokens but the context window (num_ctx) is {num_ctx} tokens; "
        + advice
    )


# Render bounds that grow with the messages rendered: a conversation that exceeds one is
# too long, like one over num_ctx, and loses older messages; other failures are the
# template's.
_TOO_LONG = frozenset({"steps", "output", "built"})


@dataclass(frozen=True)
class _Attempt:
    """One candidate prompt: ``result`` when it fits, else what stopped it."""

    result: PromptResult | None
    tokens: int = 0
    error: RenderLimitExceeded | None = None


async def _attempt(
    template: PromptTemplate,
    msgs: list[dict[str, Any]],
    start: int,
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    think: bool | str | None,
    num_ctx: int,
    count_tokens: TokenCounter,
    prefix: str,
    image_tokens: int,
) -> _Attempt:
    """Render and count the prompt that keeps every system message before ``start`` and all
    messages from ``start`` on."""
    kept_system = [m for m in msgs[:start] if _role(m) == "system"]
    tagged, images = tag_images(msgs[start:])
    try:
        text = await _off_loop(template.render, kept_system + tagged, tools=tools, think=think)
    except RenderLimitExceeded as exc:
        if exc.limit not in _TOO_LONG:
            raise
        return _Attempt(None, error=exc)
    prompt = prefix + text
    tokens = await count_tokens(prompt) + image_tokens * len(images)
    if tokens > num_ctx:
        return _Attempt(None, tokens)
    dropped = start - len(kept_system)
    return _Attempt(PromptResult(prompt, dropped > 0, dropped, tokens, images), tokens)


def _starts(msgs: list[dict[str, Any]], truncate: bool) -> list[int]:
    """Where a kept conversation may start, fewest messages dropped first. Starting just
    after a system message renders the same list as starting on it, so those are left out."""
    last = len(msgs) - 1
    starts = [i for i in range(last + 1) if i == 0 or _role(msgs[i - 1]) != "system"]
    return starts if truncate and starts else [0]


async def _fit(
    template: PromptTemplate,
    msgs: list[dict[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    think: bool | str | None,
    num_ctx: int,
    count_tokens: TokenCounter,
    truncate: bool,
    prefix: str = "",
    image_tokens: int = 0,
    advice: str | None = None,
) -> PromptResult:
    """``chatPrompt``: the prompt with the fewest oldest non-system messages dropped that fits.

    The same answer as trying every start in order (Ollama's loop), found by binary search:
    fitting is monotone in the number dropped. The whole conversation is tried first (the
    common case, one render), then the shortest one (if even that does not fit, the error
    comes at once), then the middle of what is left, each a real render and count.
    """
    starts = _starts(msgs, truncate)

    async def attempt(index: int) -> _Attempt:
        return await _attempt(
            template, msgs, starts[index], tools=tools, think=think, num_ctx=num_ctx,
            count_tokens=count_tokens, prefix=prefix, image_tokens=image_tokens,
        )  # fmt: skip

    tried = await attempt(0)
    if tried.result is not None:
        return tried.result
    if len(starts) > 1:
        tried = await attempt(len(starts) - 1)
    if tried.result is None:
        if tried.error is not None:
            raise tried.error
        raise context_overflow(tried.tokens, num_ctx, advice or _advice(truncate, len(msgs)))
    best, fits, fails = tried.result, len(starts) - 1, 0
    while fits - fails > 1:  # starts[fails] does not fit, starts[fits] does
        middle = (fails + fits) // 2
        tried = await attempt(middle)
        if tried.result is None:
            fails = middle
        else:
            best, fits = tried.result, middle
    return best


def _advice(truncate: bool, count: int) -> str:
    if truncate and count > 1:
        return (
            "the last message does not fit even with all older messages dropped; "
            "shorten it or increase num_ctx"
        )
    return "shorten the messages or increase num_ctx"


async def build_chat_prompt(
    template: PromptTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    system_default: str | None,
    model_messages: Sequence[Mapping[str, Any]] = (),
    tools: Sequence[Mapping[str, Any]] | None = None,
    think: bool | str | None = None,
    num_ctx: int,
    count_tokens: TokenCounter,
    truncate: bool = True,
    image_tokens: int = 0,
) -> PromptResult:
    """The prompt for a chat request (``/api/chat`` and the ``/v1`` chat routes).

    ``msgs = model_messages + messages``, with the model's SYSTEM (``system_default``) first
    when the request's first message is not a system message. ``image_tokens`` is what one
    image costs in the window (Ollama counts 768 for projector models, 0 otherwise).
    Raises ``ContextOverflow`` when even system messages plus the last message do not fit,
    or when ``truncate`` is false and the whole conversation does not.
    """
    msgs = [dict(m) for m in (*model_messages, *messages)]
    if messages and _role(messages[0]) != "system" and system_default:
        msgs.insert(0, {"role": "system", "content": system_default})
    return await _fit(
        template,
        msgs,
        tools=tools,
        think=think,
        num_ctx=num_ctx,
        count_tokens=count_tokens,
        truncate=truncate,
        image_tokens=image_tokens,
    )


async def _single(
    prompt: str, images: list[Any], num_ctx: int, count: TokenCounter, image_tokens: int
) -> PromptResult:
    tokens = await count(prompt) + image_tokens * len(images)
    if tokens > num_ctx:
        raise context_overflow(tokens, num_ctx, _PROMPT_ADVICE)
    return PromptResult(prompt, False, 0, tokens, images)


def check_raw_mode(raw: bool, *, template: str | None, system: str | None, context: bool) -> None:
    """Raw mode sends the prompt verbatim, so it cannot combine with anything templated."""
    if raw and (template or system or context):
        raise InvalidRequest("raw mode does not support template, system, or context")


async def build_generate_prompt(
    template: PromptTemplate,
    *,
    prompt: str,
    system: str | None = None,
    system_default: str | None = None,
    model_messages: Sequence[Mapping[str, Any]] = (),
    suffix: str | None = None,
    raw: bool = False,
    context_text: str | None = None,
    template_override: str | None = None,
    images: Sequence[Any] | None = None,
    think: bool | str | None = None,
    num_ctx: int,
    count_tokens: TokenCounter,
    truncate: bool = True,
    model_name: str = "",
    image_tokens: int = 0,
) -> PromptResult:
    """The prompt for ``/api/generate`` (and ``/v1/completions``),
    docs/ollama-behaviour.md#generate-prompts.

    * ``raw``: ``prompt`` verbatim; combined with ``template_override``, ``system`` or a
      context it is ``InvalidRequest("raw mode does not support template, system, or
      context")``.
    * ``suffix``: fill-in-the-middle (:func:`_fill_in_middle`; ``template`` must reference
      ``.Suffix`` or the model's vocabulary have fill-in-the-middle tokens, else
      ``CapabilityMissing("<model_name> does not support insert")``).
    * otherwise ``[system or system_default] + model_messages (only without a context) +
      user prompt`` is rendered directly by the override, or like a chat (with truncation of
      the Modelfile MESSAGEs) by ``template``.

    ``context_text`` is the detokenized ``context`` of an earlier response, prepended to the
    rendered prompt; None means the request has no context (an empty ``context`` list
    should be passed as None). A prompt that cannot fit raises ``ContextOverflow``.
    """
    images = list(images or [])
    if raw:
        check_raw_mode(
            raw, template=template_override, system=system, context=context_text is not None
        )
        return await _single(prompt, images, num_ctx, count_tokens, image_tokens)
    prefix = context_text or ""
    direct = None
    if template_override:  # parsed off the loop too: it is the request's, of any length
        direct = await _off_loop(PromptTemplate.from_go, template_override)
    if suffix:
        text = await _fill_in_middle(template, direct, prompt, suffix, think, model_name)
        return await _single(prefix + text, images, num_ctx, count_tokens, image_tokens)
    # A context already holds the Modelfile MESSAGEs of the response it continues.
    earlier = model_messages if context_text is None else ()
    msgs = _generate_messages(prompt, system or system_default, earlier, images)
    if direct is not None:
        tagged, sent = tag_images(msgs)
        text = await _off_loop(direct.render, tagged, think=think)
        return await _single(prefix + text, sent, num_ctx, count_tokens, image_tokens)
    return await _fit(
        template, msgs, tools=[], think=think, num_ctx=num_ctx, count_tokens=count_tokens,
        truncate=truncate, prefix=prefix, image_tokens=image_tokens, advice=_PROMPT_ADVICE,
    )  # fmt: skip


async def _fill_in_middle(
    template: PromptTemplate,
    direct: PromptTemplate | None,
    prompt: str,
    suffix: str,
    think: bool | str | None,
    model_name: str,
) -> str:
    """A ``suffix`` request's text: the override if given, else the model's template, run
    with ``.Prompt`` and ``.Suffix`` only. Whether the model can insert at all is the model
    template's to say (it references ``.Suffix``), whatever the override.

    A template that cannot place a suffix, of a model whose vocabulary has
    fill-in-the-middle tokens, gives llama-server's ``/infill`` prompt instead
    (``format_prompt_infill``, prefix-suffix-middle order): the tokens' own texts, which the
    worker tokenizes back to those special tokens.
    """
    if "insert" not in template.capabilities():
        raise CapabilityMissing(f"{model_name} does not support insert")
    fim = template.fim
    if direct is None and fim is not None and "insert" not in template.own_capabilities():
        return f"{fim.prefix}{prompt}{fim.suffix}{suffix}{fim.middle}"
    fill = (direct or template).render_fill_in_middle
    return await _off_loop(fill, prompt, suffix, think=think)


def _generate_messages(
    prompt: str,
    system: str | None,
    model_messages: Sequence[Mapping[str, Any]],
    images: list[Any],
) -> list[dict[str, Any]]:
    """A generate request as a conversation: the system message, the Modelfile MESSAGEs,
    then the prompt as the user's message with its images."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.extend(dict(m) for m in model_messages)
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        user["images"] = images
    msgs.append(user)
    return msgs
