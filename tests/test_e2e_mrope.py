"""End to end: an M-RoPE model (the Qwen2-VL family) sees images, through a real server.

The model and its projector are tiny random-weight Qwen2-VL files written at test time
(``tiny_qwen2vl.py``): an image of nx × ny merged patches is nx * ny rows that take only
max(nx, ny) positions, with 2-D positions of their own. What proves the engine's positions
right is llama.cpp itself: ``mrope_reference.py`` evaluates the same prompt with llama.cpp's
helper (``mtmd_helper_eval_chunks``, which positions text, image rows and the text after
them as llama.cpp means them to be) in a process of its own, and the server's answer and
log-probabilities must be that answer's. With the text after an image placed one position
off, the log-probabilities differ in the second decimal.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RunningServer, start_server, stop_server
from imagegen import b64, encoded
from tiny_qwen2vl import image_rows, write_qwen2vl_model, write_qwen2vl_projector

pytestmark = pytest.mark.slow

MODEL = "qseer"
TOLERANCE = 1e-3  # the log-probabilities of both agree to 1e-6; one position off, to 5e-2
# A cached prefix changes how the rest is batched, and so the rounding (F16 inside flash
# attention): a text-only follow-up's log-probabilities already move by 1e-2 from a cold one.
CACHE_NOISE = 3e-2
RED = encoded("PNG", (32, 24), (255, 0, 0))  # 4 x 3 merged patches: 12 rows, 4 positions
BLUE = encoded("PNG", (32, 24), (0, 0, 255))
SQUARE = encoded("PNG", (32, 32), (0, 160, 60))  # 16 rows
TALL = encoded("PNG", (96, 72), (40, 90, 200))  # 12 x 9: 108 rows, several decodes of 32
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("qwen2vl-files")
    return write_qwen2vl_model(home / "q.gguf"), write_qwen2vl_projector(home / "mmproj.gguf")


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, files: tuple[Path, Path]
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("qwen2vl-home")
    running = start_server(home, {"OLLAMA_NUM_PARALLEL": "2"})
    try:
        modelfile = home / "Modelfile"
        modelfile.write_text(f"FROM {files[0]}\nFROM {files[1]}\n")
        running.cli("create", MODEL, "-f", str(modelfile), check=True, timeout=300)
        yield running
    finally:
        stop_server(running)


def _options(n: int = 10) -> dict[str, Any]:
    return {"temperature": 0, "num_predict": n}


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json={"model": MODEL, "stream": False, "logprobs": True,
                                     "top_logprobs": 3, "options": _options(), **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _generate(http: httpx.Client, images: list[bytes], prompt: str = "Describe it.",
              **extra: Any) -> dict[str, Any]:
    return _post(http, "/api/generate",
                 {"prompt": prompt, "images": [b64(image) for image in images], **extra})


def _chat(http: httpx.Client, image: bytes, *follow_ups: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is it?", "images": [b64(image)]}]
    for text in follow_ups:
        messages += [{"role": "assistant", "content": "A picture."},
                     {"role": "user", "content": text}]
    return _post(http, "/api/chat", {"messages": messages})


def _top(reply: dict[str, Any]) -> list[list[float]]:
    return [[alt["logprob"] for alt in entry["top_logprobs"]] for entry in reply["logprobs"]]


def _same(a: list[list[float]], b: list[list[float]], tolerance: float = TOLERANCE) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= tolerance for row_a, row_b in zip(a, b, strict=True)
        for x, y in zip(row_a, row_b, strict=True))


def _cached(reply: dict[str, Any]) -> int:
    return int(reply.get("prompt_cached_count", 0))


def _unload(http: httpx.Client) -> None:
    http.post("/api/generate", json={"model": MODEL, "keep_alive": 0})


def _reference(files: tuple[Path, Path], tmp: Path, prompt: str,
               images: list[bytes]) -> dict[str, Any]:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp / f"image-{i}.png")
        paths[-1].write_bytes(image)
    script = Path(__file__).with_name("mrope_reference.py")
    done = subprocess.run(
        [sys.executable, str(script), str(files[0]), str(files[1]), prompt, "10",
         *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_image_reaches_the_model_with_its_rows_counted(http: httpx.Client) -> None:
    red, blue, again = (_generate(http, [image]) for image in (RED, BLUE, RED))
    assert red["response"] != blue["response"]
    assert red["response"] == again["response"] and _same(_top(red), _top(again))
    square = _generate(http, [SQUARE])
    rows = image_rows(32, 32)[0] - image_rows(32, 24)[0]
    assert square["prompt_eval_count"] == red["prompt_eval_count"] + rows


def test_answers_are_llama_cpps_own(http: httpx.Client, files: tuple[Path, Path],
                                    tmp_path: Path) -> None:
    """Two images of different grids in one message, text between and after them: the
    server answers exactly as llama.cpp's own evaluation of the prompt does."""
    prompt = CHAT.format("Look at [img-0] and then at [img-1], now tell me")
    images = [RED, TALL]
    reply = _generate(http, images, prompt, raw=True)
    expected = _reference(files, tmp_path, prompt, images)
    assert reply["response"] == expected["text"]
    assert _same(_top(reply), expected["logprobs"]), (_top(reply), expected["logprobs"])
    swapped = _generate(http, images, CHAT.format("Look at [img-1] and then at [img-0], "
                                                  "now tell me"), raw=True)
    assert not _same(_top(swapped), _top(reply))  # the order of the images matters


def test_a_follow_up_is_served_from_the_cache_as_from_an_empty_one(
    http: httpx.Client,
) -> None:
    """The first turn, image included, comes from the cache, and the text after it sits
    where it would on an empty cache; so does a follow-up that cuts the cache after the
    image (``seq_rm`` at a position: cut at the index, stale cells past the cut would make
    llama.cpp refuse the next tokens, whose M-RoPE positions must pass every cell's)."""
    _unload(http)
    cold = _chat(http, RED, "Tell me more.")
    _unload(http)
    cold_other = _chat(http, RED, "Anything else?")
    _unload(http)
    first = _chat(http, RED)
    follow = _chat(http, RED, "Tell me more.")
    assert _cached(follow) >= first["prompt_eval_count"] - 1
    assert follow["message"]["content"] == cold["message"]["content"]
    assert _same(_top(follow), _top(cold), CACHE_NOISE)
    other = _chat(http, RED, "Anything else?")  # cut inside the second user turn
    assert _cached(other) > first["prompt_eval_count"]
    assert other["message"]["content"] == cold_other["message"]["content"]
    assert _same(_top(other), _top(cold_other), CACHE_NOISE)
    blue = _chat(http, BLUE, "Tell me more.")  # a different image is never served cached
    assert _cached(blue) < first["prompt_eval_count"] - image_rows(32, 24)[0]


def test_an_image_decoded_in_pieces_while_another_streams_answers_as_alone(
    http: httpx.Client,
) -> None:
    """While another sequence generates, an image's rows go 32 per step (each piece at its
    own rows' positions): the answer is the one the image gets decoded in one go."""
    prompt = "Describe it."
    _unload(http)
    alone = _generate(http, [TALL], prompt)
    _unload(http)
    body = {"model": MODEL, "prompt": "Count to a hundred.", "stream": True,
            "options": _options(1000)}
    with http.stream("POST", "/api/generate", json=body) as streaming:
        lines = streaming.iter_lines()
        next(lines)  # the other sequence is generating
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            beside = pool.submit(_generate, http, [TALL], prompt).result(timeout=300)
        for _ in lines:
            pass
    assert beside["response"] == alone["response"]
    assert _same(_top(beside), _top(alone), CACHE_NOISE)
