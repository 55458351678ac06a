"""Streaming HTTP clients for the two servers, timing each request from the client side.

Each call returns a :class:`StreamResult`: client timestamps (sent, first token, done) and
what the engine itself reported (tokens generated, its decode rate, prompt tokens evaluated).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

StreamFn = Callable[[httpx.AsyncClient, int], Awaitable["StreamResult"]]

HTTP = httpx.Client(timeout=600)
"""The one blocking client of the benchmarks that time requests one by one: a new client
costs 20-60 ms (its TLS context), which a timing started before it would count as the
server's (``httpx.stream()`` and ``httpx.post()`` build one a call)."""


class Unavailable(Exception):
    """The server answered, but cannot do this (yet): the message says why."""


@dataclass
class StreamResult:
    t_sent: float
    t_first: float
    t_done: float
    tokens: int  # generated tokens, as the engine counted them
    decode_tok_s: float  # the engine's own decode rate for this request
    prompt_tokens: int  # prompt tokens the engine evaluated (cached ones excluded)
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_sent


async def _lines(resp: httpx.Response) -> Any:
    async for line in resp.aiter_lines():
        line = line.strip()
        if line:
            yield line


async def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        body = (await resp.aread()).decode(errors="replace")[:300]
        raise Unavailable(f"HTTP {resp.status_code} from {resp.request.url.path}: {body}")


# --- llama-server ---------------------------------------------------------------------------


async def llama_completion(
    client: httpx.AsyncClient, base: str, prompt: str, n_predict: int
) -> StreamResult:
    body = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
        "seed": 1,
        "stream": True,
        "ignore_eos": True,
        "cache_prompt": True,
    }
    t_sent = time.perf_counter()
    t_first = 0.0
    async with client.stream("POST", f"{base}/completion", json=body) as resp:
        await _raise_for_status(resp)
        async for line in _lines(resp):
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if not t_first and chunk.get("content"):
                t_first = time.perf_counter()
            if chunk.get("stop"):
                t = chunk["timings"]
                return StreamResult(
                    t_sent,
                    t_first or time.perf_counter(),
                    time.perf_counter(),
                    int(t["predicted_n"]),
                    float(t["predicted_per_second"]),
                    int(t["prompt_n"]),
                )
    raise Unavailable("llama-server stream ended without a final chunk")


async def llama_chat(
    client: httpx.AsyncClient, base: str, messages: list[dict[str, str]], max_tokens: int
) -> StreamResult:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "stream": True,
        "cache_prompt": True,
        "timings_per_token": False,
    }
    t_sent = time.perf_counter()
    t_first = 0.0
    text: list[str] = []
    timings: dict[str, Any] = {}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        await _raise_for_status(resp)
        async for line in _lines(resp):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    t_first = t_first or time.perf_counter()
                    text.append(piece)
            timings = chunk.get("timings") or timings
    t_done = time.perf_counter()
    return StreamResult(
        t_sent,
        t_first or t_done,
        t_done,
        int(timings.get("predicted_n", 0)),
        float(timings.get("predicted_per_second", 0.0)),
        int(timings.get("prompt_n", -1)),
        "".join(text),
    )


# --- pollama (Ollama's native API) ----------------------------------------------------------


def _check_error(chunk: dict[str, Any]) -> None:
    if "error" in chunk:
        raise Unavailable(f"pollama error: {chunk['error']}")


def _final(chunk: dict[str, Any], t_sent: float, t_first: float, text: str) -> StreamResult:
    eval_count = int(chunk.get("eval_count") or 0)
    eval_ns = int(chunk.get("eval_duration") or 0)
    if eval_count <= 0 or eval_ns <= 0:
        raise Unavailable(f"pollama final chunk has no eval_count/eval_duration: {chunk}")
    t_done = time.perf_counter()
    return StreamResult(
        t_sent,
        t_first or t_done,
        t_done,
        eval_count,
        eval_count / (eval_ns / 1e9),
        int(chunk.get("prompt_eval_count") or 0),
        text,
        {
            "prompt_eval_duration_s": (chunk.get("prompt_eval_duration") or 0) / 1e9,
            "load_duration_s": (chunk.get("load_duration") or 0) / 1e9,
            "done_reason": chunk.get("done_reason"),
        },
    )


async def pollama_generate(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    prompt: str,
    options: dict[str, Any],
    raw: bool = False,
) -> StreamResult:
    """``raw``: the prompt as it is, no template (what llama-server's ``/completion`` and
    the plain loop evaluate), so that every engine does the same work."""
    body = {"model": model, "prompt": prompt, "stream": True, "options": options, "raw": raw}
    t_sent = time.perf_counter()
    t_first = 0.0
    text: list[str] = []
    async with client.stream("POST", f"{base}/api/generate", json=body) as resp:
        await _raise_for_status(resp)
        async for line in _lines(resp):
            chunk = json.loads(line)
            _check_error(chunk)
            if chunk.get("response"):
                t_first = t_first or time.perf_counter()
                text.append(chunk["response"])
            if chunk.get("done"):
                return _final(chunk, t_sent, t_first, "".join(text))
    raise Unavailable("pollama /api/generate stream ended without a done chunk")


async def pollama_chat(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    messages: list[dict[str, str]],
    options: dict[str, Any],
) -> StreamResult:
    body = {"model": model, "messages": messages, "stream": True, "options": options}
    t_sent = time.perf_counter()
    t_first = 0.0
    text: list[str] = []
    async with client.stream("POST", f"{base}/api/chat", json=body) as resp:
        await _raise_for_status(resp)
        async for line in _lines(resp):
            chunk = json.loads(line)
            _check_error(chunk)
            piece = (chunk.get("message") or {}).get("content")
            if piece:
                t_first = t_first or time.perf_counter()
                text.append(piece)
            if chunk.get("done"):
                return _final(chunk, t_sent, t_first, "".join(text))
    raise Unavailable("pollama /api/chat stream ended without a done chunk")


# --- N concurrent streams -------------------------------------------------------------------


@dataclass
class RunSummary:
    streams: int
    per_stream_tok_s: float  # mean of the engine-reported per-request decode rates
    aggregate_tok_s: float  # sum of those rates (streams run side by side)
    wall_tok_s: float  # generated tokens / wall time from first send to last done
    ttft_s: float  # mean time to first token (includes queueing and prefill)
    tokens: int
    prompt_tokens: int = 0  # prompt tokens evaluated, all streams (the same work everywhere)

    @staticmethod
    def of(streams: int, results: list[StreamResult]) -> RunSummary:
        wall = max(r.t_done for r in results) - min(r.t_sent for r in results)
        rates = [r.decode_tok_s for r in results]
        tokens = sum(r.tokens for r in results)
        return RunSummary(
            streams=streams,
            per_stream_tok_s=round(sum(rates) / len(rates), 2),
            aggregate_tok_s=round(sum(rates), 2),
            wall_tok_s=round(tokens / wall, 2),
            ttft_s=round(sum(r.ttft for r in results) / len(results), 3),
            tokens=tokens,
            prompt_tokens=sum(r.prompt_tokens for r in results),
        )


async def concurrent(streams: int, one: StreamFn) -> RunSummary:
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(streams)))
    return RunSummary.of(streams, list(results))
