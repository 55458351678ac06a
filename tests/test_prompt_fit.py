"""Truncation (``inference/prompt.py``, ``_fit``): Ollama's answer, in O(log n) renders.

Dropping old messages used to re-render and re-tokenize the whole list once per dropped
message: 200 / 800 / 1,600 short messages at num_ctx 512 took 3.3 s / 26 s / 108 s, went on
after the client left and held the model's slot. These tests pin the answer to the
straightforward algorithm (:func:`reference_fit`, the old code) on random conversations,
the number of renders to a logarithm, and show that cancelling stops it between renders.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pollama.errors import ContextOverflow
from pollama.inference.prompt import (
    PromptResult,
    PromptTemplate,
    build_chat_prompt,
    build_generate_prompt,
    tag_images,
)
from pollama.template import MAX_RENDER_OUTPUT, Template
from pollama.template.jinja import JinjaChatTemplate

GOLDEN = Path(__file__).parent / "golden" / "templates"
ROLES = PromptTemplate.from_go("{{ range .Messages }}{{ .Role }}: {{ .Content }} {{ end }}")
SMOLLM = PromptTemplate.from_jinja(
    JinjaChatTemplate((GOLDEN / "smollm2-135m-instruct.jinja").read_text())
)


def words(text: str) -> int:
    return len(text.split())


def reference_fit(
    template: PromptTemplate,
    msgs: list[dict[str, Any]],
    *,
    num_ctx: int,
    truncate: bool,
    image_tokens: int = 0,
) -> PromptResult:
    """Ollama's ``chatPrompt`` loop as it was written before: every start in order, each
    rendered and counted, the first that fits wins."""
    role = [str(m.get("role") or "").lower() for m in msgs]
    starts = [i for i in range(len(msgs)) if i == 0 or role[i - 1] != "system"]
    if not truncate or not starts:
        starts = [0]
    tokens = 0
    for start in starts:
        kept = [m for i, m in enumerate(msgs[:start]) if role[i] == "system"]
        tagged, images = tag_images(msgs[start:])
        prompt = template.render(kept + tagged)
        tokens = words(prompt) + image_tokens * len(images)
        if tokens <= num_ctx:
            dropped = start - len(kept)
            return PromptResult(prompt, dropped > 0, dropped, tokens, images)
    advice = "shorten the messages or increase num_ctx"
    if truncate and len(msgs) > 1:
        advice = (
            "the last message does not fit even with all older messages dropped; "
            "shorten it or increase num_ctx"
        )
    raise ContextOverflow(
        f"prompt has {tokens} tokens but the context window (num_ctx) is {num_ctx} tokens; "
        + advice
    )


def random_chat(rng: random.Random, size: int) -> list[dict[str, Any]]:
    chat = []
    for _ in range(size):
        role = rng.choice(["system", "user", "user", "assistant", "assistant", "tool"])
        message: dict[str, Any] = {
            "role": role,
            "content": " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, 8))),
        }
        if role == "user" and rng.random() < 0.2:
            message["images"] = ["aGk="] * rng.randint(1, 2)
        chat.append(message)
    return chat


class Counting(PromptTemplate):
    """A template that counts its renders (in the render threads)."""

    renders: list[int]

    def render(self, messages: Any, **kwargs: Any) -> str:
        self.renders.append(len(messages))
        return super().render(messages, **kwargs)


def counting(template: PromptTemplate) -> Counting:
    made = Counting(go=template.go, jinja=template.jinja)
    object.__setattr__(made, "renders", [])
    return made


async def _count(text: str) -> int:
    return words(text)


@pytest.mark.parametrize("template", [ROLES, SMOLLM], ids=["go", "jinja"])
def test_same_answer_as_the_straightforward_algorithm(template: PromptTemplate) -> None:
    rng = random.Random(1234)
    for case in range(150):
        msgs = random_chat(rng, rng.randint(1, 30))
        full = words(template.render(tag_images(msgs)[0]))
        num_ctx = rng.randint(1, full + 3)
        truncate = rng.random() < 0.85
        image_tokens = rng.choice([0, 0, 3])
        try:
            expected: PromptResult | str = reference_fit(
                template, msgs, num_ctx=num_ctx, truncate=truncate, image_tokens=image_tokens
            )
        except ContextOverflow as exc:
            expected = str(exc)
        try:
            got: PromptResult | str = asyncio.run(build_chat_prompt(
                template, msgs, system_default=None, num_ctx=num_ctx, count_tokens=_count,
                truncate=truncate, image_tokens=image_tokens))  # fmt: skip
        except ContextOverflow as exc:
            got = str(exc)
        assert got == expected, (case, msgs, num_ctx, truncate)


def _long_chat(n: int) -> list[dict[str, Any]]:
    chat: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(n):
        chat.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} a b c"})
    return chat


def _truncate(n: int) -> tuple[Counting, list[int], PromptResult]:
    template = counting(ROLES)
    sizes: list[int] = []

    async def count(text: str) -> int:
        sizes.append(len(text))
        return words(text)

    result = asyncio.run(build_chat_prompt(
        template, _long_chat(n), system_default=None, num_ctx=512, count_tokens=count))  # fmt: skip
    return template, sizes, result


def test_renders_and_counts_grow_with_the_log_of_the_messages() -> None:
    small, small_sizes, small_result = _truncate(200)
    large, large_sizes, large_result = _truncate(1600)
    for template, sizes, n in ((small, small_sizes, 200), (large, large_sizes, 1600)):
        assert len(template.renders) == len(sizes)  # one count per render
        assert len(sizes) <= 3 + math.ceil(math.log2(n)), (n, len(sizes))
    assert large_result.messages_dropped > 1400 and small_result.messages_dropped > 50
    assert large_result.prompt_tokens <= 512 < large_result.prompt_tokens + 6
    # Text tokenized: about n log n, far from the n^2 of one count per dropped message.
    assert sum(large_sizes) < 16 * sum(small_sizes)


def test_a_chat_too_long_to_render_is_truncated_not_refused() -> None:
    """A conversation whose whole prompt is over the render output limit loses its oldest
    messages like one over num_ctx."""
    big = "x" * (MAX_RENDER_OUTPUT // 8)
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": big} for i in range(11)]
    result = asyncio.run(build_chat_prompt(
        ROLES, chat, system_default=None, num_ctx=100, count_tokens=_count))  # fmt: skip
    assert result.truncated and 0 < result.messages_dropped < 11
    assert result.prompt.endswith(f"user: {big} ")


class Slow(Counting):
    """Each render takes a second (a heavy template), and says when one starts."""

    def render(self, messages: Any, **kwargs: Any) -> str:
        self.started.set()
        time.sleep(1.0)
        return super().render(messages, **kwargs)


def test_cancelling_stops_truncation_at_once() -> None:
    """A client that leaves cancels the request's task: it ends at once, while a render is
    still running in its thread, and nothing else is rendered or counted afterwards."""
    template = Slow(go=ROLES.go)
    object.__setattr__(template, "renders", [])
    object.__setattr__(template, "started", threading.Event())
    counted: list[int] = []

    async def count(text: str) -> int:
        counted.append(len(text))
        return words(text)

    async def scenario() -> float:
        task = asyncio.create_task(build_chat_prompt(
            template, _long_chat(1600), system_default=None, num_ctx=512,
            count_tokens=count))  # fmt: skip
        while not template.started.is_set():
            await asyncio.sleep(0.01)
        begun = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ended = time.monotonic() - begun
        await asyncio.sleep(1.5)  # the render in flight finishes; nothing follows it
        assert len(template.renders) <= 1 and counted == []
        return ended

    assert asyncio.run(scenario()) < 0.5


def test_generate_truncates_modelfile_messages_the_same_way() -> None:
    model_messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} x y"}
                      for i in range(300)]  # fmt: skip
    template = counting(ROLES)
    result = asyncio.run(build_generate_prompt(
        template, prompt="last one", system_default="S", model_messages=model_messages,
        num_ctx=100, count_tokens=_count))  # fmt: skip
    expected = reference_fit(ROLES, [{"role": "system", "content": "S"}, *model_messages,
                                     {"role": "user", "content": "last one"}],
                             num_ctx=100, truncate=True)  # fmt: skip
    assert result == expected
    assert len(template.renders) <= 3 + math.ceil(math.log2(302))


def test_a_legacy_go_template_truncates_too() -> None:
    legacy = PromptTemplate(go=Template.parse("[{{ .System }}|{{ .Prompt }}]{{ .Response }}"))
    msgs = _long_chat(41)
    for num_ctx in (1, 3, 10, 40, 1000):
        try:
            expected: PromptResult | str = reference_fit(
                legacy, msgs, num_ctx=num_ctx, truncate=True
            )
        except ContextOverflow as exc:
            expected = str(exc)
        try:
            got: PromptResult | str = asyncio.run(build_chat_prompt(
                legacy, msgs, system_default=None, num_ctx=num_ctx,
                count_tokens=_count))  # fmt: skip
        except ContextOverflow as exc:
            got = str(exc)
        assert got == expected, num_ctx
