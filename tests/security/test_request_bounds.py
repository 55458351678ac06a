"""No option, prompt or input makes a request cost the machine more than its context is
worth: tried through the real server with the real model, reading the worker's memory and
threads from ``/proc``, and at the unit level where the bound is computed.

* load options that only make llama.cpp allocate or spawn (``num_batch``, ``num_thread``)
  are clamped to the context and the CPUs present; ``repeat_last_n`` to the context;
* a prompt (or chat, or ``context``) far longer than the context is refused with both
  counts before the worker sees it; an embedding input is cut first (``truncate``) or
  refused; the worker stays up and small;
* special-token text tokenizes in linear time, with the same tokens;
* the ``stop`` list and a ``format`` schema have limits, and a schema the grammar engine
  gives up on is a short 400, not a 500 carrying the grammar.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, RunningServer, default_model_server
from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import serving
from pollama.config import Settings
from pollama.default_model import default_gguf_path
from pollama.errors import InvalidOption
from pollama.inference.bounds import TokenFloor
from pollama.options import MAX_STOP_CHARS, MAX_STOPS, coerce_options, format_params
from pollama.runner.base import SamplingOptions, usable_cpus
from pollama.runner.engine import StopMatcher
from pollama.runner.textsplit import SpecialSplitter

MiB = 1 << 20


# -- units -----------------------------------------------------------------------------------


def test_token_floor_never_exceeds_a_real_count() -> None:
    floor = TokenFloor(max_token_bytes=10)
    assert floor.of("short") == 0  # short texts always go to the tokenizer
    text = "x" * 100_000
    assert floor.of(text) == 10_000
    assert TokenFloor(0).of(text) == 0  # unknown: never refuses
    cut = floor.cut("é" * 100_000, 100)  # kept whole characters, enough for 100 tokens
    assert cut == "é" * len(cut) and len(cut.encode()) <= 2 * 101 * 10
    assert len(cut.encode()) >= 2 * 101 * 10 - 1
    assert floor.cut("abc", 100) == "abc"


def test_stop_list_limits_for_requests_and_modelfiles() -> None:
    coerce_options({"stop": ["x"] * MAX_STOPS})
    with pytest.raises(InvalidOption, match=f"at most {MAX_STOPS} strings"):
        coerce_options({"stop": ["x"] * (MAX_STOPS + 1)})
    with pytest.raises(InvalidOption, match=f"at most {MAX_STOP_CHARS} characters"):
        coerce_options({"stop": ["y" * (MAX_STOP_CHARS + 1)]})
    with pytest.raises(InvalidOption, match="at most"):
        format_params({"stop": ["z"] * (MAX_STOPS + 1)})


def _naive_hold(pending: str, stops: list[str]) -> int:
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:k]):
                hold = k
                break
    return hold


def test_stop_matcher_holds_exactly_what_the_plain_rule_holds() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 3))]  # fmt: skip
        matcher = StopMatcher(stops)
        sent, held_before = "", ""
        for _ in range(6):
            text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            pending = held_before + text
            out, stopped = matcher.push(text)
            if stopped:
                break
            assert len(pending) - len(out) == _naive_hold(pending, stops)
            sent += out
            held_before = pending[len(out):]


def test_a_long_stop_list_costs_little_per_token() -> None:
    stops = [("ab" * 256)[: MAX_STOP_CHARS - i] for i in range(MAX_STOPS)]
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for _ in range(200):
        matcher.push("a")
    assert time.perf_counter() - start < 1.0  # was ~0.2 s a token with slices per length


def test_build_sampler_clamps_the_penalty_window_to_the_context() -> None:
    from pollama.runner import llama  # noqa: F401  (loads llama.cpp in this process)
    from pollama.runner.engine import build_sampler

    opts = SamplingOptions(repeat_penalty=1.1, repeat_last_n=2**31 - 1)
    chain, history = build_sampler(opts, n_vocab=49152, n_ctx=512)
    chain.close()
    assert history == 512


@pytest.fixture(scope="module")
def smol_vocab() -> Iterator[object]:
    from pollama.runner import llama

    sink = llama.LogSink()
    llama.backend_init()
    model = llama.Model(str(default_gguf_path()))
    try:
        yield model
    finally:
        model.close()
        sink.close()


def test_special_token_text_tokenizes_in_linear_time_with_the_same_tokens(
    smol_vocab: object,
) -> None:
    model = smol_vocab
    text = "<|im_start|>" * (1_000_000 // 12)
    start = time.perf_counter()
    tokens = model.tokenize(text)  # type: ignore[attr-defined]
    assert time.perf_counter() - start < 2.0  # 11 s in one llama_tokenize call
    assert tokens == [1] * len(tokens) and len(tokens) == 1_000_000 // 12
    rng = random.Random(3)
    words = ["<|im_start|>", "<|im_end|>", " ", "\n", "hello", " world", "<file_sep>", "é",
             "  ", "<jupyter_code>", "x", "\n\n"]  # fmt: skip
    for _ in range(10):
        text = "".join(rng.choice(words) for _ in range(rng.randint(5000, 15000)))
        assert model.tokenize(text) == model._tokenize(text, True, True)  # type: ignore[attr-defined]


def test_splitter_never_cuts_before_a_token_that_strips_the_space_before_it() -> None:
    splitter = SpecialSplitter.of([("<s>", True), ("<t>", False)])
    text = "a" * 40 + " <s>" + "b" * 10 + "<s>" + "c" * 10 + " <t>" + "d"
    pieces = list(splitter.pieces(text, size=20))
    assert "".join(pieces) == text
    for piece in pieces[1:]:
        assert piece.startswith(("<s>", "<t>"))
    starts = [len("".join(pieces[:i])) for i in range(1, len(pieces))]
    assert all(not (text.startswith("<s>", at) and text[at - 1] == " ") for at in starts)


def test_prompts_fit_the_context_the_worker_made_not_the_requested_one(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker may make a smaller context than ``num_ctx`` asks (the model's own limits):
    fitting and truncation follow what it reports, so nothing overflows it."""
    factory = FakeRunnerFactory(n_ctx=64)  # the fake counts one token a byte, plus BOS
    gguf = write_tiny_model(tmp_path / "m.gguf")
    with serving(settings, factory, {gguf: {"m": {"template": "{{ .Prompt }}"}}}) as api:
        body = {"model": "m", "prompt": "x" * 100, "raw": True, "stream": False,
                "options": {"num_ctx": 4096}}  # fmt: skip
        response = api.post("/api/generate", json=body)
        assert response.status_code == 400
        assert "101 tokens" in response.json()["error"]
        assert "(num_ctx) is 64 tokens" in response.json()["error"]
        body["prompt"] = "x" * 60
        assert api.post("/api/generate", json=body).status_code == 200


# -- through the real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("bounds-home")
    with default_model_server(home, {"OLLAMA_NUM_PARALLEL": "1"}) as running:
        yield running


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def _worker(server: RunningServer) -> int:
    pids = _children(server.process.pid)
    assert len(pids) == 1, pids
    return pids[0]


def _generate(server: RunningServer, timeout: float = 120, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "Say hi.", "stream": False, **body}
    return httpx.post(server.url + "/api/generate", json=payload, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{"repeat_last_n": 2**31 - 1, "repeat_penalty": 1.1}, {"num_batch": 16_777_216},
     {"num_thread": 4096}],  # fmt: skip
    ids=["repeat_last_n", "num_batch", "num_thread"],
)
def test_absurd_options_cost_no_more_than_sane_ones(
    bounded_server: RunningServer, options: dict[str, int]
) -> None:
    started = time.monotonic()
    response = _generate(bounded_server, options={"num_predict": 8, **options})
    assert response.status_code == 200, response.text
    assert response.json()["eval_count"] > 0
    assert time.monotonic() - started < 60  # num_thread 4096: 183 s for 8 tokens
    status = _status(_worker(bounded_server))
    assert status["VmHWM"] < 1024 * 1024, status  # kB: 8.5 GB and 3.8 GB before
    assert status["Threads"] <= usable_cpus() + 16, status  # 4,097 before
    ps = httpx.get(bounded_server.url + "/api/ps").json()["models"][0]
    assert ps["size"] >= status["VmRSS"] * 1024 * 0.5  # what /api/ps says is about real


@pytest.mark.slow
@pytest.mark.parametrize("route", ["generate", "raw", "chat", "context"])
def test_a_prompt_far_over_the_context_is_refused_before_the_worker_holds_it(
    bounded_server: RunningServer, route: str
) -> None:
    _generate(bounded_server, options={"num_predict": 1})  # loaded with the plain options
    pid = _worker(bounded_server)
    before = _status(pid)["VmRSS"]
    huge = "word " * (6 * MiB)  # 30 MB, under the 64 MiB body limit
    started = time.monotonic()
    if route == "chat":
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": huge}]  # fmt: skip
        body = {"model": MODEL, "stream": False, "messages": messages}
        response = httpx.post(bounded_server.url + "/api/chat", timeout=120, json=body)
    elif route == "context":
        response = _generate(bounded_server, context=[300] * 2_000_000)
    else:
        response = _generate(bounded_server, prompt=huge, raw=route == "raw")
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]
    assert "4096" in message and "tokens" in message, message
    assert time.monotonic() - started < 30
    assert _worker(bounded_server) == pid  # the same worker, alive
    assert _status(pid)["VmRSS"] < before + 64 * 1024, (before, _status(pid))
    assert _generate(bounded_server, options={"num_predict": 2}).status_code == 200


@pytest.mark.slow
def test_a_huge_embedding_input_is_cut_or_refused_and_memory_stays_small(
    bounded_server: RunningServer,
) -> None:
    huge = "word " * (6 * MiB)
    url = bounded_server.url + "/api/embed"
    response = httpx.post(url, json={"model": MODEL, "input": huge, "truncate": False}, timeout=120)
    assert response.status_code == 400 and "4096" in response.json()["error"], response.text[:300]
    response = httpx.post(url, json={"model": MODEL, "input": [huge, "short"]}, timeout=300)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert len(body["embeddings"]) == 2 and body["prompt_eval_count"] <= 4096 + 10
    pid = _worker(bounded_server)
    assert _status(pid)["VmHWM"] < 1024 * 1024, _status(pid)  # 3.15 GB before


@pytest.mark.slow
def test_stop_lists_and_schemas_over_the_limits_are_short_400s(
    bounded_server: RunningServer,
) -> None:
    response = _generate(bounded_server, options={"stop": ["x"] * 100_000})
    assert response.status_code == 400 and f"at most {MAX_STOPS}" in response.json()["error"]
    for fmt in ({"type": "string", "pattern": "^a{1000000}$"}, {"const": "x" * MiB}):
        response = _generate(bounded_server, format=fmt, options={"num_predict": 8})
        assert response.status_code == 400, response.text[:300]
        assert len(response.content) < 1024, response.text[:300]
        body = {"model": MODEL, "prompt": "hi", "format": fmt, "options": {"num_predict": 8}}
        streamed = httpx.post(bounded_server.url + "/api/generate", timeout=120, json=body)
        assert len(streamed.content) < 2048
        assert "error" in streamed.text
    assert _generate(bounded_server, options={"num_predict": 2}).status_code == 200


@pytest.mark.slow
def test_special_token_prompts_do_not_stall_other_requests(
    bounded_server: RunningServer,
) -> None:
    text = "<|im_start|>" * (300_000 // 12)  # under the floor: really tokenized
    started = time.monotonic()
    response = _generate(bounded_server, prompt=text, raw=True, options={"num_predict": 1})
    assert response.status_code == 400  # 25,000 tokens > 4096
    assert "25000" in response.json()["error"], response.text[:300]
    assert time.monotonic() - started < 10


def test_usable_cpus_is_the_affinity_mask() -> None:
    assert usable_cpus() == len(os.sched_getaffinity(0))
