"""The Anthropic-compatible endpoint through the official ``anthropic`` SDK, real model."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from conftest import MODEL, RunningServer

pytestmark = pytest.mark.slow


@pytest.fixture
def claude(model_server: RunningServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=model_server.url, api_key="unused") as client:
        yield client


def test_messages(claude: anthropic.Anthropic) -> None:
    r = claude.messages.create(
        model=MODEL, max_tokens=16, system="You are terse.", extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16


def test_messages_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=12, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Count to three."}]}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens_and_errors(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}])
    assert counted.input_tokens > 2
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="missing", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=0,
                               messages=[{"role": "user", "content": "x"}])
    assert "max_tokens" in str(err.value)
