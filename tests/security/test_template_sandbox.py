"""A sandbox escape through a model's chat template (CVE-2024-34359, llama-cpp-python; the
same bug as LiteLLM's CVE-2024-2952), end to end: the template arrives in a GGUF uploaded
through the API, and chatting with the model must fail cleanly without running anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ggufgen import write_tiny_model

ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
]


@pytest.mark.slow
def test_chat_template_escapes_fail_without_executing(api: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for i, escape in enumerate(ESCAPES):
        template = escape.replace("MARKER", str(marker)) + (
            "{% for m in messages %}{{ m.content }}{% endfor %}"
        )
        path = write_tiny_model(tmp_path / f"evil{i}.gguf", chat_template=template)
        data = path.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
        created = api.post("/api/create", json={
            "model": f"evil{i}", "files": {"evil.gguf": digest}, "stream": False})
        assert created.status_code == 200, created.text
        response = api.post("/api/chat", json={
            "model": f"evil{i}", "stream": False, "options": {"num_predict": 1},
            "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert response.status_code == 400, response.text
        assert "template" in response.json()["error"].lower()
        assert not marker.exists()
    # The server still serves, and the same file with a plain template chats.
    plain = write_tiny_model(tmp_path / "plain.gguf",
                             chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    data = plain.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    api.post(f"/api/blobs/{digest}", content=data)
    api.post("/api/create", json={"model": "plain", "files": {"p.gguf": digest},
                                  "stream": False})  # fmt: skip
    ok = api.post("/api/chat", json={"model": "plain", "stream": False,
                                     "options": {"num_predict": 2},
                                     "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text
