"""End to end: images reach the model through its projector, on every route.

The model is the real SmolLM2-135M with a tiny random-weight projector (LLaVA's "mlp" type,
written at test time by ``tiny_projector.py``; no vision GGUF ships anywhere this project can
reach): 16 embedding rows per image, 576 wide, scaled like the model's token embeddings. The
model knows nothing of these images, but greedy decoding makes what it says a function of
them: two different images give different answers, the same image the same answer. The
model is created as users do it, a Modelfile with two FROM lines, through a real
``pollama serve``, and asked through the official clients.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from conftest import RunningServer, create_with_projector, start_server, stop_server
from imagegen import b64, encoded
from test_e2e_inference import _worker_pids
from tiny_projector import SLOW_SHAPE, VISION_TOKENS, write_vision_projector

pytestmark = pytest.mark.slow

MODEL = "seer"
GREEDY = {"temperature": 0, "num_predict": 10}
RED = b64(encoded("PNG", (32, 32), (255, 0, 0)))
BLUE = b64(encoded("PNG", (32, 32), (0, 0, 255)))
NOISE = b64(encoded("JPEG", (40, 24), (20, 200, 90)))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with ``seer``: the default model's weights and a projector, FROM twice."""
    home = tmp_path_factory.mktemp("vision-home")
    running = start_server(home, {"OLLAMA_NUM_PARALLEL": "2", "POLLAMA_SERVE_REGISTRY": "1"})
    try:
        create_with_projector(running, MODEL, write_vision_projector(home / "mmproj.gguf"))
        yield running
    finally:
        stop_server(running)


def _generate(http: httpx.Client, images: list[str], prompt: str = "Describe the image.",
              **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "images": images, "stream": False,
            "options": GREEDY, **extra}
    response = http.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _chat(http: httpx.Client, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "stream": False, "options": GREEDY}
    response = http.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_show_claims_vision(http: httpx.Client) -> None:
    shown = http.post("/api/show", json={"model": MODEL}).json()
    assert "vision" in shown["capabilities"]


def test_the_image_reaches_the_model_and_its_tokens_are_counted(http: httpx.Client) -> None:
    red, blue, again = (_generate(http, [image]) for image in (RED, BLUE, RED))
    assert red["response"] != blue["response"]
    assert red["response"] == again["response"]
    text_only = _generate(http, [])
    assert red["prompt_eval_count"] == text_only["prompt_eval_count"] + VISION_TOKENS
    two = _generate(http, [RED, BLUE])
    assert two["prompt_eval_count"] == text_only["prompt_eval_count"] + 2 * VISION_TOKENS


def test_several_images_in_one_message_keep_their_order(http: httpx.Client) -> None:
    red_blue = _chat(http, [{"role": "user", "content": "Compare.", "images": [RED, BLUE]}])
    blue_red = _chat(http, [{"role": "user", "content": "Compare.", "images": [BLUE, RED]}])
    assert red_blue["message"]["content"] != blue_red["message"]["content"]


def test_references_place_each_image(http: httpx.Client) -> None:
    """Ollama's ``[img-N]`` references put image N where they stand in a raw prompt: the
    same layout reached by two numberings gives the same answer; a different one differs."""
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    a = _generate(http, [RED, BLUE], template.format("[img-1] before [img-0]"), raw=True)
    b = _generate(http, [BLUE, RED], template.format("[img-0] before [img-1]"), raw=True)
    c = _generate(http, [RED, BLUE], template.format("[img-0] before [img-1]"), raw=True)
    assert a["response"] == b["response"]
    assert a["response"] != c["response"]
    assert a["prompt_eval_count"] == c["prompt_eval_count"]
    bad = http.post("/api/generate", json={
        "model": MODEL, "prompt": "[img-3] what?", "images": [RED], "raw": True,
        "stream": False, "options": GREEDY})
    assert bad.status_code == 400
    assert "invalid image index: 3" in bad.json()["error"]


def test_images_in_two_turns_land_in_order(http: httpx.Client) -> None:
    def conversation(first: str, second: str) -> dict[str, Any]:
        return _chat(http, [
            {"role": "user", "content": "Look at this.", "images": [first]},
            {"role": "assistant", "content": "I see it."},
            {"role": "user", "content": "And this one?", "images": [second]},
        ])

    red_blue, blue_red = conversation(RED, BLUE), conversation(BLUE, RED)
    assert red_blue["message"]["content"] != blue_red["message"]["content"]
    assert red_blue["prompt_eval_count"] == blue_red["prompt_eval_count"]


def test_a_follow_up_reuses_the_image_and_a_new_image_is_never_cached(
    http: httpx.Client,
) -> None:
    def turn(image: str, follow_up: str = "") -> dict[str, Any]:
        messages = [{"role": "user", "content": "What is it?", "images": [image]}]
        if follow_up:
            messages += [{"role": "assistant", "content": "A picture."},
                         {"role": "user", "content": follow_up}]
        return _chat(http, messages)

    def cached(reply: dict[str, Any]) -> int:
        return int(reply.get("prompt_cached_count", 0))

    unload = {"model": MODEL, "keep_alive": 0}
    http.post("/api/generate", json=unload)
    cold_blue = turn(BLUE, "Tell me more.")
    http.post("/api/generate", json=unload)  # empty caches again
    first = turn(RED)
    follow = turn(RED, "Tell me more.")
    # The first turn's prompt, image included, is served from the cache.
    assert cached(follow) >= first["prompt_eval_count"] - 1
    # Both slots now hold red where blue will be: blue must be computed again from the
    # image on, so its answer is the one it gets on an empty cache.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda text: turn(RED, text), ["Tell me more.", "Anything else?"]))
    warm_blue = turn(BLUE, "Tell me more.")
    assert warm_blue["message"]["content"] == cold_blue["message"]["content"]
    assert cached(warm_blue) < first["prompt_eval_count"] - VISION_TOKENS


def test_every_route_takes_images(srv: RunningServer) -> None:
    def answers(ask: Any) -> tuple[str, str, str]:
        return ask(RED), ask(BLUE), ask(RED)

    native = ollama.Client(host=srv.url)

    def ask_native(image: str) -> str:
        reply = native.chat(model=MODEL, options=GREEDY, messages=[
            {"role": "user", "content": "What is it?", "images": [base64.b64decode(image)]}])
        return str(reply.message.content)

    oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")

    def ask_openai(image: str) -> str:
        reply = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=10, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ]}])
        assert reply.usage is not None and reply.usage.prompt_tokens > VISION_TOKENS
        return str(reply.choices[0].message.content)

    def ask_responses(image: str) -> str:
        reply = oai.responses.create(model=MODEL, temperature=0, max_output_tokens=10,
                                     store=False, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is it?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{image}",
             "detail": "auto"}]}])  # fmt: skip
        assert reply.usage is not None and reply.usage.input_tokens > VISION_TOKENS
        return reply.output_text

    claude = anthropic.Anthropic(base_url=srv.url, api_key="unused")

    def ask_anthropic(image: str) -> str:
        reply = claude.messages.create(
            model=MODEL, max_tokens=10, extra_body={"temperature": 0}, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": image}},
                {"type": "text", "text": "What is it?"},
            ]}])
        assert reply.usage.input_tokens > VISION_TOKENS
        return "".join(block.text for block in reply.content if block.type == "text")

    try:
        for ask in (ask_native, ask_openai, ask_responses, ask_anthropic):
            red, blue, red_again = answers(ask)
            assert red != blue, ask.__name__
            assert red == red_again, ask.__name__
    finally:
        native._client.close()
        oai.close()
        claude.close()


def test_two_image_requests_and_a_text_stream_at_once(http: httpx.Client,
                                                      srv: RunningServer) -> None:
    """Images encoded for one sequence while the other streams: all three answer, and the
    image answers are those they get alone."""
    import concurrent.futures

    alone = {image: _generate(http, [image])["response"] for image in (RED, NOISE)}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        text = pool.submit(_generate, http, [], "Count to twenty.",
                           options={"temperature": 0, "num_predict": 40})
        images = {image: pool.submit(_generate, http, [image]) for image in (RED, NOISE)}
        assert text.result()["eval_count"] > 0
        for image, future in images.items():
            assert future.result()["response"] == alone[image]


def test_bad_images_and_too_many_image_tokens_are_400s(http: httpx.Client) -> None:
    not_image = base64.b64encode(b"this is not a picture at all").decode()
    bad = http.post("/api/generate", json={"model": MODEL, "prompt": "?",
                                           "images": [not_image], "stream": False})
    assert bad.status_code == 400
    assert "image 1" in bad.json()["error"]
    full = http.post("/api/generate", json={
        "model": MODEL, "prompt": "Describe these images in detail.", "stream": False,
        "images": [RED, BLUE, NOISE], "options": {"num_ctx": 40, "num_predict": 4}})
    assert full.status_code == 400
    message = full.json()["error"]
    assert "context window (num_ctx) is 40 tokens" in message
    assert "prompt has" in message
    # One image referenced three times: past the server's count (one image), the worker
    # counts every row it would decode, and refuses with both numbers.
    reused = http.post("/api/generate", json={
        "model": MODEL, "prompt": "[img-0] [img-0] [img-0] hi", "raw": True, "images": [RED],
        "stream": False, "options": {"num_ctx": 40, "num_predict": 4}})
    assert reused.status_code == 400, reused.text
    assert f"{3 * VISION_TOKENS} of them for 3 image(s)" in reused.json()["error"]
    assert "more than the context of 40 tokens" in reused.json()["error"]


def test_images_to_a_model_without_a_projector_are_refused(
    srv: RunningServer, http: httpx.Client, tmp_path: Path,
) -> None:
    from pollama.default_model import default_modelfile

    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(default_modelfile())
    srv.cli("create", "plain", "-f", str(modelfile), check=True)
    refused = http.post("/api/generate", json={"model": "plain", "prompt": "?",
                                               "images": [RED], "stream": False})
    assert refused.status_code == 400
    assert "does not support images" in refused.json()["error"]


def test_a_projector_that_fails_to_load_names_the_file_and_the_server_goes_on(
    srv: RunningServer, http: httpx.Client, tmp_path: Path,
) -> None:
    from gguf import GGUFReader

    broken = write_vision_projector(tmp_path / "broken-mmproj.gguf")
    reader = GGUFReader(broken, "r+")  # the projector type becomes one llama.cpp lacks
    field = reader.fields["clip.projector_type"]
    field.parts[field.data[0]][:] = memoryview(b"zzz"[: len(field.parts[field.data[0]])])
    del reader
    create_with_projector(srv, "broken-eyes", broken)
    failed = http.post("/api/generate", json={"model": "broken-eyes", "prompt": "hi",
                                              "stream": False})
    assert failed.status_code == 500
    assert "projector" in failed.json()["error"]
    assert _generate(http, [RED])["done"] is True  # the vision model still answers


def test_the_worker_killed_mid_image_request_is_an_error_and_the_next_one_runs(
    srv: RunningServer, http: httpx.Client,
) -> None:
    _generate(http, [])
    pids = _worker_pids(srv)
    assert pids
    lines = []
    # greedy: this answer runs the whole 2,000 tokens; a sampled one may end within the
    # first three lines (100 ms frames), before the worker is killed
    with http.stream("POST", "/api/generate", json={
            "model": MODEL, "prompt": "Tell a long story about it.", "images": [NOISE],
            "options": {"num_predict": 2000, "temperature": 0}}) as response:
        for i, line in enumerate(response.iter_lines()):
            lines.append(line)
            if i == 2:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
    assert "model runner has unexpectedly stopped" in lines[-1]
    assert _generate(http, [RED])["done"] is True


def test_pollama_run_attaches_image_paths(srv: RunningServer, http: httpx.Client,
                                          tmp_path: Path) -> None:
    """``pollama run`` finds image paths in the prompt as Ollama's CLI does, on the command
    line and piped, and the answer is the one the API gives for the same image."""
    greedy = tmp_path / "Modelfile"
    greedy.write_text(f"FROM {MODEL}\nPARAMETER temperature 0\nPARAMETER num_predict 10\n")
    srv.cli("create", "seer-greedy", "-f", str(greedy), check=True)
    photo = tmp_path / "red photo.png"
    photo.write_bytes(base64.b64decode(RED))
    escaped = str(photo).replace(" ", "\\ ")
    expected = http.post("/api/generate", json={
        "model": "seer-greedy", "prompt": "Describe", "images": [RED], "stream": False,
    }).json()["response"]
    argv = srv.cli("run", "seer-greedy", f"Describe {escaped}", check=True)
    assert f"Added image '{photo}'" in argv.stderr
    assert argv.stdout.strip() == expected.strip()
    piped = srv.cli("run", "seer-greedy", input=f"Describe {escaped}\n", check=True)
    assert f"Added image '{photo}'" in piped.stderr
    assert piped.stdout.strip() == expected.strip()
    missing = srv.cli("run", "seer-greedy", f"Describe {tmp_path}/nowhere.png", check=True)
    assert "Added image" not in missing.stderr  # a path that does not exist stays text


def test_a_pulled_vision_model_sees(srv: RunningServer, http: httpx.Client,
                                    tmp_path: Path) -> None:
    """Pulled from another pollama's registry, the projector layer comes along and runs:
    the same image gets the same answer on both machines."""
    port = srv.url.rsplit(":", 1)[1]
    (tmp_path / "puller").mkdir()
    puller = start_server(tmp_path / "puller", {"POLLAMA_REGISTRY_HOSTS": f"127.0.0.1:{port}"})
    try:
        name = f"127.0.0.1:{port}/library/{MODEL}:latest"
        puller.cli("pull", "--insecure", name, check=True)
        with httpx.Client(base_url=puller.url, timeout=120) as there:
            shown = there.post("/api/show", json={"model": name}).json()
            assert "vision" in shown["capabilities"]
            assert shown["projector_info"]["general.architecture"] == "clip"
            answer = there.post("/api/generate", json={
                "model": name, "prompt": "Describe the image.", "images": [BLUE],
                "stream": False, "options": GREEDY}).json()
        assert answer["response"] == _generate(http, [BLUE])["response"]
    finally:
        stop_server(puller)


@pytest.fixture(scope="module")
def slow_seer(srv: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model whose projector's encode lasts a few hundred milliseconds, loaded."""
    slow = write_vision_projector(tmp_path_factory.mktemp("slow") / "mmproj.gguf",
                                  shape=SLOW_SHAPE)
    create_with_projector(srv, "slow-seer", slow)
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        loaded = client.post("/api/generate", json={
            "model": "slow-seer", "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
        assert loaded.status_code == 200
    return "slow-seer"


_ENCODING = "clip_encode: copying image"  # llama.cpp's log line as an encode starts


def _when_encoding_starts(srv: RunningServer, before: int, waiting: Any) -> None:
    deadline = time.monotonic() + 60
    while srv.log.read_text(errors="replace").count(_ENCODING) == before:
        assert time.monotonic() < deadline and not waiting.done()
        time.sleep(0.005)


def test_the_worker_killed_during_an_encode_fails_that_request_only(
    srv: RunningServer, http: httpx.Client, slow_seer: str,
) -> None:
    """The worker is killed as soon as it starts encoding (its log line), then the server
    serves again."""
    import concurrent.futures

    body = {"model": slow_seer, "prompt": "Describe it.", "stream": False,
            "options": {"num_predict": 4}, "images": [NOISE]}
    before = srv.log.read_text(errors="replace").count(_ENCODING)
    pids = _worker_pids(srv)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/api/generate", json=body)
        _when_encoding_starts(srv, before, pending)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        failed = pending.result()
    assert failed.status_code == 500
    assert "model runner has unexpectedly stopped" in failed.json()["error"]
    again = http.post("/api/generate", json=body)
    assert again.status_code == 200 and again.json()["prompt_eval_count"] > 256


def test_a_client_that_leaves_during_an_encode_holds_nothing(
    srv: RunningServer, http: httpx.Client, slow_seer: str,
) -> None:
    """Both slots are free right after: two image requests at once answer, and the
    abandoned image's rows were never decoded (the next request with it is not served
    from a cache)."""
    import concurrent.futures

    body = {"model": slow_seer, "prompt": "Describe it.", "stream": False,
            "options": {"num_predict": 4, "temperature": 0}}
    http.post("/api/generate", json={**body, "images": [RED]})  # loaded, worker up
    before = srv.log.read_text(errors="replace").count(_ENCODING)
    host, port = srv.url.removeprefix("http://").split(":")
    payload = json.dumps({**body, "images": [BLUE]}).encode()
    with socket.create_connection((host, int(port))) as leaving:
        leaving.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                        + payload)
        _when_encoding_starts(srv, before, concurrent.futures.Future())
    # The client is gone (its connection closed); both slots must serve at once.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = [pool.submit(http.post, "/api/generate", json={**body, "images": [image]})
                for image in (NOISE, BLUE)]
        replies = [future.result(timeout=120) for future in both]
    assert [reply.status_code for reply in replies] == [200, 200]
    assert replies[1].json().get("prompt_cached_count", 0) < 256
