"""One response's generation: a free phase, then, when needed, a constrained phase.

A response is generated in one phase unless ``format`` must hold over a thinking model's
answer (``OutputPlan.two_phase``, the service's module docstring). Then the first phase is
free: the reasoning streams as it comes, and when the answer begins (or the model stops
after thinking, so the answer must still come) the phase ends and hands over. The second
phase starts again under the constraint, its prompt the first one plus the raw text the
model wrote through its closing tag. :func:`run_phase` runs either phase and records how it
ended on its :class:`Phase`; :func:`final_event` builds the event that ends the response.

What must stay true:

* the first event of the response carries the prompt's token count, later ones 0;
* the chunk that starts a two-phase answer streams its thinking but neither its content nor
  its logprobs: the answer is generated again under the constraint;
* the free phase's tokens count in the final ``eval_count`` and in ``num_predict`` (a budget
  spent on thinking ends the response with ``length`` and no answer);
* every phase's runner completion is closed before its phase returns, however it ends (the
  client went away, the phase handed over), so the worker stops generating it at once;
* the free phase of a two-phase answer never shifts its context: what it wrote becomes the
  constrained phase's prompt, which must fit the window. A response's final event says how
  many tokens context shifts dropped (``context_shifted``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pollama.inference.parsers import OutputParser, Parsed
from pollama.inference.types import InferenceEvent, Metrics, Truncation
from pollama.runner.base import (
    CompletionChunk,
    CompletionRequest,
    Logprob,
    Runner,
    SamplingOptions,
)

__all__ = ["GenerationRun", "OutputPlan", "Phase", "final_event", "generate", "run_phase"]


@dataclass(frozen=True)
class OutputPlan:
    """How a response's output is parsed and constrained (``InferenceService._output_plan``).

    ``format`` is what constrains the answer (the request's, or a forced tool call's schema);
    ``prefill`` is appended to the prompt (a forced tool call's opening tag)."""

    parser: OutputParser
    format: str | dict[str, Any] | None
    two_phase: bool
    prefill: str


@dataclass
class GenerationRun:
    """What every phase of one response reads, and the prompt-token count that the
    response's first event carries (then 0)."""

    runner: Runner
    plan: OutputPlan
    options: dict[str, Any]  # the merged options, stop words included
    return_tokens: bool  # the final event carries ``context`` (generate, not raw)
    logprobs: bool
    top_logprobs: int  # 0 unless ``logprobs``
    started: int  # ``time.monotonic_ns()`` when the request began
    load_duration: int
    truncation: Truncation | None
    prompt_tokens: int
    media: tuple[bytes, ...] = ()  # the files of the prompt's ``[img-N]`` references
    shift: bool = True  # the request's ``shift`` (context shift when the window is full)

    @property
    def num_predict(self) -> int:
        """The response's token budget over all its phases; -1 for none."""
        return int(self.options.get("num_predict") or -1)

    def event(self, parsed: Parsed, logprobs: list[Logprob] | None = None) -> InferenceEvent:
        """An event of the response; the first one carries the prompt's token count."""
        event = _event(parsed, self.prompt_tokens, logprobs)
        self.prompt_tokens = 0
        return event


@dataclass
class Phase:
    """One pass of generation. Given: its prompt, whether ``format`` constrains it, and the
    tokens an earlier phase spent. Recorded by :func:`run_phase`: the tokens it generated
    (counted in a free phase only), whether the answer must go on constrained, and the raw
    text the model wrote."""

    prompt: str
    constrained: bool
    earlier: int = 0
    tokens: int = 0
    go_on: bool = False
    raw: list[str] = field(default_factory=list)


async def generate(g: GenerationRun, prompt: str) -> AsyncIterator[InferenceEvent]:
    """The response's events: its first phase, then the constrained one if it handed over."""
    phase: Phase | None = Phase(prompt, constrained=not g.plan.two_phase)
    while phase is not None:
        async with aclosing(run_phase(g, phase)) as events:
            async for event in events:
                yield event
        if not phase.go_on:  # only a free phase hands over
            return
        if 0 < g.num_predict <= phase.tokens:
            # The budget went on thinking; finish with what the first phase had.
            yield _budget_spent(g, phase.tokens)
            return
        phase = _constrained_after(g, phase)


def _constrained_after(g: GenerationRun, free: Phase) -> Phase:
    """The phase that answers under the constraint after a free one: its prompt is the free
    phase's plus what the model wrote through its closing tag."""
    parser = g.plan.parser
    closing = parser.thinking.closing if parser.thinking else ""
    parser.reset_tools()
    prompt = free.prompt + _through_closing("".join(free.raw), closing)
    return Phase(prompt, constrained=True, earlier=free.tokens)


async def run_phase(g: GenerationRun, phase: Phase) -> AsyncIterator[InferenceEvent]:
    """Stream one phase's events; ``phase`` records how it ended (see :class:`Phase`).

    It ends with the response's final event, or without one when it hands over
    (``phase.go_on``)."""
    async with aclosing(g.runner.completion(_completion(g, phase))) as chunks:
        async for chunk in chunks:
            read = _read(g.plan.parser, phase, chunk)
            if read is None:
                continue
            parsed, logprobs = read
            if chunk.done and not phase.go_on:
                yield final_event(g, parsed, logprobs, chunk, phase.earlier)
                continue
            if parsed or logprobs:
                yield g.event(parsed, logprobs)
            if phase.go_on:
                return


def _completion(g: GenerationRun, phase: Phase) -> CompletionRequest:
    """The runner request of one phase: its budget is what the earlier phase left."""
    sampling = dict(g.options)
    if g.num_predict > 0:
        sampling["num_predict"] = g.num_predict - phase.earlier
    return CompletionRequest(
        prompt=phase.prompt,
        options=SamplingOptions.from_options(sampling),
        return_tokens=g.return_tokens,
        format=g.plan.format if phase.constrained else None,
        logprobs=g.logprobs,
        top_logprobs=g.top_logprobs,
        media=g.media,
        shift=g.shift and phase.constrained,  # never in a two-phase answer's free phase
    )


def _read(
    parser: OutputParser, phase: Phase, chunk: CompletionChunk
) -> tuple[Parsed, list[Logprob]] | None:
    """A chunk's parsed output and logprobs (None: nothing to send, the chunk is not the
    last). In a free phase it also counts the chunk's token, keeps its raw text and decides
    whether the answer goes on constrained."""
    parsed = Parsed()
    logprobs = chunk.logprobs or []
    if chunk.text:
        parsed = parser.add(chunk.text)
        if not phase.constrained:
            phase.raw.append(chunk.text)
            phase.tokens += 0 if chunk.done else 1
            if parsed.content and parser.thinking_done:
                # The answer begins: restart it under the constraint.
                parsed.content, phase.go_on, logprobs = "", True, []
    elif not chunk.done and not logprobs:
        return None
    if (
        chunk.done
        and not phase.constrained
        and parser.thinking_done
        and chunk.done_reason == "stop"
    ):
        # It thought, then stopped: the answer must still come.
        phase.tokens, phase.go_on = chunk.eval_count, True
    return parsed, logprobs


def final_event(
    g: GenerationRun,
    parsed: Parsed,
    logprobs: list[Logprob],
    chunk: CompletionChunk,
    earlier: int,
) -> InferenceEvent:
    """The event that ends the response: what the parsers still held, the done reason, the
    stop string, the metrics (``earlier``: tokens of a free phase, counted in
    ``eval_count``), the context, the truncation and the tokens context shifts dropped."""
    parsed.extend(g.plan.parser.finish())
    event = g.event(parsed, logprobs)
    event.done = True
    event.done_reason = chunk.done_reason
    event.stop_sequence = chunk.stop_sequence
    event.context_shifted = chunk.context_shifted
    event.draft_tokens, event.draft_accepted = chunk.draft_tokens, chunk.draft_accepted
    event.metrics = Metrics(
        total_duration=time.monotonic_ns() - g.started,
        load_duration=g.load_duration,
        prompt_eval_count=chunk.prompt_eval_count,
        prompt_eval_duration=chunk.prompt_eval_duration_ns,
        eval_count=chunk.eval_count + earlier,
        eval_duration=chunk.eval_duration_ns,
        prompt_cached=chunk.prompt_cached,
    )
    event.context = chunk.tokens
    event.truncation = g.truncation
    return event


def _budget_spent(g: GenerationRun, tokens: int) -> InferenceEvent:
    """The final event of a response whose budget a free phase spent: ``length``, no answer."""
    event = _event(g.plan.parser.finish(), 0)
    event.text = ""  # the unconstrained answer was never shown
    event.done, event.done_reason = True, "length"
    event.metrics = Metrics(
        total_duration=time.monotonic_ns() - g.started,
        load_duration=g.load_duration,
        eval_count=tokens,
    )
    return event


def _event(
    parsed: Parsed, prompt_tokens: int, logprobs: list[Logprob] | None = None
) -> InferenceEvent:
    return InferenceEvent(
        text=parsed.content,
        thinking=parsed.thinking,
        tool_calls=parsed.tool_calls,
        prompt_tokens=prompt_tokens,
        logprobs=list(logprobs or ()),
    )


def _through_closing(raw: str, closing: str) -> str:
    """The first phase's text up to and including the closing tag and the blank after it.

    Empty when the model never closed a thought (it answered at once): the constrained phase
    then starts from the original prompt.
    """
    if not closing:
        return ""
    end = raw.find(closing)
    if end == -1:
        return ""
    end += len(closing)
    while end < len(raw) and raw[end].isspace():
        end += 1
    return raw[:end]
