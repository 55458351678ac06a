"""The worker process (``runner/worker.py``) over a real socket pair, with the real default
model and tiny random-weight models, plus unit tests of the engine's pure pieces.

``WorkerClient`` is a minimal synchronous client of the protocol (the production one is
``runner/process.py``); ``tests/bench_worker.py`` reuses it to measure tokens per second.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggufgen import write_gguf, write_tiny_model
from pollama.default_model import default_gguf_path
from pollama.runner.base import LoadSpec
from pollama.runner.engine import StopMatcher, Utf8Decoder, fair_share
from pollama.runner.protocol import decode, encode
from pollama.runner.tokens import common_prefix
from pollama.runner.tuning import ThreadTuner

TIMEOUT = 60.0
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class WorkerClient:
    """Spawns ``python -m pollama.runner.worker`` on a socket pair; a reader thread routes
    each message to the queue of its ``id`` (``ready``/``fatal`` to ``control``)."""

    def __init__(self, spec: LoadSpec, env: dict[str, str] | None = None) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pollama.runner.worker",
                "--fd",
                str(child.fileno()),
                "--spec",
                json.dumps(spec.to_json()),
            ],
            pass_fds=[child.fileno()],
            env=env,
        )
        child.close()
        self.control: queue.Queue[dict[str, Any]] = queue.Queue()
        self.order: list[tuple[Any, str]] = []  # (id, type) of every message, as received
        self._queues: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 30))
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.control.get(timeout=TIMEOUT)

    def _queue(self, req_id: Any) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            return self._queues.setdefault(req_id, queue.Queue())

    def _read(self) -> None:
        try:
            with self.sock.makefile("rb") as stream:
                for line in stream:
                    message = decode(line)
                    if "id" not in message:
                        self.control.put(message)
                        continue
                    self.order.append((message["id"], message["type"]))
                    self._queue(message["id"]).put(message)
        except OSError:  # reset: the worker exited with our last message unread
            pass
        self.control.put({"type": "eof"})

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def start(self, prompt: str = "", tokens: list[int] | None = None, **options: Any) -> int:
        req_id = next(self._ids)
        request: dict[str, Any] = {"prompt": prompt, "tokens": tokens}
        for key in ("return_tokens", "logprobs", "top_logprobs", "format", "shift"):  # request
            if key in options:
                request[key] = options.pop(key)
        request["options"] = options
        self._queue(req_id)
        self.send({"op": "completion", "id": req_id, "request": request})
        return req_id

    def next(self, req_id: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._queue(req_id).get(timeout=timeout)

    def finish(self, req_id: int) -> tuple[str, dict[str, Any]]:
        """All the text of a request and its final message (``done`` or ``error``)."""
        text = []
        while True:
            message = self.next(req_id)
            if message["type"] == "chunk":
                text.append(message["text"])
            else:
                return "".join(text), message

    def complete(self, prompt: str = "", **options: Any) -> tuple[str, dict[str, Any]]:
        return self.finish(self.start(prompt, **options))

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        req_id = next(self._ids)
        self._queue(req_id)
        self.send({**message, "id": req_id})
        return self.next(req_id)

    def close(self) -> int:
        try:
            self.send({"op": "shutdown"})
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.sock.close()


def smol_spec(**kwargs: Any) -> LoadSpec:
    return LoadSpec(model_path=str(default_gguf_path()), **{"num_ctx": 1024, **kwargs})


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=512)


@pytest.fixture(scope="module")
def smol() -> Iterator[WorkerClient]:
    """The real model, four slots."""
    client = WorkerClient(smol_spec(num_parallel=4))
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[WorkerClient]:
    """A random-weight model with 64 tokens per slot, two slots."""
    client = WorkerClient(LoadSpec(model_path=str(tiny_path), num_ctx=64, num_parallel=2))
    yield client
    client.close()


# -- the engine's pure pieces ------------------------------------------------------------


def test_stop_matcher_holds_back_a_possible_stop_and_drops_it() -> None:
    m = StopMatcher(["</end>", "STOP"])
    assert m.push("Hello <") == ("Hello ", False)
    assert m.push("/en") == ("", False)
    assert m.push("d> tail") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.push("a </e") == ("a ", False)
    assert m.push("x") == ("</ex", False)  # not a stop after all: released
    assert m.push("ST") == ("ST", False)
    assert m.flush() == ""


def test_stop_matcher_earliest_stop_wins_and_flush_releases() -> None:
    m = StopMatcher(["bc", "abcd", ""])
    assert m.push("xxab") == ("xx", False)
    assert m.push("cd") == ("", True)  # "abcd" starts first
    m = StopMatcher(["\n\n"])
    assert m.push("line\n") == ("line", False)
    assert m.flush() == "\n"
    assert StopMatcher([]).push("any") == ("any", False)


def test_utf8_decoder_holds_incomplete_characters() -> None:
    d = Utf8Decoder()
    data = "é🙂".encode()
    assert d.push(data[:1]) == ""
    assert d.push(data[1:3]) == "é"
    assert d.push(data[3:5]) == ""
    assert d.push(data[5:]) == "🙂"
    assert d.push(b"\xf0\x9f") == ""
    assert d.flush() == "\ufffd"
    assert Utf8Decoder().push(b"\xff ok") == "\ufffd ok"


def test_fair_share_and_common_prefix() -> None:
    assert fair_share(512, [1000]) == [512]
    assert fair_share(512, [10, 1000, 1000]) == [10, 251, 251]
    assert fair_share(3, [5, 5, 5, 5]) == [1, 1, 1, 0]
    assert fair_share(100, [0, 7]) == [0, 7]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


class _Machine:
    """A fake clock and step times per thread count, for the thread tuner."""

    def __init__(self) -> None:
        self.now = 0.0
        self.threads = 2
        self.speed = {2: 0.010, 1: 0.018}
        self.sets: list[int] = []
        self.threads_used: list[int] = []  # per step

    def set(self, n: int) -> None:
        self.threads = n
        self.sets.append(n)

    def run(self, tuner: ThreadTuner, steps: int, rows: int | Sequence[int] = 1) -> None:
        shapes = [rows] if isinstance(rows, int) else list(rows)
        for i in range(steps):
            shape = shapes[i % len(shapes)]
            tuner.threads_for_step(shape)
            assert tuner.running == self.threads  # what the engine's short chunks ask
            seconds = self.speed[self.threads] * (1 + (shape - 1) / 3)  # 4 rows cost 2
            self.threads_used.append(self.threads)
            self.now += seconds
            tuner.record(shape, seconds)


def test_thread_tuner_drops_threads_under_contention_and_comes_back() -> None:
    machine = _Machine()
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    machine.run(tuner, 2000)  # an idle machine: tries one thread early, then rarely
    assert machine.sets == [1, 2, 1, 2] and tuner.current == 2
    machine.speed = {2: 0.200, 1: 0.030}  # a busy neighbour: two threads collapse
    machine.run(tuner, 10)
    assert tuner.current == 1 and machine.threads == 1
    machine.run(tuner, 300)  # probes of two threads fail, each after one step, less often
    retries = machine.sets.count(2)
    assert 2 <= retries <= 6 and tuner.current == 1
    machine.speed = {2: 0.010, 1: 0.018}  # the neighbour is gone
    machine.run(tuner, 2000)
    assert tuner.current == 2 and machine.threads == 2


def test_thread_tuner_keeps_threads_when_fewer_do_not_help() -> None:
    machine = _Machine()
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    machine.run(tuner, 50, rows=4)
    machine.speed = {2: 0.020, 1: 0.036}  # a longer context: both slower, two still best
    machine.run(tuner, 300, rows=4)
    assert tuner.current == 2 and machine.sets.count(1) == 2  # the early try, one on slowing
    tuner.interrupt()


def test_thread_tuner_is_not_fooled_by_batches_changing_shape() -> None:
    """Drafts and streams coming and going change the rows from one step to the next. A
    probe weighs each of its steps against the same shape's time, so a change of shape
    neither voids it nor starts another: before, every step after the first early try ran
    on one thread here (396 of 400 in a replay of a drafting request's shapes)."""
    drafting = [1, 17, 17, 5, 17]
    machine = _Machine()
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    machine.run(tuner, 2000, rows=drafting)  # an idle machine
    assert tuner.current == 2 and machine.threads_used.count(1) <= 40
    machine.speed = {2: 0.200, 1: 0.030}  # a busy neighbour: two threads collapse
    machine.threads_used.clear()
    machine.run(tuner, 200, rows=drafting)
    assert tuner.current == 1 and machine.threads_used.count(1) >= 180
    machine.speed = {2: 0.010, 1: 0.018}  # the neighbour is gone
    machine.run(tuner, 3000, rows=drafting)
    assert tuner.current == 2 and machine.threads == 2


def test_an_exploring_probe_runs_no_dear_step_on_fewer_threads() -> None:
    """The tries of fewer threads that nothing asked for (no slowdown seen) skip the steps
    that cost far more than the cheapest: a long draft's decode on one thread is a slow step
    for a probe that an idle machine does not need. Before, in a replay of a drafting
    request's shapes, a tenth of the time went to such steps."""
    drafting = [1, 1, 2, 16, 49, 49, 1, 3, 9, 45, 45, 1, 1, 64]
    machine = _Machine()
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    machine.run(tuner, 1400, rows=drafting)  # an idle machine, about a minute
    on_one = [rows for rows, n in zip(drafting * 100, machine.threads_used, strict=True) if n == 1]
    assert on_one and max(on_one) <= 4 and tuner.current == 2
    # a neighbour that arrives is still found, dear steps or not
    machine.speed = {2: 0.200, 1: 0.030}
    machine.run(tuner, 100, rows=drafting)
    assert tuner.current == 1


def test_an_interrupted_probe_waits_before_the_next() -> None:
    """Prompt chunks drop a running probe; prompts arriving at every step must not keep
    the decode on the probe's thread count."""
    machine = _Machine()
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    for _ in range(1000):  # 20 s of steps, a prompt chunk after each decode step
        machine.run(tuner, 1, rows=4)
        tuner.interrupt()
    assert machine.now == pytest.approx(20.0, rel=0.05)
    assert machine.threads_used.count(1) <= 21 and tuner.current == 2  # one a second at most


def test_thread_tuner_finds_a_neighbour_that_was_there_from_the_start() -> None:
    machine = _Machine()
    machine.speed = {2: 0.080, 1: 0.030}
    tuner = ThreadTuner(2, machine.set, clock=lambda: machine.now)
    machine.run(tuner, 30)
    assert tuner.current == 1
    assert ThreadTuner(1, machine.set).enabled is False


# -- the worker with tiny models ---------------------------------------------------------


def test_tiny_ready_and_context_full_ends_with_length(tiny: WorkerClient) -> None:
    info = tiny.ready["info"]
    assert tiny.ready["type"] == "ready"
    assert info["pid"] == tiny.proc.pid
    assert (info["n_ctx"], info["n_ctx_train"], info["n_parallel"]) == (64, 512, 2)
    assert info["n_vocab"] == 400 and info["memory_bytes"] > 0 and info["load_duration_ns"] > 0
    text, done = tiny.complete("hello world", temperature=0, shift=False)
    assert done["type"] == "done" and done["done_reason"] == "length"
    # the context holds the prompt and all generated tokens but the last one
    assert done["prompt_eval_count"] + done["eval_count"] == 64 + 1
    assert done["eval_duration_ns"] > 0 and done["prompt_eval_duration_ns"] > 0


def test_tiny_prompt_longer_than_context_is_invalid(tiny: WorkerClient) -> None:
    tokens = [300] * 70
    _, error = tiny.finish(tiny.start(tokens=tokens))
    assert error["type"] == "error" and error["kind"] == "invalid"
    assert "70" in error["message"] and "64" in error["message"]
    _, error = tiny.finish(tiny.start(tokens=[5, 100000]))
    assert error["kind"] == "invalid"


def test_tiny_num_predict_and_return_tokens(tiny: WorkerClient) -> None:
    tokens = tiny.call({"op": "tokenize", "text": "the cat", "add_special": True})["tokens"]
    _, done = tiny.complete("the cat", temperature=0.9, seed=3, num_predict=5, return_tokens=True)
    assert (done["done_reason"], done["eval_count"]) == ("length", 5)
    assert done["tokens"][: len(tokens)] == tokens and len(done["tokens"]) == len(tokens) + 5
    _, done = tiny.complete("the cat", num_predict=0)
    assert (done["done_reason"], done["eval_count"]) == ("length", 0)


def test_tiny_cancel_frees_the_slot(tiny_path: Path) -> None:
    client = WorkerClient(LoadSpec(model_path=str(tiny_path), num_ctx=512, num_parallel=1))
    try:
        first = client.start("hello", temperature=0)  # repeats one token, never EOS
        queued = client.start("world", temperature=1.0, seed=1, num_predict=3)
        assert client.next(first)["type"] == "chunk"
        client.send({"op": "cancel", "id": queued})  # still waiting for the only slot
        client.send({"op": "cancel", "id": first})
        _, done = client.finish(first)
        assert done["type"] == "done" and done["done_reason"] == ""
        _, done = client.finish(queued)
        assert done["type"] == "done" and done["done_reason"] == "" and done["eval_count"] == 0
        _, done = client.complete("again", num_predict=4)  # the slot is free again
        assert (done["done_reason"], done["eval_count"]) == ("length", 4)
    finally:
        assert client.close() == 0


@pytest.mark.slow
def test_tiny_new_conversation_does_not_take_a_cached_slot(tiny_path: Path) -> None:
    client = WorkerClient(LoadSpec(model_path=str(tiny_path), num_ctx=256, num_parallel=2))
    try:
        first = "the cat is blue and the dog is red"
        _, done = client.complete(first, temperature=0, num_predict=4)
        assert done["prompt_cached"] == 0
        # shares only BOS with the first: goes to the empty slot, not the cached one
        other = " ".join(["yes no why sky"] * 8)
        _, done = client.complete(other, temperature=0, num_predict=4)
        assert done["prompt_cached"] == 0
        _, done = client.complete(first + " and green", temperature=0, num_predict=4)
        assert done["prompt_cached"] >= len(first.split())
        _, done = client.complete(other + " no", temperature=0, num_predict=4)
        assert done["prompt_cached"] >= 16
    finally:
        assert client.close() == 0


def write_lora(path: Path, n_embd: int = 64, n_ff: int = 128, rank: int = 4) -> Path:
    """A LoRA adapter GGUF for ``write_tiny_model``'s defaults (two layers)."""
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(2):
        for name, n_out in (("attn_q", n_embd), ("ffn_up", n_ff)):
            a = rng.normal(0, 1, (rank, n_embd)).astype(np.float32)
            tensors[f"blk.{i}.{name}.weight.lora_a"] = a
            tensors[f"blk.{i}.{name}.weight.lora_b"] = rng.normal(0, 1, (n_out, rank)).astype(
                np.float32
            )
    kv = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    return write_gguf(path, {**kv, "adapter.lora.alpha": float(rank)}, tensors)


@pytest.mark.slow
def test_tiny_lora_adapter_changes_the_output(tiny_path: Path, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "lora.gguf")
    outputs = []
    for adapters in ((), (str(lora),)):
        spec = LoadSpec(model_path=str(tiny_path), num_ctx=64, adapters=adapters)
        client = WorkerClient(spec)
        try:
            outputs.append(client.complete("hello world the cat", temperature=0, num_predict=8))
        finally:
            assert client.close() == 0
    assert outputs[0][0] != outputs[1][0]
    client = WorkerClient(LoadSpec(str(tiny_path), num_ctx=64, adapters=(str(tmp_path / "no"),)))
    assert client.ready["type"] == "fatal" and "adapter" in client.ready["message"]
    assert client.close() == 1


@pytest.mark.slow
def test_tiny_kv_cache_types(tmp_path: Path) -> None:
    """q8_0 halves the KV cache with flash attention on (or auto); off, or with heads that
    quantized blocks do not divide, it falls back to f16 instead of failing the load."""
    model = write_tiny_model(tmp_path / "h32.gguf", n_head=2, context_length=512)  # heads of 32
    memory = {}
    for kv, fa in (("f16", True), ("q8_0", True), ("q8_0", None), ("q8_0", False)):
        client = WorkerClient(
            LoadSpec(str(model), num_ctx=512, kv_cache_type=kv, flash_attention=fa)
        )
        try:
            memory[kv, fa] = client.ready["info"]["memory_bytes"]
            _, done = client.complete("hello world", temperature=0, num_predict=4)
            assert done["eval_count"] == 4
        finally:
            assert client.close() == 0
    assert memory["q8_0", True] < memory["f16", True]
    assert memory["q8_0", None] == memory["q8_0", True]
    assert memory["q8_0", False] > memory["q8_0", True]
    client = WorkerClient(LoadSpec(str(model), num_ctx=64, kv_cache_type="q5_9"))
    assert client.ready["type"] == "fatal" and "q5_9" in client.ready["message"]
    assert client.close() == 1


def stream(client: WorkerClient, req_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A request's chunk messages and its final message."""
    chunks = []
    while (message := client.next(req_id))["type"] == "chunk":
        chunks.append(message)
    return chunks, message


def check_entries(entries: list[dict[str, Any]], n_top: int) -> None:
    """What every logprob entry must be: a log-probability, ``n_top`` alternatives most
    likely first, ``bytes`` the token text's bytes."""
    for entry in entries:
        assert entry["logprob"] <= 0 and math.isfinite(entry["logprob"])
        top = entry["top_logprobs"]
        assert len(top) == n_top
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
        for item in (entry, *top):
            assert bytes(item["bytes"]).decode("utf-8", "replace") == item["token"]


def test_tiny_logprobs_go_with_the_text_that_carries_their_token(tiny_path: Path) -> None:
    """Random byte tokens split characters: an entry waits for its character's last byte,
    so the entries sent so far always decode to exactly the text sent so far."""
    client = WorkerClient(LoadSpec(model_path=str(tiny_path), num_ctx=256, num_parallel=1))
    try:
        split = 0
        for seed in (0, 1):
            req = client.start("hello world", temperature=1.5, top_k=0, top_p=1.0, seed=seed,
                               num_predict=60, logprobs=True, top_logprobs=5)
            chunks, done = stream(client, req)
            text, data = "", b""
            for chunk in chunks:
                text += chunk["text"]
                data += b"".join(bytes(e["bytes"]) for e in chunk.get("logprobs", []))
                assert data.decode("utf-8", "replace") == text
                split += len(chunk.get("logprobs", [])) > 1
                check_entries(chunk.get("logprobs", []), 5)
            assert sum(len(c.get("logprobs", [])) for c in chunks) == done["eval_count"] == 60
        assert split  # characters were split over tokens (else this test proves nothing)
        chunks, _ = stream(client, client.start("hello world", num_predict=4))
        assert not any("logprobs" in c for c in chunks)  # not asked: not computed
        _, error = stream(client, client.start("hi", logprobs=True, top_logprobs=21))
        assert error["kind"] == "invalid" and "between 0 and 20" in error["message"]
    finally:
        client.close()


def test_bad_model_path_is_fatal(tmp_path: Path) -> None:
    client = WorkerClient(LoadSpec(model_path=str(tmp_path / "missing.gguf"), num_ctx=64))
    assert client.ready["type"] == "fatal" and "missing.gguf" in client.ready["message"]
    assert client.close() == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    client = WorkerClient(LoadSpec(model_path=str(junk), num_ctx=64))
    assert client.ready["type"] == "fatal" and client.ready["message"]
    assert client.close() == 1


def test_worker_exits_when_the_parent_closes_its_socket(tiny_path: Path) -> None:
    client = WorkerClient(LoadSpec(model_path=str(tiny_path), num_ctx=512))
    client.start("hello", temperature=0)  # busy generating when the parent goes away
    time.sleep(0.2)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.sock.close()
    assert client.proc.wait(timeout=TIMEOUT) == 0


# -- the worker with the real model ------------------------------------------------------


@pytest.mark.slow
def test_smol_ready_info(smol: WorkerClient) -> None:
    info = smol.ready["info"]
    size = os.path.getsize(default_gguf_path())
    assert (info["n_ctx"], info["n_ctx_train"], info["n_parallel"]) == (1024, 8192, 4)
    assert info["n_vocab"] == 49152
    assert size < info["memory_bytes"] < 4 * size + 4096 * 23_040 * 2


def _messages(client: WorkerClient, req_id: int) -> list[dict[str, Any]]:
    out = [client.next(req_id)]
    while out[-1]["type"] == "chunk":
        out.append(client.next(req_id))
    return out


@pytest.mark.slow
def test_smol_text_is_sent_in_frames_and_logprobs_a_token_each(smol: WorkerClient) -> None:
    """A fast stream's text reaches the server at most once a ``FRAME_INTERVAL`` (the first
    token at once), all of it before ``done``; with logprobs every token is its own chunk."""
    from pollama.runner.worker import FRAME_INTERVAL

    prompt = CHAT.format("Write a long story about a lighthouse keeper.")
    options = {"temperature": 0, "num_predict": 120}
    messages = _messages(smol, smol.start(prompt, **options))
    chunks, done = messages[:-1], messages[-1]
    n = done["eval_count"]
    assert done["type"] == "done" and n >= 60
    assert 1 < len(chunks) < n  # several tokens a frame
    assert FRAME_INTERVAL <= 0.1
    framed = "".join(c["text"] for c in chunks)
    with_logprobs = _messages(smol, smol.start(prompt, **options, logprobs=True))
    assert len(with_logprobs) - 1 == n
    assert all(len(c["logprobs"]) == 1 for c in with_logprobs[:-1])
    assert "".join(c["text"] for c in with_logprobs[:-1]) == framed


@pytest.mark.slow
def test_smol_same_seed_same_text(smol: WorkerClient) -> None:
    prompt = CHAT.format("Name three colors.")
    runs = [smol.complete(prompt, temperature=0.9, seed=1234, num_predict=24) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and runs[0][0]
    assert runs[1][1]["prompt_cached"] == runs[1][1]["prompt_eval_count"] - 1


@pytest.mark.slow
def test_smol_stop_string_split_across_tokens(smol: WorkerClient) -> None:
    prompt = CHAT.format("Tell me a story about a dragon.")
    full, done = smol.complete(prompt, temperature=0, num_predict=30, return_tokens=True)
    assert done["done_reason"] == "length"
    pieces = [smol.call({"op": "detokenize", "tokens": [t]})["text"] for t in done["tokens"]]
    generated = pieces[done["prompt_eval_count"] :]
    # a stop string made of the end of one token and the start of the next few
    i = next(i for i in range(4, len(generated)) if len(generated[i - 1]) >= 2)
    stop = generated[i - 1][-2:] + generated[i] + generated[i + 1]
    text, done = smol.complete(prompt, temperature=0, num_predict=30, stop=[stop, "zzzz"])
    assert done["done_reason"] == "stop"
    assert text == full[: full.index(stop)]


@pytest.mark.slow
def test_smol_four_streams_interleave(smol: WorkerClient) -> None:
    prompts = ["Write a poem.", "Count to twenty.", "Describe the sea.", "List some fruits."]
    # the first is generating (its first token is sent at once, later text in frames of
    # FRAME_INTERVAL) and has far more to go than the others' prompts and 12 tokens
    first = smol.start(CHAT.format(prompts[0]), temperature=0, num_predict=200)
    assert smol.next(first)["type"] == "chunk"
    others = [smol.start(CHAT.format(p), temperature=0, num_predict=12) for p in prompts[1:]]
    results = [smol.finish(req) for req in [first, *others]]
    assert all(done["type"] == "done" for _, done in results)
    order = smol.order
    first_done = order.index((first, "done"))
    assert order.index((others[0], "chunk")) < first_done  # not queued behind the first
    assert order.index((others[0], "done")) < first_done


@pytest.mark.slow
def test_smol_prompt_cache_on_a_follow_up(tmp_path: Path) -> None:
    client = WorkerClient(smol_spec(num_parallel=1))
    try:
        story = " ".join(f"Fact {i}: the number {i} comes after {i - 1}." for i in range(1, 17))
        turn1 = CHAT.format(story + " Summarize.")
        reply, done1 = client.complete(turn1, temperature=0, num_predict=8)
        turn2 = turn1 + reply + "<|im_end|>\n" + CHAT.format("Thanks. And then?")
        _, cached = client.complete(turn2, temperature=0, num_predict=4)
        assert cached["prompt_cached"] >= done1["prompt_eval_count"]
        client.complete("Unrelated.", num_predict=1)  # overwrites the only slot
        _, cold = client.complete(turn2, temperature=0, num_predict=4)
        assert cold["prompt_cached"] < 5
        assert cached["prompt_eval_duration_ns"] < cold["prompt_eval_duration_ns"]
    finally:
        assert client.close() == 0


@pytest.mark.slow
def test_smol_tokenize_detokenize_round_trip(smol: WorkerClient) -> None:
    text = "Hello, wörld! 🙂 <|im_end|> tabs\tand\nnewlines"
    tokens = smol.call({"op": "tokenize", "text": text, "add_special": False})["tokens"]
    assert 2 in tokens  # <|im_end|> parsed as the special token
    assert smol.call({"op": "detokenize", "tokens": tokens})["text"] == text
    bad = smol.call({"op": "detokenize", "tokens": [10**9]})
    assert bad["type"] == "error" and bad["kind"] == "invalid"


@pytest.mark.slow
def test_smol_greedy_logprobs_choose_the_top_token(smol: WorkerClient) -> None:
    prompt = CHAT.format("Tell me about the moon.")
    chunks, done = stream(smol, smol.start(prompt, temperature=0, num_predict=40,
                                           logprobs=True, top_logprobs=3))
    entries = [e for c in chunks for e in c.get("logprobs", [])]
    assert len(entries) == done["eval_count"] == 40
    check_entries(entries, 3)
    for entry in entries:
        best = entry["top_logprobs"][0]
        assert (best["token"], best["logprob"]) == (entry["token"], entry["logprob"])
    assert "".join(e["token"] for e in entries) == "".join(c["text"] for c in chunks)
    # no alternatives asked: the entries alone
    chunks, _ = stream(smol, smol.start(prompt, temperature=0, num_predict=5, logprobs=True))
    assert [e["top_logprobs"] for c in chunks for e in c.get("logprobs", [])] == [[]] * 5


@pytest.mark.slow
def test_smol_stop_string_drops_the_entries_it_swallowed(smol: WorkerClient) -> None:
    prompt = CHAT.format("Tell me a story about a dragon.")
    chunks, _ = stream(smol, smol.start(prompt, temperature=0, num_predict=30, logprobs=True))
    tokens = [e["token"] for c in chunks for e in c.get("logprobs", [])]
    full = "".join(c["text"] for c in chunks)
    # a stop string made of the end of one token and the whole of the next two
    i = next(i for i in range(4, len(tokens) - 2) if len(tokens[i - 1].strip()) >= 2)
    stop = tokens[i - 1][-2:] + tokens[i] + tokens[i + 1]
    chunks, done = stream(smol, smol.start(prompt, temperature=0, num_predict=30,
                                           stop=["zzzz", stop], logprobs=True))
    text = "".join(c["text"] for c in chunks)
    kept = [e["token"] for c in chunks for e in c.get("logprobs", [])]
    assert (done["done_reason"], done["stop_sequence"]) == ("stop", stop)
    assert text == full[: full.index(stop)]
    # the token that began the stop string stays (part of it is in the text), the two that
    # were all stop string are dropped
    assert kept == tokens[:i] and done["eval_count"] == len(kept) + 2
    assert "".join(kept) == text + tokens[i - 1][-2:]
    _, natural = stream(smol, smol.start(prompt, temperature=0, num_predict=3, stop=["zzzz"]))
    assert natural["stop_sequence"] == ""


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 11}])
def test_smol_logprobs_are_measured_before_the_grammar_mask(
    smol: WorkerClient, sampling: dict[str, Any]
) -> None:
    """JSON output: the grammar overrides the model's favourite tokens (when sampling, by
    setting their logits to -inf in place), and the entries still show the model's own
    distribution (a masked one would make "{" the only, certain, first token)."""
    prompt = CHAT.format("Name a color.")
    chunks, done = stream(smol, smol.start(prompt, num_predict=20, logprobs=True,
                                           top_logprobs=3, format="json", **sampling))
    entries = [e for c in chunks for e in c.get("logprobs", [])]
    assert done["done_reason"] == "stop" and len(entries) == done["eval_count"]
    check_entries(entries, 3)
    assert entries[0]["token"] == "{"
    assert entries[0]["top_logprobs"][0]["token"] != "{"
    assert entries[0]["logprob"] < entries[0]["top_logprobs"][0]["logprob"]


def test_the_emitter_holds_text_between_frames_and_flushes_it_before_the_rest() -> None:
    """``_Emitter`` with a clock: the first token at once, the next ones held until a frame
    is due, and what is held always sent before an error, a logprob chunk or the end."""
    from pollama.runner.base import CompletionChunk
    from pollama.runner.engine import RequestFailed
    from pollama.runner.logprobs import Logprob
    from pollama.runner.worker import FRAME_INTERVAL, _Emitter

    class Sink:
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        def send(self, message: dict[str, Any]) -> bool:
            self.sent.append(message)
            return True

    sink = Sink()
    emit = _Emitter(sink, 5)  # type: ignore[arg-type]
    for text in ("a", "b", "c"):
        assert emit(CompletionChunk(text=text))
    assert [m["text"] for m in sink.sent] == ["a"]  # b and c wait for the next frame
    emit.sent -= FRAME_INTERVAL  # the frame is due
    emit(CompletionChunk(text="d"))
    assert [m["text"] for m in sink.sent] == ["a", "bcd"]
    emit(CompletionChunk(text="e"))
    entry = Logprob(token="f", logprob=-0.5, bytes=[102], top_logprobs=[])
    emit(CompletionChunk(text="f", logprobs=[entry]))
    assert [m["text"] for m in sink.sent][-2:] == ["e", "f"]
    emit(CompletionChunk(text="g"))
    emit(RequestFailed("internal", "boom"))
    assert sink.sent[-2] == {"id": 5, "type": "chunk", "text": "g"}
    assert sink.sent[-1]["type"] == "error"
    done = Sink()
    emit = _Emitter(done, 6)  # type: ignore[arg-type]
    emit(CompletionChunk(text="x"))
    emit(CompletionChunk(text="y"))
    emit(CompletionChunk(done=True, done_reason="stop"))
    assert [m["type"] for m in done.sent] == ["chunk", "chunk", "done"]
    assert done.sent[1]["text"] == "y"
