"""End to end: a model with a projector layer refuses images instead of dropping them.

The model is created as a registry ships a vision model: a Modelfile with two FROM lines, the
weights and an mmproj GGUF (``general.architecture`` "clip"), which the store keeps as a
projector layer, so the model shows the ``vision`` capability. The runner cannot run the
projector yet, so before this refusal its images were dropped and the prompt got ``[img-N]``
markers only. Text-only requests to it still run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import RunningServer
from ggufgen import write_gguf, write_tiny_model
from imagegen import b64, encoded

pytestmark = pytest.mark.slow

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REFUSED = (
    '"seer" can see images, but pollama cannot run image input yet (the projector '
    "is not loaded): images are refused rather than dropped; send the request without images"
)


def _write_projector(path: Path) -> Path:
    """A tiny mmproj GGUF: the clip architecture, vision blocks, no text blocks."""
    kv = {
        "general.architecture": "clip",
        "general.name": "tiny projector",
        "clip.has_vision_encoder": True,
        "clip.vision.block_count": 1,
        "clip.vision.embedding_length": 8,
    }
    return write_gguf(path, kv, {"v.patch_embd.weight": np.zeros((8, 8), dtype=np.float32)})


@pytest.fixture
def http(server: RunningServer, tmp_path: Path) -> Iterator[httpx.Client]:
    """A real server with ``seer``: the tiny model plus a projector, as a registry ships it."""
    write_tiny_model(tmp_path / "tiny.gguf", chat_template=CHATML)
    _write_projector(tmp_path / "mmproj.gguf")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./tiny.gguf\nFROM ./mmproj.gguf\n", encoding="utf-8")
    server.cli("create", "seer", "-f", str(modelfile), check=True)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        shown = client.post("/api/show", json={"model": "seer"}).json()
        assert "vision" in shown["capabilities"]  # so it passes the vision check
        yield client


def test_images_to_a_projector_model_are_a_400_not_dropped(http: httpx.Client) -> None:
    image = b64(encoded("PNG"))
    message = {"role": "user", "content": "What is in this picture?", "images": [image]}
    native = http.post("/api/chat", json={"model": "seer", "messages": [message],
                                          "stream": False})
    assert (native.status_code, native.json()) == (400, {"error": REFUSED})

    generate = http.post("/api/generate", json={"model": "seer", "prompt": "?",
                                                "images": [image], "stream": False})
    assert (generate.status_code, generate.json()) == (400, {"error": REFUSED})

    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    openai = http.post("/v1/chat/completions", json={
        "model": "seer", "messages": [{"role": "user", "content": content}]})
    assert openai.status_code == 400
    assert openai.json()["error"]["message"] == REFUSED


def test_text_to_a_projector_model_still_runs(http: httpx.Client) -> None:
    options = {"num_predict": 3, "num_ctx": 128}
    message = {"role": "user", "content": "hello"}
    native = http.post("/api/chat", json={"model": "seer", "messages": [message],
                                          "stream": False, "options": options})
    assert native.status_code == 200, native.text
    assert native.json()["done"] is True

    openai = http.post("/v1/chat/completions", json={
        "model": "seer", "messages": [message], "max_tokens": 3})
    assert openai.status_code == 200, openai.text
    assert openai.json()["choices"][0]["message"]["role"] == "assistant"
