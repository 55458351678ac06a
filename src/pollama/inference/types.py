"""The protocol-neutral request and event types of the one inference path.

``/api/generate``, ``/api/chat``, the OpenAI and the Anthropic routes translate their wire
request into an :class:`InferenceRequest` and translate :class:`InferenceEvent` back.

An event carries the model's output already split (``inference.parsers``): ``text`` is the
answer's content, ``thinking`` its reasoning, ``tool_calls`` the calls completed in this
piece of the stream. Thinking never appears in ``text``. ``logprobs`` (when the request
asked) are the entries of the tokens the runner sent with this piece of the stream, whichever
of ``text``/``thinking``/``tool_calls`` their text went to (or none yet: a parser may hold
text back while its entries go out); every generated token's entry goes out once, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pollama.runner.base import Logprob

ToolChoice = Literal["auto", "none", "required"]


@dataclass
class InferenceRequest:
    model: str  # as the caller wrote it (errors quote it back)
    kind: Literal["chat", "generate"]
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    prompt: str = ""  # generate
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    format: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: Any = None
    truncate: bool = True
    # Context shift: a generation that fills the window drops its oldest half and goes on
    # (false: it ends with ``length`` there). ``runner/engine.py`` says when it cannot.
    shift: bool = True
    # "required" forces a call to one of ``tools`` (to ``tool_name`` alone when set);
    # "none" answers without tools.
    tool_choice: ToolChoice = "auto"
    tool_name: str | None = None
    # Anthropic's rule: ``think`` on a model that cannot think is dropped, not refused.
    relax_thinking: bool = False
    # Each generated token's log-probability, with ``top_logprobs`` alternatives (0-20).
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Metrics:
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    prompt_cached: int = 0


@dataclass
class Truncation:
    """How the conversation was shortened to fit (never silent)."""

    messages_dropped: int
    prompt_tokens: int
    num_ctx: int


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is the decoded JSON object, keys in the model's order."""

    id: str
    index: int
    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        """The arguments as a compact JSON string (OpenAI's ``arguments``)."""
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))

    def to_ollama(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "function": {"index": self.index, "name": self.name, "arguments": self.arguments},
        }

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json()},
        }


@dataclass
class InferenceEvent:
    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: bool = False
    done_reason: str = ""
    metrics: Metrics | None = None
    context: list[int] | None = None
    truncation: Truncation | None = None
    # The rendered prompt's token count, on the first event (before any metrics exist).
    prompt_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    # On the final event: the stop string that ended the response ("" for any other end).
    stop_sequence: str = ""
    # On the final event: how many tokens context shifts dropped from the window (0: none).
    context_shifted: int = 0
    # On the final event: tokens speculative decoding drafted, and how many it kept.
    draft_tokens: int = 0
    draft_accepted: int = 0
