"""The protocol-neutral request and event types of the one inference path.

``/api/generate``, ``/api/chat`` (and later the OpenAI and Anthropic routes) translate their
wire request into an :class:`InferenceRequest` and translate :class:`InferenceEvent` back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
class InferenceEvent:
    text: str = ""
    done: bool = False
    done_reason: str = ""
    metrics: Metrics | None = None
    context: list[int] | None = None
    truncation: Truncation | None = None
