"""The small interface through which the inference service and the scheduler report what
they do; ``pollama.server.metrics.PrometheusMetrics`` turns the reports into Prometheus metrics and
access-log fields.

It lives outside ``server`` so that ``inference`` and ``scheduler`` can take one without
importing the HTTP layer (dependencies point one way). :data:`NULL_TELEMETRY` does nothing,
so every caller can take ``telemetry: Telemetry = NULL_TELEMETRY`` and tests need not care.
Calls must be cheap and must never raise: they run on the event loop, once per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pollama.inference.types import InferenceEvent

__all__ = ["NULL_TELEMETRY", "Generation", "NullTelemetry", "Telemetry", "observe_events"]


class Generation(Protocol):
    """One generation (one request's stream of output), from request to last token."""

    def output(self, text: str) -> None:
        """A piece of output was produced (the first one stops the time-to-first-token
        clock; the gaps between pieces are the inter-token latency)."""

    def finished(
        self, *, prompt_tokens: int, cached_tokens: int, generated_tokens: int, reason: str
    ) -> None:
        """The generation ended normally (``reason``: ``stop``, ``length``…)."""

    def failed(self, error: BaseException | None) -> None:
        """The generation ended with an error, or was cancelled (``error`` None)."""


class Telemetry(Protocol):
    def generation(self, model: str, *, prompt: str | None = None) -> Generation:
        """Start timing a generation for ``model`` (a resolved, local model name).
        ``prompt`` is kept only where prompt logging is on."""

    def model_loaded(self, model: str, seconds: float) -> None:
        """A worker for ``model`` finished loading after ``seconds``."""

    def model_unloaded(self, model: str, reason: str) -> None:
        """A loaded model was unloaded: ``expired`` (keep-alive), ``evicted`` (room for
        another), ``requested`` (keep_alive 0 / stop), ``crashed``, ``reload`` or
        ``shutdown``."""

    def pull_bytes(self, n: int) -> None:
        """``n`` more bytes were downloaded from a registry."""


class _NullGeneration:
    def output(self, text: str) -> None:
        pass

    def finished(
        self, *, prompt_tokens: int, cached_tokens: int, generated_tokens: int, reason: str
    ) -> None:
        pass

    def failed(self, error: BaseException | None) -> None:
        pass


class NullTelemetry:
    """Reports nowhere."""

    _generation = _NullGeneration()

    def generation(self, model: str, *, prompt: str | None = None) -> Generation:
        return self._generation

    def model_loaded(self, model: str, seconds: float) -> None:
        pass

    def model_unloaded(self, model: str, reason: str) -> None:
        pass

    def pull_bytes(self, n: int) -> None:
        pass


NULL_TELEMETRY: Telemetry = NullTelemetry()


async def observe_events(
    telemetry: Telemetry,
    model: str,
    events: AsyncIterator[InferenceEvent],
    *,
    prompt: str | None = None,
) -> AsyncIterator[InferenceEvent]:
    """Pass ``events`` through unchanged, reporting each to ``telemetry``.

    Wrap the one inference stream with it (``InferenceService.stream``), so every protocol
    front-end is measured the same way. Closing the wrapper closes ``events``.
    """
    gen = telemetry.generation(model, prompt=prompt)
    ended = False
    try:
        async for event in events:
            if event.text:
                gen.output(event.text)
            if event.done:
                m = event.metrics
                gen.finished(
                    prompt_tokens=m.prompt_eval_count if m else 0,
                    cached_tokens=m.prompt_cached if m else 0,
                    generated_tokens=m.eval_count if m else 0,
                    reason=event.done_reason or "stop",
                )
                ended = True
            yield event
    except BaseException as exc:
        if not ended:
            ended = True
            gen.failed(None if isinstance(exc, GeneratorExit) else exc)
        raise
    finally:
        if not ended:
            gen.failed(None)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
