"""Fill in the middle from the vocabulary (issue 17, point 5).

A model whose template cannot place a suffix but whose GGUF names fill-in-the-middle tokens
gets ``insert``, and ``suffix`` builds llama-server's ``/infill`` prompt from those tokens'
texts. The fast tests use hand-made headers and tiny GGUFs; the slow one runs the ollama
client's ``fill-in-middle.py`` example against Qwen2.5-Coder-0.5B, whose GGUF does not name
the tokens in its header (they are found by their spelling, as llama.cpp finds them).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from fastapi.testclient import TestClient
from gguf import GGUFValueType

from conftest import RunningServer, start_server, stop_server
from ggufgen import write_tiny_model
from models import qwen_coder_fixture  # noqa: F401 - provides the fixture qwen_coder
from pollama.errors import CapabilityMissing
from pollama.gguf import FillInMiddleTokens, GGUFInfo
from pollama.inference.prompt import build_generate_prompt, prompt_template_for

VOCAB = ["<unk>", "<s>", "</s>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "a", "b"]
FIM_KV = {
    "tokenizer.ggml.fim_pre_token_id": 6,
    "tokenizer.ggml.fim_suf_token_id": 7,
    "tokenizer.ggml.fim_mid_token_id": 1,
}
QWEN_FIM = FillInMiddleTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
PROMPT = 'def compute_gcd(a, b):\n    """Return the greatest common divisor."""\n'
SUFFIX = "\n    return result\n"


def _info(tokens: list[str], **kv: Any) -> GGUFInfo:
    return GGUFInfo(version=3, kv={"tokenizer.ggml.tokens": tokens, **kv}, tensors=[],
                    file_size=0)


class _Model:
    """What ``prompt_template_for`` reads from a ``LocalModel``."""

    def __init__(self, template: str | None) -> None:
        self._template = template

    def template(self) -> str | None:
        return self._template


async def _words(text: str) -> int:
    return len(text.split())


def _generate(template: str | None, info: GGUFInfo, **kw: Any) -> str:
    tpl = prompt_template_for(_Model(template), info)  # type: ignore[arg-type]
    result = asyncio.run(build_generate_prompt(
        tpl, num_ctx=4096, count_tokens=_words, model_name="m", **kw))
    return result.prompt


def test_fim_tokens_are_found_as_llama_cpp_finds_them() -> None:
    """Header ids first (new keys, then the deprecated ones), else the tokens' spelling; all
    three or nothing; an id outside the vocabulary counts as absent."""
    assert _info(VOCAB, **FIM_KV).fim_tokens == FillInMiddleTokens("a", "b", "<s>")
    old = {"tokenizer.ggml.prefix_token_id": 7, "tokenizer.ggml.suffix_token_id": 6,
           "tokenizer.ggml.middle_token_id": 2}
    assert _info(VOCAB, **old).fim_tokens == FillInMiddleTokens("b", "a", "</s>")
    assert _info(VOCAB).fim_tokens == QWEN_FIM
    assert _info(VOCAB, **{"tokenizer.ggml.fim_pre_token_id": 99}).fim_tokens == QWEN_FIM
    assert _info(VOCAB[:5]).fim_tokens is None  # no middle token
    assert _info(["<unk>", "\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"]).fim_tokens == (
        FillInMiddleTokens("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"))
    assert GGUFInfo(version=3, kv={}, tensors=[], file_size=0).fim_tokens is None


def test_suffix_builds_the_infill_prompt_from_the_tokens() -> None:
    """No ``.Suffix`` in the template: prefix token, prompt, suffix token, suffix, middle
    token (llama-server's order); a context still goes first; system prompts are not used."""
    info = _info(VOCAB)
    assert "insert" in prompt_template_for(_Model(None), info).capabilities()  # type: ignore
    text = _generate("{{ .System }} {{ .Prompt }}", info, prompt=PROMPT, suffix=SUFFIX,
                     system="ignored")
    assert text == f"<|fim_prefix|>{PROMPT}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    assert _generate(None, info, prompt="x", suffix="y", context_text="ctx ") == (
        "ctx <|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>")


def test_a_suffix_template_keeps_its_own_rendering() -> None:
    template = "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>"
    assert _generate(template, _info(VOCAB), prompt="x", suffix="y") == "<PRE> x <SUF>y <MID>"
    override = "[{{ .Prompt }}|{{ .Suffix }}]"
    assert _generate(None, _info(VOCAB), prompt="x", suffix="y",
                     template_override=override) == "[x|y]"


def test_neither_template_nor_tokens_refuses_insert() -> None:
    with pytest.raises(CapabilityMissing, match="m does not support insert"):
        _generate("{{ .Prompt }}", _info(VOCAB[:5]), prompt="x", suffix="y")


def _create(api: TestClient, path: Path, name: str) -> list[str]:
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.post(f"/api/blobs/{digest}", content=data).status_code in (200, 201)
    r = api.post("/api/create", json={"model": name, "files": {"m.gguf": digest},
                                      "stream": False})
    assert r.status_code == 200, r.text
    caps: list[str] = api.post("/api/show", json={"model": name}).json()["capabilities"]
    return caps


def test_show_lists_insert_for_fim_tokens(api: TestClient, tmp_path: Path) -> None:
    """The header's ids grant ``insert`` (tiny vocabulary: the ids name ordinary tokens)."""
    ids = {key: (value, GGUFValueType.UINT32) for key, value in FIM_KV.items()}
    with_fim = write_tiny_model(tmp_path / "fim.gguf", extra_kv=ids)
    assert _create(api, with_fim, "fim") == ["completion", "insert"]
    without = write_tiny_model(tmp_path / "plain.gguf", seed=1)
    assert _create(api, without, "plain") == ["completion"]


@pytest.fixture(scope="module")
def coder(qwen_coder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("fim-home")
    running = start_server(home)
    (home / "Modelfile").write_text(f"FROM {qwen_coder}\n")
    running.cli("create", "coder", "-f", str(home / "Modelfile"), check=True, timeout=300)
    plain = write_tiny_model(home / "plain.gguf")
    (home / "Plain").write_text(f"FROM {plain}\n")
    running.cli("create", "plain", "-f", str(home / "Plain"), check=True, timeout=300)
    yield running
    stop_server(running)


@pytest.mark.slow
def test_fill_in_middle_example_with_qwen_coder(coder: RunningServer) -> None:
    """ollama-python's ``fill-in-middle.py``: the middle of a function, not its end again;
    ``/v1/completions`` takes the same path; a model with neither path gets today's 400."""
    client = ollama.Client(host=coder.url, timeout=300)
    r = client.generate(model="coder", prompt=PROMPT, suffix=SUFFIX,
                        options={"temperature": 0, "num_predict": 64})
    code = r.response
    # The 0.5B instruct model writes the body, then goes on as in a chat (Ollama's own
    # template for it sends the same prompt): the start is what must fit.
    assert code.startswith("    ") and "result" in code.split("return")[0]
    assert "return result" not in code and "<|fim" not in code
    # The markers reached the model as its three special tokens, not as text (the worker's
    # own tokenizer, asked through /api/tokenize; llama_cpp is never loaded in the tests'
    # process, where a second copy of its libraries can crash it).
    infill = f"<|fim_prefix|>{PROMPT}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    tokens = client._client.post("/api/tokenize", json={
        "model": "coder", "content": infill, "add_special": False}).json()["tokens"]
    assert {151659, 151660, 151661} <= set(tokens) and r.prompt_eval_count == len(tokens)
    assert "insert" in (client.show("coder").capabilities or [])
    v1 = client._client.post("/v1/completions", json={
        "model": "coder", "prompt": PROMPT, "suffix": SUFFIX, "temperature": 0,
        "max_tokens": 64})
    assert v1.status_code == 200, v1.text
    text = v1.json()["choices"][0]["text"]
    assert text.strip() and "return result" not in text
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="plain", prompt="x", suffix="y")
    assert err.value.status_code == 400 and "does not support insert" in err.value.error
    client.close()
