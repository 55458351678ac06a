"""Anthropic content blocks this server cannot give a model are refused, never dropped.

Ollama ignores a ``document`` block (and any other block type it does not know), so the
model answered without the document and nobody knew. Here such a block is a 400 in
Anthropic's error shape naming the type, through the official ``anthropic`` SDK.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from fastapi.testclient import TestClient

from inprocess import anthropic_client

PDF = "JVBERi0xLjQKJcOkw7zDtsOfCg=="  # "%PDF-1.4" and a comment line

BLOCKS: dict[str, dict[str, Any]] = {
    "document-url": {"type": "document",
                     "source": {"type": "url", "url": "http://169.254.169.254/latest/"}},
    "document-pdf": {"type": "document",
                     "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
    "document-text": {"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "the annual report"}},
    "document-file": {"type": "document", "source": {"type": "file", "file_id": "file_011"}},
    "search_result": {"type": "search_result", "source": "https://example.com", "title": "t",
                      "content": [{"type": "text", "text": "a result"}]},
    "server_tool_use": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                        "input": {"query": "x"}},
    "unknown": {"type": "hologram"},
}  # fmt: skip


def _refusal(api: TestClient, **request: Any) -> tuple[int, dict[str, Any]]:
    client = anthropic_client(api)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="smollm2:135m", max_tokens=8, **request)
    body = info.value.body
    assert isinstance(body, dict)
    return info.value.status_code, body


@pytest.mark.parametrize("name", list(BLOCKS))
def test_unsupported_blocks_are_refused_by_type(api: TestClient, name: str) -> None:
    block = BLOCKS[name]
    content = [{"type": "text", "text": "Summarize this."}, block]
    status, body = _refusal(api, messages=[{"role": "user", "content": content}])
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert message.startswith(f'content block type "{block["type"]}" is not supported')
    assert "text, image, thinking" in message  # it says what is supported
    if block["type"] in ("document", "search_result"):
        assert "send its text as a text block instead" in message


def test_documents_in_tool_results_and_system_are_refused(api: TestClient) -> None:
    messages = [
        {"role": "user", "content": "Read the report."},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [BLOCKS["document-pdf"]]}]},
    ]  # fmt: skip
    status, body = _refusal(api, messages=messages)
    assert status == 400
    assert body["error"]["message"].startswith(
        'content block type "document" in a tool_result is not supported'
    )
    status, body = _refusal(api, system=[BLOCKS["document-text"]],  # type: ignore[list-item]
                            messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
    assert status == 400
    assert body["error"]["message"].startswith('content block type "document" in system')


def test_count_tokens_refuses_them_too(api: TestClient) -> None:
    content = [{"type": "text", "text": "Summarize this."}, BLOCKS["document-url"]]
    response = api.post("/v1/messages/count_tokens", json={
        "model": "smollm2:135m", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
