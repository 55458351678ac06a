"""What one template render may spend, shared by the Go executor and the Jinja sandbox.

A template is untrusted code: a request's ``template`` override, a Modelfile ``TEMPLATE``,
a GGUF's ``tokenizer.chat_template``. A render runs in a thread that nothing can stop (see
``inference/prompt.py``), so the bounds below are what guarantee that it ends quickly and
small, whatever the template does. Each render gets one :class:`RenderBudget`:

* **steps** (:data:`MAX_RENDER_STEPS`): a step is about 0.1 µs of interpreter time. Each
  engine charges what it executes in steps (a node, a loop iteration, an attribute lookup,
  a function, filter or macro call each cost what they take, measured), and bulk work on
  long strings costs one step per :data:`CHARS_PER_STEP` characters, so the whole budget
  is spent in about a second. Fan-out (a macro calling itself twice, thirty deep), loops
  that print nothing and nested loops all run out here.
* **one value** (:data:`MAX_VALUE_CHARS`, :data:`MAX_VALUE_ITEMS`): no string or list a
  template builds may be longer; operations that multiply a length (``*``, ``replace``,
  ``join``, widths) are checked *before* they run, so the long value is never built.
* **characters built** (:data:`MAX_BUILT_CHARS`): the sum of the lengths of every string
  the template builds, which bounds the memory a render can hold at once.
* **output** (:data:`MAX_RENDER_OUTPUT`): the rendered prompt itself.
* **nesting** (:data:`MAX_CALL_DEPTH`): macro calls inside each other.

Exceeding any of them raises :class:`RenderLimitExceeded`, a ``TemplateError`` (a 400 that
names the limit). Real chat templates, with a thousand messages and fifty tools, use a
small fraction of every bound (most under 5% of the steps).
"""

from __future__ import annotations

from ..errors import TemplateError

__all__ = [
    "CHARS_PER_STEP",
    "MAX_BUILT_CHARS",
    "MAX_CALL_DEPTH",
    "MAX_RENDER_OUTPUT",
    "MAX_RENDER_STEPS",
    "MAX_VALUE_CHARS",
    "MAX_VALUE_ITEMS",
    "RenderBudget",
    "RenderLimitExceeded",
]

MAX_RENDER_STEPS = 10_000_000
"""Steps one render may take (about a second of work). The real chat templates of large
models (Llama 3.x, Qwen 3, Mistral, DeepSeek, gpt-oss) render a thousand-message chat with
fifty tools in well under a third of it; only templates that rescan the whole chat for
every message (quadratic) come near it, at about a thousand messages."""

MAX_RENDER_OUTPUT = 16 * 1024 * 1024
"""Characters a rendered prompt may have: several times the longest prompt any context
window takes (1M tokens of about 4 characters), so only a runaway template reaches it."""

MAX_VALUE_CHARS = MAX_RENDER_OUTPUT
"""The longest string any one expression may build: a value longer than the whole prompt
may be cannot be needed to produce it."""

MAX_VALUE_ITEMS = 1_000_000
"""The most items one list may have (the messages of a request, times a few, fit)."""

MAX_BUILT_CHARS = 16 * MAX_RENDER_OUTPUT
"""Characters all the strings of one render may add up to: room for templates that build
the prompt by concatenation, message after message, while bounding what a render can hold
in memory at once (256M characters)."""

CHARS_PER_STEP = 128
"""Characters of bulk string work (copying, scanning, escaping in C) that cost one step."""

MAX_CALL_DEPTH = 64
"""Jinja macro calls nested inside each other (Go's ``{{template}}`` calls stop at the
executor's ``MAX_TEMPLATE_DEPTH``). Templates that recurse over JSON schemas go a few
levels deep; Python's own stack would end far deeper ones with a less helpful error."""


class RenderLimitExceeded(TemplateError):
    """A template render hit one of the bounds of this module; ``limit`` names which:
    ``"steps"``, ``"value"``, ``"built"``, ``"output"`` or ``"depth"``, or ``"template"``
    when a template exceeds one on a trivial input (it is at fault, not the conversation)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class RenderBudget:
    """The bounds of one render (or of several executions that make one prompt), spent as
    the template runs. Not thread-safe: one render, one thread."""

    __slots__ = ("max_steps", "max_output", "max_value", "steps", "built", "output", "depth")

    def __init__(
        self, *, max_steps: int = MAX_RENDER_STEPS, max_output: int = MAX_RENDER_OUTPUT
    ) -> None:
        self.max_steps = max_steps
        self.max_output = max_output
        self.max_value = min(MAX_VALUE_CHARS, max_output)
        self.steps = 0
        self.built = 0
        self.output = 0
        self.depth = 0

    def step(self, n: int = 1) -> None:
        """Spend ``n`` steps."""
        self.steps += n
        if self.steps > self.max_steps:
            raise RenderLimitExceeded(
                f"template execution exceeded {self.max_steps} steps "
                "(it loops or recurses too much)",
                "steps",
            )

    def bulk(self, chars: int) -> None:
        """Spend the steps of C-level work over ``chars`` characters."""
        if chars >= CHARS_PER_STEP:
            self.step(chars // CHARS_PER_STEP)

    def check_size(self, size: int, what: str = "a value", items: bool = False) -> None:
        """Refuse, before building it, a value of ``size`` characters (or list items)."""
        limit = MAX_VALUE_ITEMS if items else self.max_value
        if size > limit:
            unit = "items" if items else "characters"
            raise RenderLimitExceeded(
                f"{what} exceeds {limit} {unit} (the limit for one value)", "value"
            )

    def build(self, size: int, what: str = "a value", items: bool = False) -> None:
        """Account for a new string of ``size`` characters (or a list of ``size`` items)."""
        if size > (MAX_VALUE_ITEMS if items else self.max_value):
            self.check_size(size, what, items)
        self.built += size
        if self.built > MAX_BUILT_CHARS:
            raise RenderLimitExceeded(
                f"the template builds more than {MAX_BUILT_CHARS} characters of strings",
                "built",
            )
        if size >= CHARS_PER_STEP:
            self.step(size // CHARS_PER_STEP)

    def write(self, size: int) -> None:
        """Account for ``size`` characters of output."""
        self.output += size
        if self.output > self.max_output:
            raise RenderLimitExceeded(
                f"the rendered prompt exceeds {self.max_output} characters", "output"
            )
        self.bulk(size)

    def enter(self, what: str = "calls") -> None:
        """One call deeper (pair with :meth:`leave`)."""
        if self.depth >= MAX_CALL_DEPTH:
            raise RenderLimitExceeded(
                f"the template nests {what} more than {MAX_CALL_DEPTH} deep", "depth"
            )
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1
