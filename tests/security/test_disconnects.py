"""A request that goes away (client gone, cancelled, restarted under a constraint) must never
strand the requests waiting behind it.

The engine's loop used to sleep when no slot was busy although a request was waiting: a
cancelled request's slot is freed inside the decode step, with no command to wake the loop,
so the waiting request (and every later one) hung until a restart. These tests drive the
real worker over its socket with a tiny random-weight model, in every order of "a request
is waiting" and "the request in the slot goes away", and the real server with the real
model the way ``curl -sN ... | head -n1`` does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, RunningServer, default_model_server
from ggufgen import write_tiny_model
from pollama.runner.base import LoadSpec
from test_worker import WorkerClient

PROMPT_WAIT = 20.0  # far more than a tiny model needs for a few tokens; a hang is forever


def _finish(client: WorkerClient, req_id: int) -> tuple[str, dict]:
    text = []
    while True:
        message = client.next(req_id, timeout=PROMPT_WAIT)
        if message["type"] == "chunk":
            text.append(message["text"])
        else:
            return "".join(text), message


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=8192)


@pytest.fixture(params=[1, 2], ids=["parallel1", "parallel2"])
def worker(request: pytest.FixtureRequest, tiny_path: Path) -> Iterator[WorkerClient]:
    # Room enough that the endless requests are still running when they are cancelled.
    spec = LoadSpec(model_path=str(tiny_path), num_ctx=4096, num_parallel=request.param)
    client = WorkerClient(spec)
    yield client
    assert client.close() == 0


def _fill_slots(client: WorkerClient) -> list[int]:
    """One endless request per slot, each streaming already."""
    n = client.ready["info"]["n_parallel"]
    running = [client.start("hello", temperature=0) for _ in range(n)]  # never ends by itself
    for req_id in running:
        assert client.next(req_id, timeout=PROMPT_WAIT)["type"] == "chunk"
    return running


@pytest.mark.parametrize("order", ["queued-then-cancel", "cancel-then-queued", "together"])
def test_waiting_request_starts_when_a_running_one_is_cancelled(
    worker: WorkerClient, order: str
) -> None:
    running = _fill_slots(worker)
    victim, others = running[0], running[1:]
    if order == "queued-then-cancel":
        waiting = worker.start("world", temperature=1.0, seed=1, num_predict=3)
        time.sleep(0.05)  # the loop has seen it and found no free slot
        worker.send({"op": "cancel", "id": victim})
    elif order == "cancel-then-queued":
        worker.send({"op": "cancel", "id": victim})
        waiting = worker.start("world", temperature=1.0, seed=1, num_predict=3)
    else:  # the structured-output restart: cancel and submit in one write
        waiting = 10_000
        request = {"prompt": "world", "tokens": None, "options": {"num_predict": 3}}
        worker._queue(waiting)
        worker.sock.sendall(
            (json.dumps({"op": "cancel", "id": victim}) + "\n"
             + json.dumps({"op": "completion", "id": waiting, "request": request}) + "\n"
             ).encode()
        )  # fmt: skip
    _, done = _finish(worker, victim)
    assert done["type"] == "done" and done["done_reason"] == ""
    _, done = _finish(worker, waiting)
    assert (done["type"], done["done_reason"], done["eval_count"]) == ("done", "length", 3)
    for req_id in others:
        worker.send({"op": "cancel", "id": req_id})
        assert _finish(worker, req_id)[1]["type"] == "done"
    # and the worker is not stuck for anyone later
    _, done = worker.complete("again", num_predict=2)
    assert (done["done_reason"], done["eval_count"]) == ("length", 2)


def test_a_queue_of_waiting_requests_drains_after_a_cancel(worker: WorkerClient) -> None:
    running = _fill_slots(worker)
    waiting = [worker.start(f"w{i}", num_predict=2) for i in range(4)]
    time.sleep(0.05)
    for req_id in running:
        worker.send({"op": "cancel", "id": req_id})
    for req_id in waiting:
        _, done = _finish(worker, req_id)
        assert (done["done_reason"], done["eval_count"]) == ("length", 2)


# -- through the real server and the real model -------------------------------------------


@pytest.fixture(scope="module", params=["1", "2"], ids=["parallel1", "parallel2"])
def serial_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("disconnect-home")
    with default_model_server(home, {"OLLAMA_NUM_PARALLEL": request.param}) as running:
        yield running


def _long(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Count from one to a thousand.", "stream": stream,
            "options": {"num_predict": 2000, "temperature": 0, "num_ctx": 2048}}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_next_request_runs_after_a_streaming_client_reads_one_line_and_leaves(
    serial_server: RunningServer, route: str
) -> None:
    """``curl -sN .../api/generate | head -n1`` while others wait: the others finish."""
    body = _long(True)
    if route == "/api/chat":
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    n_parallel = int(serial_server.env["OLLAMA_NUM_PARALLEL"])
    holders = []
    for _ in range(n_parallel):  # every slot busy with a client that will leave
        client = httpx.Client(base_url=serial_server.url, timeout=60)
        response = client.send(client.build_request("POST", route, json=body), stream=True)
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
        holders.append((client, response))
    results: list[dict] = []

    def queued() -> None:
        short = {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}}
        results.append(httpx.post(serial_server.url + "/api/generate", json=short,
                                  timeout=60).json())  # fmt: skip

    waiter = threading.Thread(target=queued)
    waiter.start()
    time.sleep(0.5)  # queued behind the busy slots
    for client, response in holders:
        response.close()
        client.close()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "the queued request never started"
    assert results[0]["done"] is True and results[0]["eval_count"] > 0
    for _ in range(2):  # and nothing later hangs either
        again = httpx.post(serial_server.url + "/api/generate", timeout=30,
                           json={"model": MODEL, "prompt": "Yo", "stream": False,
                                 "options": {"num_predict": 3}})  # fmt: skip
        assert again.status_code == 200 and again.json()["done"] is True
