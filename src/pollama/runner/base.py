"""The runner interface: what the scheduler and the inference service need from a model.

A runner is one loaded model. ``SubprocessRunner`` (``runner/process.py``) runs it in a
worker process (``runner/worker.py``); ``FakeRunner`` (``tests/fake_runner.py``) replays scripted
output for scheduler tests. Both satisfy :class:`Runner`. Nothing here imports ``llama_cpp``.

The types below are also the payloads of the worker protocol (``runner/protocol.py``), so
they are plain dataclasses of JSON-able values. The defaults of :class:`LoadSpec` and
:class:`SamplingOptions` fields named after an option are the option table's
(``pollama.options``): no default is written twice.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pollama.options import DEFAULT_OPTIONS
from pollama.runner.offload import CPU_DEVICE


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded; a change means a reload.

    ``num_ctx`` is per sequence (Ollama's meaning), already resolved (never the option's 0);
    the context holds ``num_ctx * num_parallel`` tokens. ``embedding`` marks an embedding
    model (its GGUF has a pooling type): the worker makes only an embedding context and
    refuses completions. The fields named after an option are exactly the options the table
    marks ``reload``. The server resolves and bounds them once (``InferenceService._load_spec``:
    ``num_batch`` at most ``num_ctx``, ``num_thread`` at most :func:`usable_cpus`); the worker
    takes them as they are.
    """

    model_path: str
    num_ctx: int
    num_parallel: int = 1
    num_batch: int = DEFAULT_OPTIONS["num_batch"]
    num_thread: int = DEFAULT_OPTIONS["num_thread"]  # 0 = the CPUs this process may use
    flash_attention: bool | None = None  # None = llama.cpp's auto
    kv_cache_type: str = "f16"  # f16 | q8_0 | q4_0
    use_mmap: bool | None = DEFAULT_OPTIONS["use_mmap"]  # None = llama.cpp's default
    adapters: tuple[str, ...] = ()
    embedding: bool = False
    projectors: tuple[str, ...] = ()  # the model's projector GGUFs (images, audio)
    draft_path: str = ""  # the draft model's GGUF (Modelfile DRAFT): speculative decoding
    # Where the layers go (``scheduler/placement.py`` decides, from ``num_gpu`` and the
    # devices' free memory): how many of the model's layers llama.cpp offloads to the
    # accelerators (0: all on the CPU; -1: all of them), the device that holds what is not
    # split (``main_gpu``), and each device's share of the offloaded layers (empty: llama.cpp
    # splits by free memory itself).
    gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    # The RPC servers (``host:port``) whose devices the worker adds before loading, in this
    # order (``OLLAMA_RPC_SERVERS``, less those down or held by another model): llama.cpp
    # numbers their devices first, so ``tensor_split`` indexes them before local GPUs.
    rpc_servers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapters"] = list(self.adapters)
        data["projectors"] = list(self.projectors)
        data["tensor_split"] = list(self.tensor_split)
        data["rpc_servers"] = list(self.rpc_servers)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(
            **{
                **data,
                "adapters": tuple(data.get("adapters") or ()),
                "projectors": tuple(data.get("projectors") or ()),
                "tensor_split": tuple(float(x) for x in data.get("tensor_split") or ()),
                "rpc_servers": tuple(str(x) for x in data.get("rpc_servers") or ()),
            }
        )


@dataclass(frozen=True)
class SamplingOptions:
    """Runtime options of one request, already merged and validated (Ollama's names): the
    options the table does not mark ``reload``, less the ones pollama does not use."""

    temperature: float = DEFAULT_OPTIONS["temperature"]
    top_k: int = DEFAULT_OPTIONS["top_k"]
    top_p: float = DEFAULT_OPTIONS["top_p"]
    min_p: float = DEFAULT_OPTIONS["min_p"]
    typical_p: float = DEFAULT_OPTIONS["typical_p"]
    repeat_last_n: int = DEFAULT_OPTIONS["repeat_last_n"]
    repeat_penalty: float = DEFAULT_OPTIONS["repeat_penalty"]
    presence_penalty: float = DEFAULT_OPTIONS["presence_penalty"]
    frequency_penalty: float = DEFAULT_OPTIONS["frequency_penalty"]
    seed: int = DEFAULT_OPTIONS["seed"]
    num_predict: int = DEFAULT_OPTIONS["num_predict"]
    num_keep: int = DEFAULT_OPTIONS["num_keep"]
    stop: tuple[str, ...] = tuple(DEFAULT_OPTIONS["stop"])
    # The most tokens one draft of speculative decoding holds (0: never draft).
    draft_num_predict: int = DEFAULT_OPTIONS["draft_num_predict"]
    # Draft every copy found, whether or not the measured costs say it pays.
    draft_always: bool = DEFAULT_OPTIONS["draft_always"]

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

# Bytes per element of each KV cache type llama.cpp knows (block size / elements per block).
_KV_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


def kv_bytes_per_element(kv_cache_type: str) -> float:
    """What one K or V element takes in a cache of this type (any case; empty is f16); an
    unknown type counts as f16. The one table behind the scheduler's estimate before a load
    and the worker's own figure after it."""
    return _KV_BYTES.get((kv_cache_type or "f16").lower(), 2.0)


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
    :data:`MAX_TOP_LOGPROBS`); a request that does not ask costs nothing more. ``shift``
    lets a generation that fills its sequence's window go on by dropping the oldest half
    after the first ``num_keep`` tokens (Ollama's context shift); off, it ends with
    ``length`` there."""

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
    # Images and audio clips (their files' bytes) that ``prompt``'s ``[img-N]`` references
    # name; only a worker with a projector takes them (``runner/media.py``). The protocol
    # carries each in a message of its own, before the completion (``runner/protocol.py``).
    media: tuple[bytes, ...] = ()
    shift: bool = True


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
    (``done_reason`` ``stop``), "" otherwise. ``context_shifted`` on the final chunk is how
    many tokens context shifts dropped from the window while generating (0: none).
    ``draft_tokens`` and ``draft_accepted`` on the final chunk are how many tokens
    speculative decoding drafted and how many of them the model's own sampling kept.
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
    context_shifted: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0


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
    # What the model's projector takes (``runner/media.py``), and the embedding rows one
    # image costs in the context (exact for fixed-size projectors; 0 without vision).
    vision: bool = False
    audio: bool = False
    image_tokens: int = 0
    # Where llama.cpp put the model, from its own report after loading (not the estimate):
    # bytes of weights, KV cache and compute buffers per device name ("CPU", "CUDA0", ...),
    # and how many layers went to an accelerator. ``size_vram`` is the non-CPU part (all of
    # it when every layer went: ``scheduler.scheduler._size_vram``).
    device_bytes: dict[str, int] = field(default_factory=dict)
    gpu_layers: int = 0
    # The layers llama.cpp can offload (the repeating ones and the output layer: what
    # ``gpu_layers`` -1 means); 0: unknown.
    layers: int = 0

    @property
    def vram_bytes(self) -> int:
        """The bytes on devices other than the CPU (``/api/ps`` ``size_vram``)."""
        return sum(n for device, n in self.device_bytes.items() if device != CPU_DEVICE)


@dataclass(frozen=True)
class DeviceInfo:
    """A compute device as llama.cpp's device API reports it (``runner/devices.py``):
    ``kind`` is ``cpu``, ``gpu``, ``igpu`` or ``accel``; memory in bytes, free as of the
    query. The CPU device's memory is the system's. A remote device (``runner/rpc.py``) is
    named as llama.cpp names its buffers, ``RPC<n>[host:port]``."""

    name: str
    description: str
    kind: str
    total_bytes: int
    free_bytes: int

    @property
    def accelerator(self) -> bool:
        return self.kind in ("gpu", "igpu")

    @property
    def endpoint(self) -> str:
        """The ``host:port`` of the RPC server a remote device is on; "" for a local one."""
        return rpc_endpoint(self.name)


def rpc_endpoint(device: str) -> str:
    """The ``host:port`` in a remote device's name (``RPC0[127.0.0.1:50052]``, the name
    llama.cpp gives its buffers); "" for a local device's name."""
    if device.startswith("RPC") and device.endswith("]") and "[" in device:
        return device[device.index("[") + 1 : -1]
    return ""


class Runner(Protocol):
    """A loaded model. Ten methods at most: keep it small."""

    spec: LoadSpec

    async def start(self) -> RunnerInfo: ...

    def completion(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]: ...

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    async def pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's bytes (special tokens as their text); ids are checked by the worker."""
        ...

    async def embed(
        self,
        inputs: Sequence[str],
        truncate: bool = True,
        *,
        query: str | None = None,
        label: str = "input",
    ) -> EmbeddingResult:
        """Each input's pooled vector. An input longer than the model's embedding context is
        cut to fit when ``truncate``, else refused (``InvalidRequest`` naming both counts).

        With a ``query`` (a cross-encoder only), each input is a document and its "vector"
        is the model's scores for the pair. ``label`` names the inputs in errors ("input",
        "document", or "query" for a single one)."""
        ...

    @property
    def alive(self) -> bool: ...

    async def close(self) -> None: ...
