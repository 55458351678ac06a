"""The runner interface: what the scheduler and the inference service need from a model.

A runner is one loaded model. ``SubprocessRunner`` (``runner/process.py``) runs it in a
worker process (``runner/worker.py``); ``FakeRunner`` (``runner/fake.py``) replays scripted
output for scheduler tests. Both satisfy :class:`Runner`. Nothing here imports ``llama_cpp``.

The types below are also the payloads of the worker protocol (``runner/protocol.py``), so
they are plain dataclasses of JSON-able values.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded; a change means a reload.

    ``num_ctx`` is per sequence (Ollama's meaning); the context holds
    ``num_ctx * num_parallel`` tokens. ``embedding`` marks an embedding model (its GGUF has a
    pooling type): the worker makes only an embedding context and refuses completions.
    """

    model_path: str
    num_ctx: int
    num_parallel: int = 1
    num_batch: int = 512
    num_thread: int = 0  # 0 = the CPUs this process may use
    flash_attention: bool | None = None  # None = llama.cpp's auto
    kv_cache_type: str = "f16"  # f16 | q8_0 | q4_0
    use_mmap: bool | None = None
    adapters: tuple[str, ...] = ()
    embedding: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapters"] = list(self.adapters)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(**{**data, "adapters": tuple(data.get("adapters") or ())})


@dataclass(frozen=True)
class SamplingOptions:
    """Runtime options of one request, already merged and validated (Ollama's names)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    num_predict: int = -1
    num_keep: int = 4
    stop: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SamplingOptions:
        known = {k: options[k] for k in cls.__dataclass_fields__ if options.get(k) is not None}
        if "stop" in known:
            known["stop"] = tuple(known["stop"])
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data


MAX_UBATCH = 512
"""The most tokens llama.cpp computes in one physical pass (``n_ubatch``). Its compute
buffers (the logits of every row, the activations, the attention scores over the whole
context) grow with this number, not with ``num_batch``, which only bounds how many tokens
one ``llama_decode`` call takes; a bigger pass is no faster on a CPU. Ollama's default
``num_batch`` is the same 512, so by default nothing changes."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; a container's cpuset counts).

    More compute threads than this only take turns on the same cores (4,097 threads on two
    cores made 8 tokens in 183 s), so ``num_thread`` is clamped to it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (Ollama's and OpenAI's limit)


@dataclass(frozen=True)
class CompletionRequest:
    """One generation: a prompt (text, tokenized by the worker with special tokens parsed)
    or ready tokens, plus sampling options. ``logprobs`` asks for every generated token's
    log-probability and its ``top_logprobs`` most likely alternatives (0 to
    :data:`MAX_TOP_LOGPROBS`); a request that does not ask costs nothing more."""

    prompt: str = ""
    tokens: list[int] | None = None
    add_special: bool = True  # add BOS etc. when tokenizing ``prompt``
    options: SamplingOptions = field(default_factory=SamplingOptions)
    return_tokens: bool = False  # put prompt + output tokens in the final chunk (``context``)
    # Structured output: None, "json" (any JSON object) or a JSON Schema dict; the worker
    # constrains sampling with a token mask so the output always parses and validates.
    format: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's raw distribution at that position (the
    log-softmax of its logits, before sampling, penalties or a grammar's mask, as
    llama-server reports by default). ``token`` is the token's text piece, decoded with
    U+FFFD for a piece that is only part of a UTF-8 character (``bytes`` has the piece's
    exact bytes); an end-of-generation token has no text (``""``, no bytes): it ends the
    response and is never shown."""

    token: str
    logprob: float
    bytes: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenLogprob:
        return cls(str(data["token"]), float(data["logprob"]), [int(b) for b in data["bytes"]])


@dataclass
class Logprob(TokenLogprob):
    """A generated token's entry: its own log-probability and the most likely tokens at its
    position, most likely first (as many as the request asked for)."""

    top_logprobs: list[TokenLogprob] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "top_logprobs": [t.to_json() for t in self.top_logprobs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Logprob:
        own = TokenLogprob.from_json(data)
        top = [TokenLogprob.from_json(t) for t in data.get("top_logprobs") or ()]
        return cls(own.token, own.logprob, own.bytes, top)


@dataclass
class CompletionChunk:
    """A piece of output; the last one has ``done=True`` and the counts and timings.

    ``logprobs`` (when the request asked) are the entries of the tokens whose text this
    chunk carries, in order; a chunk may carry entries and no text (an end-of-generation
    token, or a token whose text a matched stop string cut). The final chunk carries none.
    ``stop_sequence`` on the final chunk is the stop string that ended the response
    (``done_reason`` ``stop``), "" otherwise.
    """

    text: str = ""
    done: bool = False
    done_reason: str = ""  # stop | length | "" (cancelled)
    prompt_eval_count: int = 0  # every prompt token, cached ones included (Ollama's count)
    prompt_cached: int = 0  # of which were already in the KV cache
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
    tokens: list[int] | None = None
    logprobs: list[Logprob] | None = None
    stop_sequence: str = ""


@dataclass
class EmbeddingResult:
    """The vectors of one embedding request, in input order, as llama.cpp pooled them (not
    normalized: ``inference/embeddings.py`` does that, once for every protocol). The worker
    protocol carries each vector base64-encoded."""

    vectors: list[bytes]  # little-endian float32, one per input
    token_counts: list[int]  # tokens evaluated per input, after truncation


@dataclass(frozen=True)
class RunnerInfo:
    """What a loaded worker reports about itself."""

    pid: int
    n_ctx: int  # per sequence, as loaded
    n_ctx_train: int
    n_parallel: int
    n_vocab: int
    memory_bytes: int  # weights + KV cache + compute buffers, as estimated after load
    load_duration_ns: int
    # The most bytes of text one token stands for (``inference/bounds.py``); 0: unknown.
    max_token_bytes: int = 0


class Runner(Protocol):
    """A loaded model. Ten methods at most: keep it small."""

    spec: LoadSpec

    async def start(self) -> RunnerInfo: ...

    def completion(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]: ...

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    async def embed(self, inputs: Sequence[str], truncate: bool = True) -> EmbeddingResult:
        """Each input's pooled vector. An input longer than the model's embedding context is
        cut to fit when ``truncate``, else refused (``InvalidRequest`` naming both counts)."""
        ...

    @property
    def alive(self) -> bool: ...

    async def close(self) -> None: ...
