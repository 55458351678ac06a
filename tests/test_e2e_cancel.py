"""A client that gives up on a non-streamed answer cancels it (issue point 6), and requests
waiting for a slot show in ``pollama_queue_depth`` (point 8b): a real server, the real model.

The server runs one sequence at a time (``OLLAMA_NUM_PARALLEL=1``), so a generation that
goes on for a client long gone makes the next request wait for it. Greedy decoding of "Write
a very long story." runs to its 3,000-token budget (about a minute on 2 shared cores).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, RunningServer, default_model_server

pytestmark = pytest.mark.slow

STORY = "Write a very long story."
MESSAGES = [{"role": "user", "content": STORY}]
GREEDY_LONG = {"temperature": 0, "num_predict": 3000}
LONG_REQUESTS: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": MODEL, "prompt": STORY, "stream": False, "options": GREEDY_LONG},
    "/api/chat": {"model": MODEL, "messages": MESSAGES, "stream": False, "options": GREEDY_LONG},
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 3000,
                             "temperature": 0},
    "/v1/completions": {"model": MODEL, "prompt": STORY, "max_tokens": 3000, "temperature": 0},
    "/v1/messages": {"model": MODEL, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0},
}  # fmt: skip
SHORT = {"model": MODEL, "prompt": "Hi", "stream": False,
         "options": {"temperature": 0, "num_predict": 4}}  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("cancel-home")
    with default_model_server(home, {"OLLAMA_NUM_PARALLEL": "1"}) as running:
        yield running


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("path", list(LONG_REQUESTS))
def test_a_client_that_gives_up_cancels_its_generation(single: RunningServer, path: str) -> None:
    cancelled = _metric(single, "pollama_generations_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1.5 s and closes
        httpx.post(single.url + path, json=LONG_REQUESTS[path],
                   timeout=httpx.Timeout(30, read=1.5))  # fmt: skip
    started = time.monotonic()
    short = httpx.post(single.url + "/api/generate", json=SHORT, timeout=60)
    assert short.status_code == 200 and short.json()["done"] is True
    assert time.monotonic() - started < 10  # the abandoned one had most of a minute left
    assert _metric(single, "pollama_generations_total", outcome="cancelled") == cancelled + 1
    assert _metric(single, "pollama_http_requests_total", route=path, status="499") >= 1


def test_queue_depth_counts_requests_waiting_for_the_slot(single: RunningServer) -> None:
    answers: list[httpx.Response] = []
    body = {**LONG_REQUESTS["/api/generate"], "stream": True}
    with httpx.stream("POST", single.url + "/api/generate", json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a discarded iterator would close the stream
        assert '"done":false' in next(lines)  # it holds the only sequence now
        waiter = threading.Thread(target=lambda: answers.append(
            httpx.post(single.url + "/api/generate", json=SHORT, timeout=120)))  # fmt: skip
        waiter.start()
        deadline = time.monotonic() + 10
        while _metric(single, "pollama_queue_depth") < 1:
            assert time.monotonic() < deadline, "pollama_queue_depth never showed the waiter"
            time.sleep(0.1)
    waiter.join(60)  # closing the stream cancelled it: the waiter runs
    assert answers and answers[0].status_code == 200
    assert _metric(single, "pollama_queue_depth") == 0
