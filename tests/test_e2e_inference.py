"""Inference end to end: a real server, the real SmolLM2 model, the official ``ollama`` client."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from conftest import MODEL, RunningServer

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture
def srv(model_server: RunningServer) -> RunningServer:
    return model_server


@pytest.fixture
def client(srv: RunningServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=srv.url)
    yield c
    c.close()


def test_generate_non_streaming(client: ollama.Client) -> None:
    r = client.generate(model=MODEL, prompt="What is the capital of France?", options=GREEDY)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.response.strip()
    assert r.eval_count and r.eval_count <= 24
    assert r.prompt_eval_count and r.prompt_eval_count > 5
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, field), int) and getattr(r, field) > 0
    assert r.context and all(isinstance(t, int) for t in r.context)


def test_generate_streaming_and_same_text(client: ollama.Client) -> None:
    # long enough to stream in several frames (a stream's text goes at most every 100 ms)
    options, prompt = {"temperature": 0, "num_predict": 96}, "Write a long story about a cat."
    whole = client.generate(model=MODEL, prompt=prompt, options=options)
    chunks = list(client.generate(model=MODEL, prompt=prompt, options=options, stream=True))
    assert len(chunks) > 3
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.response for c in chunks) == whole.response
    assert chunks[-1].eval_count == whole.eval_count


def test_seed_gives_same_text(client: ollama.Client) -> None:
    opts = {"temperature": 0.9, "seed": 42, "num_predict": 20}
    a = client.generate(model=MODEL, prompt="Tell me a story.", options=opts).response
    b = client.generate(model=MODEL, prompt="Tell me a story.", options=opts).response
    assert a == b


def test_num_predict_gives_length(client: ollama.Client) -> None:
    r = client.generate(model=MODEL, prompt="Write a long essay about the sea.",
                        options={"temperature": 0, "num_predict": 5})
    assert r.done_reason == "length" and r.eval_count == 5


def test_stop_sequence_never_in_output(client: ollama.Client) -> None:
    base = client.generate(model=MODEL, prompt="List the numbers from 1 to 10.",
                           options={"temperature": 0, "num_predict": 40}).response
    assert len(base) > 4
    stop = base[len(base) // 2: len(base) // 2 + 2]
    assume = base.index(stop)
    r = client.generate(model=MODEL, prompt="List the numbers from 1 to 10.",
                        options={"temperature": 0, "num_predict": 40, "stop": [stop]})
    assert r.done_reason == "stop"
    assert stop not in r.response
    assert r.response == base[:assume]


def test_chat_and_prompt_cache(client: ollama.Client, srv: RunningServer) -> None:
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Hello! Tell me about llamas in one sentence."}]
    first = client.chat(model=MODEL, messages=history, options=GREEDY)
    assert first.message.role == "assistant" and first.message.content
    history += [{"role": "assistant", "content": first.message.content},
                {"role": "user", "content": "And alpacas?"}]
    raw = httpx.post(f"{srv.url}/api/chat", json={"model": MODEL, "messages": history,
                                                    "stream": False, "options": GREEDY},
                     timeout=120).json()
    assert raw["message"]["content"]
    assert raw["prompt_eval_count"] > first.prompt_eval_count
    assert raw["prompt_cached_count"] >= first.prompt_eval_count - 1


def test_chat_streaming(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                             options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].eval_count
    assert "".join(p.message.content for p in parts).strip()


def test_load_ps_unload(client: ollama.Client, srv: RunningServer) -> None:
    loaded = client.generate(model=MODEL, prompt="", keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    ps = client.ps()
    assert [m.model for m in ps.models] == [MODEL]
    assert ps.models[0].context_length == 4096 and ps.models[0].size_vram == 0
    table = srv.cli("ps", check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert table[1].startswith(MODEL) and "100% CPU" in table[1] and "from now" in table[1]
    chat_load = httpx.post(f"{srv.url}/api/chat", json={"model": MODEL, "messages": []}).json()
    assert chat_load["done_reason"] == "load" and chat_load["message"]["content"] == ""
    srv.cli("stop", MODEL, check=True)
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.ps().models == []
    gone = srv.cli("stop", "no-such-model")
    assert gone.returncode == 1 and 'couldn\'t find model "no-such-model" to stop' in gone.stderr


GIF_1X1 = "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"  # a valid 1x1 image


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "missing", "prompt": "x"}, 404, "model 'missing' not found"),
        ({"model": MODEL, "prompt": "x", "images": ["aGVsbG8="]}, 400,
         "image 1 is not a valid PNG, JPEG, WebP or GIF image"),  # "hello": checked first
        ({"model": MODEL, "prompt": "x", "images": [GIF_1X1]}, 400, "vision"),
        ({"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "options": {"num_ctx": -5}}, 400, "num_ctx"),
        ({"model": MODEL, "prompt": "x", "options": {"num_predict": 10**30}}, 400, "num_predict"),
        ({"model": MODEL, "prompt": "x", "keep_alive": "3600"}, 400, "keep_alive"),
        ({"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, 400,
         "raw mode does not support template, system, or context"),
        ({"model": MODEL, "prompt": "x", "format": "xml"}, 400, "invalid format"),
        ({"model": MODEL, "prompt": "x", "think": True}, 400,
         f'"{MODEL}" does not support thinking'),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "does not support insert"),
    ],
)
def test_generate_errors(srv: RunningServer, body: dict[str, object], status: int,
                         message: str) -> None:
    r = httpx.post(f"{srv.url}/api/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_bad_json_and_unknown_options(srv: RunningServer) -> None:
    r = httpx.post(f"{srv.url}/api/generate", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{srv.url}/api/chat", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = httpx.post(f"{srv.url}/api/generate", json={
        "model": MODEL, "prompt": "Hi", "stream": False,
        "options": {"num_predict": 3, "temperature": 0, "not_an_option": 1}}, timeout=60)
    assert r.status_code == 200 and r.json()["eval_count"] == 3


def test_raw_template_and_system(client: ollama.Client) -> None:
    raw = client.generate(model=MODEL, prompt="<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\n", raw=True, options=GREEDY)
    templated = client.generate(model=MODEL, prompt="Hi", options=GREEDY)
    assert raw.response == templated.response
    assert raw.context is None
    custom = client.generate(model=MODEL, prompt="Hi", template="{{ .Prompt }}",
                             options={"temperature": 0, "num_predict": 4})
    assert custom.prompt_eval_count < templated.prompt_eval_count
    sys_r = client.generate(model=MODEL, prompt="Hi", system="Answer in French.",
                            options=GREEDY)
    assert sys_r.prompt_eval_count > templated.prompt_eval_count


def test_context_overflow_and_truncation(srv: RunningServer) -> None:
    long_text = "word " * 400
    r = httpx.post(f"{srv.url}/api/generate", json={
        "model": MODEL, "prompt": long_text, "options": {"num_ctx": 128}}, timeout=60)
    assert r.status_code == 400
    assert "128" in r.json()["error"] and "token" in r.json()["error"]
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"Question {i}: " + "blah " * 30},
                     {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "Last question?"})
    r = httpx.post(f"{srv.url}/api/chat", json={
        "model": MODEL, "messages": messages, "stream": False,
        "options": {"num_ctx": 256, "num_predict": 8, "temperature": 0}}, timeout=60)
    body = r.json()
    assert r.status_code == 200, body
    assert body["truncated"] is True and body["truncated_messages"] > 0
    assert body["prompt_eval_count"] <= 256


def test_concurrent_streams_interleave(srv: RunningServer) -> None:
    first_chunk: dict[int, float] = {}
    finished: dict[int, float] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with httpx.stream("POST", f"{srv.url}/api/generate", json={
                "model": MODEL, "prompt": f"Write a poem about number {i}.",
                "options": {"temperature": 0, "num_predict": 48}}, timeout=120) as r:
                for line in r.iter_lines():
                    item = json.loads(line)
                    first_chunk.setdefault(i, time.monotonic())
                    assert "error" not in item
            finished[i] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and len(finished) == 4
    # Every stream had produced output before the first one finished: they ran together.
    assert max(first_chunk.values()) < min(finished.values())


def test_queue_full_gets_503(srv: RunningServer) -> None:
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        r = httpx.post(f"{srv.url}/api/generate", json={
            "model": MODEL, "prompt": "Hi", "stream": False,
            "options": {"temperature": 0, "num_predict": 16}}, timeout=300)
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"] == (
                    "server busy, please try again.  maximum pending requests exceeded")

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(statuses) == 50
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) >= 1 and statuses.count(200) >= 10


def test_disconnect_frees_the_slot(srv: RunningServer, client: ollama.Client) -> None:
    for _ in range(4):
        with httpx.stream("POST", f"{srv.url}/api/generate", json={
                "model": MODEL, "prompt": "Write a very long story.",
                "options": {"num_predict": 2000}}, timeout=60) as r:
            next(r.iter_lines())
    start = time.monotonic()
    r = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 4, "temperature": 0})
    assert r.done and time.monotonic() - start < 20


def test_worker_crash_is_an_error_and_server_recovers(srv: RunningServer,
                                                     client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="", keep_alive="10m")
    pids = _worker_pids(srv)
    assert pids
    lines: list[dict[str, object]] = []
    # greedy: this story runs the whole 2,000 tokens (about 20 s). Sampled, it once ended
    # after 20 tokens, which with 100 ms frames is three lines, the last of them the end,
    # before the worker was killed.
    with httpx.stream("POST", f"{srv.url}/api/generate", json={
            "model": MODEL, "prompt": "Write a very long story.",
            "options": {"num_predict": 2000, "temperature": 0}}, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            lines.append(json.loads(line))
            if i == 2:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
    assert "error" in lines[-1]
    assert "model runner has unexpectedly stopped" in str(lines[-1]["error"])
    again = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 4})
    assert again.done


def _worker_pids(srv: RunningServer) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("PPid:")), 0)
        if b"pollama.runner.worker" in cmdline and ppid == srv.process.pid:
            pids.append(int(proc.name))
    return pids


def test_cli_run_one_shot_and_piped(srv: RunningServer, tmp_path: Path) -> None:
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {MODEL}\nPARAMETER num_predict 24\nPARAMETER temperature 0\n")
    srv.cli("create", "smol-short", "-f", str(modelfile), check=True)
    r = srv.cli("run", "smol-short", "Say", "hello", "--verbose", check=True)
    assert r.stdout.strip()
    for label in ("total duration:", "load duration:", "prompt eval count:",
                  "prompt eval rate:", "eval count:", "eval duration:", "eval rate:"):
        assert label in r.stderr
    assert "\x1b" not in r.stdout
    piped = srv.cli("run", "smol-short", input="What is 2+2?\n", check=True)
    assert piped.stdout.strip()
    missing = srv.cli("run", "nope-model", "hi")
    assert missing.returncode == 1 and "model 'nope-model' not found" in missing.stderr
