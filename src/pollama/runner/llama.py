"""The one module that calls llama.cpp (through ``llama_cpp``'s low-level ctypes bindings).

Everything version-specific lives here, so a bump of ``llama-cpp-python`` (pinned at 0.3.36)
touches one file: context-parameter fields, the ``llama_memory_*`` names, the five-argument
``llama_sampler_init_penalties``, the ``flash_attn_type`` enum and ``load_mode``. The
wrappers are thin and typed; the scheduling logic is in ``runner/engine.py``.

What must stay true:

* Only the worker process imports this module (docs/architecture.md#a-worker-process-per-model);
  importing it loads the shared libraries.
* A :class:`Context` and its :class:`Batch`/:class:`SamplerChain` objects are used by one
  thread (the engine loop). The vocabulary functions (:meth:`Model.tokenize`,
  :meth:`Model.detokenize`, :meth:`Model.token_to_piece`, :meth:`Model.is_eog`) only read
  the model's immutable vocabulary, so other threads may call them while a decode runs
  (``llama-server`` tokenizes in its HTTP threads the same way); ctypes releases the GIL
  during every C call.
* Pointers returned by llama.cpp are freed exactly once, by ``close()``.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pollama.errors import InternalError, InvalidOption
from pollama.runner.bindings import lc
from pollama.runner.offload import OffloadReport
from pollama.runner.textsplit import PIECE_CHARS, SpecialSplitter

if TYPE_CHECKING:
    from llguidance import LLTokenizer

__all__ = [
    "DEFAULT_SEED",
    "EmbeddingContext",
    "KV_CACHE_TYPES",
    "Batch",
    "Context",
    "ContextParams",
    "LogSink",
    "Model",
    "OffloadParams",
    "SamplerChain",
    "backend_init",
    "flash_attn_type",
    "guidance_tokenizer",
    "kv_cache_types",
    "state_format",
]

KV_CACHE_TYPES: dict[str, int] = {
    "f16": lc.GGML_TYPE_F16,
    "f32": lc.GGML_TYPE_F32,
    "q8_0": lc.GGML_TYPE_Q8_0,
    "q4_0": lc.GGML_TYPE_Q4_0,
}
DEFAULT_SEED = lc.LLAMA_DEFAULT_SEED  # llama.cpp picks a random seed for this value

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line)
_LOG_INFO, _LOG_WARN, _LOG_CONT = 2, 3, 5


class LogSink:
    """llama.cpp's log: warnings and errors to stderr (everything when ``verbose``), never
    stdout; also reads the ``<device> ... buffer size = N MiB`` and ``offloaded N/M layers``
    lines that llama.cpp prints while loading weights and creating a context, the most exact
    figures it gives of what went where (``runner/offload.py``).

    The ctypes callback must outlive every llama.cpp call, so this object is kept for the
    life of the process.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.report = OffloadReport()
        self.last_error = ""
        self._level = 0
        self._callback = lc.llama_log_callback(self._log)
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def close(self) -> None:
        """Hand llama.cpp's logging to a silent callback that lives as long as the process:
        llama.cpp keeps the function pointer, so a sink dropped without this leaves it
        dangling, and the next line llama.cpp logs (any model load) crashes the process."""
        lc.llama_log_set(_SILENT, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if text is None:
            return
        if level != _LOG_CONT:
            self._level = level
        self.report.feed(text)
        if self._level > _LOG_WARN and text.strip():
            self.last_error = text.decode("utf-8", "replace").strip()
        if self.verbose or self._level >= _LOG_WARN:
            sys.stderr.write(text.decode("utf-8", "replace"))


_SILENT = lc.llama_log_callback(lambda _level, _text, _user: None)


def backend_init() -> None:
    """llama.cpp's start-up, and the devices' backends registered (``runner/devices.py``)
    before a model picks its devices."""
    from pollama.runner.devices import load_backends

    lc.llama_backend_init()
    load_backends()


def add_rpc_servers(endpoints: Sequence[str]) -> None:
    """The RPC servers' devices added to llama.cpp's registry (``runner/rpc.py``), once per
    worker, after :func:`backend_init` and before the model loads. A server that is down
    raises ``ConnectionError`` naming it (llama.cpp itself would abort the process)."""
    from pollama.runner.rpc import add_servers

    add_servers(endpoints)


def kv_cache_types(
    name: str, flash_attention: bool | None, head_dims: tuple[int, int] = (0, 0)
) -> tuple[int, int, str]:
    """``(type_k, type_v, warning)`` for an ``OLLAMA_KV_CACHE_TYPE`` value.

    llama.cpp refuses a quantized V cache without flash attention, and a quantized cache
    whose blocks (32 values) do not divide the attention head size. As Ollama does, such a
    setting falls back to f16 with a warning instead of failing the load; with flash attention
    on auto, :func:`flash_attn_type` turns it on for a quantized cache.
    """
    key = (name or "f16").lower()
    if key not in KV_CACHE_TYPES:
        raise InvalidOption(
            f"unsupported kv cache type {name!r}; use one of {', '.join(KV_CACHE_TYPES)}"
        )
    kind = KV_CACHE_TYPES[key]
    if key in ("f16", "f32"):
        return kind, kind, ""
    if flash_attention is False:
        warning = f"kv cache type {key} needs flash attention, which is off: using f16"
        return lc.GGML_TYPE_F16, lc.GGML_TYPE_F16, warning
    if any(dim % 32 for dim in head_dims):
        warning = f"kv cache type {key} does not fit head sizes {head_dims}: using f16"
        return lc.GGML_TYPE_F16, lc.GGML_TYPE_F16, warning
    return kind, kind, ""


@cache
def state_format() -> str:
    """The engine and its sequence-state format: a state saved by another may not read
    back the same (part of the prompt cache's key, ``runner/kvstate.py``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("llama_cpp_python")
    except PackageNotFoundError:
        package = "unknown"
    return f"llama-cpp-python {package}, seq state {lc.LLAMA_STATE_SEQ_VERSION}"


def flash_attn_type(flash_attention: bool | None, kv_cache_type: str) -> int:
    """The ``flash_attn_type`` enum; auto becomes on when the KV cache is quantized."""
    if flash_attention is None:
        if (kv_cache_type or "f16").lower() in ("q8_0", "q4_0"):
            return lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        return lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    return (
        lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )


@dataclass(frozen=True)
class OffloadParams:
    """Where a model's layers go (``LoadSpec.gpu_layers``, ``main_gpu``, ``tensor_split``).

    llama.cpp's own default offloads every layer (``n_gpu_layers`` -1); pollama's is the
    plan's, and without a plan nothing (0), so a model goes to an accelerator only when the
    scheduler decided it fits. The split is by layer (``LLAMA_SPLIT_MODE_LAYER``): whole
    layers per device, in the shares of ``tensor_split`` (one per device in llama.cpp's
    numbering, ``runner/devices.py`` ``offload_devices``; empty: by free memory). A CPU
    build takes all this and offloads nothing."""

    gpu_layers: int = 0  # -1: every layer
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()

    def apply(self, params: lc.llama_model_params) -> ctypes.Array[ctypes.c_float] | None:
        """Set the fields of ``params``; returns the split array the caller must keep alive
        for the length of the load (None when there is no split)."""
        params.n_gpu_layers = self.gpu_layers if self.gpu_layers >= 0 else -1
        params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
        params.main_gpu = max(self.main_gpu, 0)
        if not self.tensor_split:
            params.tensor_split = None
            return None
        size = int(lc.llama_max_devices())
        if len(self.tensor_split) > size:
            raise InvalidOption(
                f"tensor_split names {len(self.tensor_split)} devices; this build has at "
                f"most {size}"
            )
        split = (ctypes.c_float * size)(*self.tensor_split)
        params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        return split


class Model:
    """A loaded ``llama_model`` and its vocabulary."""

    def __init__(
        self,
        path: str,
        *,
        use_mmap: bool | None = None,
        vocab_only: bool = False,
        offload: OffloadParams | None = None,
    ):
        params = lc.llama_model_default_params()
        if use_mmap is not None:
            params.load_mode = lc.LLAMA_LOAD_MODE_MMAP if use_mmap else lc.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        split = (offload or OffloadParams()).apply(params)
        ptr = lc.llama_model_load_from_file(path.encode(), params)
        del split  # held until here: llama.cpp reads the array during the load
        if not ptr:
            raise InternalError(f"llama.cpp could not load the model file {path}")
        self.ptr: ctypes.c_void_p | None = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(ptr)
        self.n_layer: int = lc.llama_model_n_layer(ptr)
        self.n_embd: int = lc.llama_model_n_embd(ptr)
        self.n_head: int = lc.llama_model_n_head(ptr)
        self.n_head_kv: int = lc.llama_model_n_head_kv(ptr)
        self.size_bytes: int = lc.llama_model_size(ptr)
        self.add_bos: bool = lc.llama_vocab_get_add_bos(self.vocab)
        # Special tokens the tokenizer appends (EOS for some, SEP for BERT's WordPiece).
        self.n_tail_specials: int = int(lc.llama_vocab_get_add_eos(self.vocab)) + int(
            lc.llama_vocab_get_add_sep(self.vocab)
        )
        self.n_embd_out: int = lc.llama_model_n_embd_out(ptr)
        self.n_embd_inp: int = lc.llama_model_n_embd_inp(ptr)  # a projector's row width
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._special_splitter: SpecialSplitter | None = None
        self._longest_piece: Future[int] | None = None

    def start_max_token_bytes(self) -> None:
        """Begin :meth:`max_token_bytes` on a thread of its own, so that its walk over the
        vocabulary (30-50 ms of a load, mostly Python) runs while the context is made
        (llama.cpp's allocation holds no GIL). :meth:`close` waits for it: the thread reads
        the vocabulary, which the model frees."""
        if self._longest_piece is not None:
            return
        future: Future[int] = Future()
        self._longest_piece = future

        def walk() -> None:
            try:
                future.set_result(self._measure_max_token_bytes())
            except BaseException as exc:  # handed to whoever asks for the answer
                future.set_exception(exc)

        threading.Thread(target=walk, name="max-token-bytes", daemon=True).start()

    def head_dims(self) -> tuple[int, int]:
        """The attention head sizes of K and V (GGUF ``key_length``/``value_length``)."""
        arch = self.meta("general.architecture") or ""
        default = self.n_embd // max(1, self.n_head)
        dims = []
        for field_ in ("key_length", "value_length"):
            value = self.meta(f"{arch}.attention.{field_}")
            dims.append(int(value) if value and value.isdigit() else default)
        return dims[0], dims[1]

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """The tokens of ``text``; a long text with special tokens parsed goes through the
        tokenizer in pieces cut where llama.cpp splits anyway (``runner/textsplit.py``),
        unless the tokenizer appends tokens at the end (each piece would get them)."""
        if not parse_special or len(text) <= PIECE_CHARS or self.n_tail_specials:
            return self._tokenize(text, add_special, parse_special)
        tokens: list[int] = []
        for i, piece in enumerate(self._splitter().pieces(text)):
            tokens.extend(self._tokenize(piece, add_special and i == 0, True))
        return tokens

    def _splitter(self) -> SpecialSplitter:
        """The special-token strings of the vocabulary, found once."""
        if self._special_splitter is None:
            specials = []
            kinds = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED
            for token in range(self.n_vocab):
                attr = lc.llama_vocab_get_attr(self.vocab, token)
                if attr & kinds:
                    text = self.token_to_piece(token).decode("utf-8", "replace")
                    specials.append((text, bool(attr & lc.LLAMA_TOKEN_ATTR_LSTRIP)))
            self._special_splitter = SpecialSplitter.of(specials)
        return self._special_splitter

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (lc.llama_token * size)()
            n = lc.llama_tokenize(
                self.vocab, data, len(data), buf, size, add_special, parse_special
            )
            if n >= 0:
                return buf[:n]
            if -n <= size:  # an overflow of int32 in llama.cpp, not a short buffer
                raise InternalError("tokenization failed: text too long")
            size = -n

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The bytes of one token (cached: the vocabulary never changes)."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = lc.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[key] = piece
        return piece

    def detokenize(
        self, tokens: Sequence[int], remove_special: bool = False, unparse_special: bool = True
    ) -> bytes:
        arr = (lc.llama_token * max(1, len(tokens)))(*tokens)
        size = max(64, len(tokens) * 8)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_detokenize(
                self.vocab, arr, len(tokens), buf, size, remove_special, unparse_special
            )
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def max_token_bytes(self) -> int:
        """The most bytes of text one token can stand for: its longest piece (special
        tokens as text), four times that for tokenizers that normalize text away
        (WordPiece drops spaces and accents, Unigram rewrites), so that a text of ``n``
        bytes is surely at least ``n // max_token_bytes()`` tokens (``inference/bounds.py``).
        About 30-50 ms for a 50k vocabulary, once per load: the answer of
        :meth:`start_max_token_bytes` when it was started."""
        if self._longest_piece is not None:
            return self._longest_piece.result()
        return self._measure_max_token_bytes()

    def _measure_max_token_bytes(self) -> int:
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(self.n_vocab):
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            longest = max(longest, abs(n))
        exact = (lc.LLAMA_VOCAB_TYPE_SPM, lc.LLAMA_VOCAB_TYPE_BPE, lc.LLAMA_VOCAB_TYPE_RWKV)
        return longest if lc.llama_vocab_type(self.vocab) in exact else 4 * longest

    def close(self) -> None:
        if self._longest_piece is not None:
            wait([self._longest_piece])  # its thread reads the vocabulary freed below
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None


@dataclass(frozen=True)
class ContextParams:
    """What :class:`Context` needs; ``n_ctx`` is the total over all sequences."""

    n_ctx: int
    n_seq_max: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 2
    flash_attn_type: int = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    type_k: int = lc.GGML_TYPE_F16
    type_v: int = lc.GGML_TYPE_F16
    kv_unified: bool = False
    embeddings: bool = False
    pooling_type: int = lc.LLAMA_POOLING_TYPE_UNSPECIFIED  # embedding contexts only


class Context:
    """A ``llama_context`` (the KV cache and compute buffers) over a :class:`Model`."""

    def __init__(self, model: Model, params: ContextParams) -> None:
        cp = lc.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_seq_max = params.n_seq_max
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_ubatch
        cp.n_threads = params.n_threads
        cp.n_threads_batch = params.n_threads
        cp.flash_attn_type = params.flash_attn_type
        cp.type_k = params.type_k
        cp.type_v = params.type_v
        cp.kv_unified = params.kv_unified
        cp.embeddings = params.embeddings
        cp.pooling_type = params.pooling_type
        cp.no_perf = True
        ptr = lc.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise InternalError("llama.cpp could not create a context for the model")
        self.ptr: ctypes.c_void_p | None = ptr
        self.model = model
        self.memory = lc.llama_get_memory(ptr)
        self.n_ctx: int = lc.llama_n_ctx(ptr)
        self.n_ctx_seq: int = lc.llama_n_ctx_seq(ptr)
        self.n_seq_max: int = lc.llama_n_seq_max(ptr)
        self.n_batch: int = lc.llama_n_batch(ptr)
        self._adapters: list[ctypes.c_void_p] = []
        self._embd_batch: _EmbeddingBatch | None = None

    def decode(self, batch: Batch) -> int:
        """0 ok; 1 no KV room; 2 aborted; negative: invalid batch or fatal (llama.h)."""
        return int(lc.llama_decode(self.ptr, batch.struct))

    def logits(self, row: int) -> npt.NDArray[np.float32]:
        """A view (no copy) of the logits of batch row ``row``, valid until the next decode."""
        ptr = lc.llama_get_logits_ith(self.ptr, row)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def decode_embeddings(
        self,
        rows: npt.NDArray[np.float32],
        positions: int | npt.NDArray[np.int32],
        seq: int,
        *,
        output_last: bool,
        non_causal: bool = False,
    ) -> int:
        """Decode input embeddings (a projector's rows for one image or audio clip) into
        ``seq``; like :meth:`decode`'s status. ``positions`` is the first row's position
        (the rows then take ``positions``..) or, for an M-RoPE model, every row's positions
        as an array of shape (sections, rows), section-major as llama.cpp reads them.
        ``non_causal``: the rows attend to each other both ways (Gemma 3's images), as
        llama.cpp's ``mtmd_helper_decode_image_chunk`` does it. Only the last row gives
        logits, if asked."""
        n, width = rows.shape
        if self._embd_batch is None or self._embd_batch.capacity < n:
            self._embd_batch = _EmbeddingBatch(max(n, 64))
        batch = self._embd_batch.fill(rows, positions, seq, output_last)
        if non_causal:
            lc.llama_set_causal_attn(self.ptr, False)
        try:
            return int(lc.llama_decode(self.ptr, batch))
        finally:
            if non_causal:
                lc.llama_set_causal_attn(self.ptr, True)

    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        lc.llama_set_n_threads(self.ptr, n_threads, n_threads_batch)

    def warmup(self) -> None:
        """Touch every weight once (llama.cpp's own warm-up), so the first request does not
        pay for page faults."""
        lc.llama_set_warmup(self.ptr, True)
        batch = Batch(1)
        bos = lc.llama_vocab_bos(self.model.vocab)
        batch.add(bos if bos >= 0 else 0, 0, 0, True)
        self.decode(batch)
        lc.llama_set_warmup(self.ptr, False)
        self.seq_rm(-1, -1, -1)
        lc.llama_synchronize(self.ptr)

    # KV cache (llama_memory_*)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """Drop ``seq``'s cells in [p0, p1); False if a partial removal is unsupported."""
        return bool(lc.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Move ``seq``'s cells in [p0, p1) by ``delta`` positions (a context shift); the
        keys are re-rotated at the next decode. Only where :meth:`can_shift`."""
        lc.llama_memory_seq_add(self.memory, seq, p0, p1, delta)

    def can_shift(self) -> bool:
        """Whether a context shift (``seq_rm`` of a middle range, then ``seq_add``) is
        sound here: llama.cpp says whether its memory can move cells (not for a model with
        several positions per row, M-RoPE), and a recurrent or hybrid model's state cannot
        lose a middle range at all (its ``seq_rm`` refuses one)."""
        model = self.model.ptr
        return (
            bool(self.memory)
            and bool(lc.llama_memory_can_shift(self.memory))
            and not lc.llama_model_is_recurrent(model)
            and not lc.llama_model_is_hybrid(model)
        )

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    # Sequence state (the prompt cache on disk, runner/kvstate.py)

    def seq_state(self, seq: int) -> bytearray:
        """A copy of ``seq``'s KV cells, in llama.cpp's own format (which says, and checks
        when read back, the layers, the cache's types and the V layout)."""
        size = int(lc.llama_state_seq_get_size(self.ptr, seq))
        data = bytearray(size)
        if size:
            view = (ctypes.c_uint8 * size).from_buffer(data)
            written = int(lc.llama_state_seq_get_data(self.ptr, view, size, seq))
            del view
            del data[written:]
        return data

    def set_seq_state(self, seq: int, state: memoryview) -> bool:
        """Put a copy made by :meth:`seq_state` into the empty sequence ``seq``. False when
        llama.cpp refused it or read only part of it; the sequence is then emptied."""
        size = len(state)
        if size == 0:
            return False
        view = (ctypes.c_uint8 * size).from_buffer(state)
        read = int(lc.llama_state_seq_set_data(self.ptr, view, size, seq))
        del view
        if read == size:
            return True
        self.seq_rm(seq, -1, -1)
        return False

    def set_lora(self, paths: Sequence[str], scale: float = 1.0) -> None:
        """Load LoRA adapters and apply them to this context (loading fails loudly)."""
        for path in paths:
            adapter = lc.llama_adapter_lora_init(self.model.ptr, path.encode())
            if not adapter:
                raise InternalError(f"llama.cpp could not load the adapter {path}")
            self._adapters.append(adapter)
        if not self._adapters:
            return
        n = len(self._adapters)
        arr = (lc.llama_adapter_lora_p_ctypes * n)(*self._adapters)
        scales = (ctypes.c_float * n)(*([scale] * n))
        if lc.llama_set_adapters_lora(self.ptr, arr, n, scales) != 0:
            raise InternalError("llama.cpp could not apply the LoRA adapters")

    def close(self) -> None:
        self._embd_batch = None
        if self.ptr:
            lc.llama_free(self.ptr)
            self.ptr = None
        for adapter in self._adapters:
            lc.llama_adapter_lora_free(adapter)
        self._adapters.clear()


class _BatchArrays:
    """The numpy buffers behind a ``llama_batch`` of ours and the struct pointing at them:
    ``pos`` (given: its length depends on the kind of batch), one sequence id per row
    (``seq_id[i]`` points at ``seq[i]``), an output flag per row, and the token ids when the
    batch carries tokens rather than embeddings (which are pointed at per decode)."""

    def __init__(
        self, capacity: int, pos: npt.NDArray[np.int32], token: npt.NDArray[np.int32] | None
    ) -> None:
        self.capacity = capacity
        self.pos = pos
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_ptr = ctypes.POINTER(lc.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_ptr * capacity)(
            *(ctypes.cast(base + 4 * i, seq_ptr) for i in range(capacity))
        )
        self.struct = lc.llama_batch(
            n_tokens=0,
            token=None if token is None else token.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
            embd=None,
            pos=pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_ptr)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class Batch(_BatchArrays):
    """A ``llama_batch`` of token ids whose arrays are numpy buffers owned here (one sequence
    id per row).

    Filling numpy arrays avoids per-element ctypes calls for prompt chunks, and one batch is
    reused for every decode, so the loop allocates nothing per step.
    """

    def __init__(self, capacity: int) -> None:
        self.token = np.zeros(capacity, dtype=np.int32)
        super().__init__(capacity, np.zeros(capacity, dtype=np.int32), self.token)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.struct.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Append one row; returns its index (the ``row`` for logits and sampling)."""
        i = self.n_tokens
        self.token[i] = token
        self.pos[i] = pos
        self.seq[i] = seq
        self.logits[i] = output
        self.n_tokens = i + 1
        self.struct.n_tokens = i + 1
        return i

    def add_run(self, tokens: Sequence[int], pos0: int, seq: int, output_last: bool) -> int:
        """Append consecutive tokens of one sequence; returns the row of the last one."""
        i, n = self.n_tokens, len(tokens)
        end = i + n
        self.token[i:end] = tokens
        self.pos[i:end] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.seq[i:end] = seq
        self.logits[i:end] = 0
        self.logits[end - 1] = output_last
        self.n_tokens = end
        self.struct.n_tokens = end
        return end - 1


class _EmbeddingBatch(_BatchArrays):
    """A ``llama_batch`` of embedding rows whose arrays are numpy buffers owned here.

    Not ``llama_batch_init``'s: that allocates one position per row, and an M-RoPE model
    reads four per row (section-major: ``pos[j * n + i]`` is row ``i``'s section ``j``, as
    mtmd's ``decode_embd_batch`` lays them out). ``embd`` points at the caller's rows for
    the length of one decode (no copy); :meth:`fill` keeps them referenced until the next.
    """

    _SECTIONS = 4  # GGML_MROPE_SECTIONS: the most positions a row can have

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, np.zeros(capacity * self._SECTIONS, dtype=np.int32), None)
        self._rows: npt.NDArray[np.float32] | None = None

    def fill(
        self,
        rows: npt.NDArray[np.float32],
        positions: int | npt.NDArray[np.int32],
        seq: int,
        output_last: bool,
    ) -> lc.llama_batch:
        """The batch of ``rows`` (at most ``capacity``) at ``positions`` (see
        :meth:`Context.decode_embeddings`), only the last row's logits asked if at all."""
        n = len(rows)
        self._rows = np.ascontiguousarray(rows, dtype=np.float32)
        if isinstance(positions, (int, np.integer)):
            self.pos[:n] = np.arange(positions, positions + n, dtype=np.int32)
        else:
            sections = positions.shape[0]
            if positions.shape != (sections, n) or sections > self._SECTIONS:
                raise ValueError(f"positions of shape {positions.shape} for {n} rows")
            self.pos[: sections * n] = positions.reshape(-1)
        self.seq[:n] = seq
        self.logits[:n] = 0
        self.logits[n - 1] = output_last
        self.struct.embd = self._rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.struct.n_tokens = n
        return self.struct


_MARGIN = 8.0  # e**-8 of the best token's odds
_STRIDE = 64
"""``SamplerChain._candidates`` looks for the k-th best logit among every this many tokens."""
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""``llama_token_data``, as numpy lays it out (12 bytes, no padding)."""


class SamplerChain:
    """A ``llama_sampler`` chain; samplers run in the order they are added."""

    def __init__(self) -> None:
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr: ctypes.c_void_p | None = lc.llama_sampler_chain_init(params)
        self._samplers = 0
        self._leading_top_k: int | None = None  # the k of a top-k that comes first

    def _add(self, sampler: ctypes.c_void_p) -> None:
        lc.llama_sampler_chain_add(self.ptr, sampler)  # the chain owns it from now on
        self._samplers += 1

    def add_penalties(
        self, n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float
    ) -> None:
        self._add(lc.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence))

    def add_top_k(self, k: int) -> None:
        if self._samplers == 0 and k > 0:
            self._leading_top_k = k
        self._add(lc.llama_sampler_init_top_k(k))

    def add_typical(self, p: float) -> None:
        self._add(lc.llama_sampler_init_typical(p, 1))

    def add_top_p(self, p: float) -> None:
        self._add(lc.llama_sampler_init_top_p(p, 1))

    def add_min_p(self, p: float) -> None:
        self._add(lc.llama_sampler_init_min_p(p, 1))

    def add_temp(self, t: float) -> None:
        self._add(lc.llama_sampler_init_temp(t))

    def add_dist(self, seed: int) -> None:
        self._add(lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def add_greedy(self) -> None:
        self._add(lc.llama_sampler_init_greedy())

    def sample(self, ctx: Context, row: int) -> int:
        """Sample from batch row ``row``'s logits and accept the token into the chain."""
        return int(lc.llama_sampler_sample(self.ptr, ctx.ptr, row))

    def sample_weighing(self, ctx: Context, row: int, token: int) -> tuple[int, float]:
        """:meth:`sample`, and the probability the chain gave ``token`` at that row (0 where
        its filters dropped it): the chance that a drafted ``token`` is kept there, which a
        draft's verification would otherwise learn only as kept or not.

        What ``llama_sampler_sample`` does on the CPU: the candidates into an array, the
        chain applied (it filters, sorts, draws one random number and selects), the
        selected token accepted. Where the chain begins with a top-k, the array holds only
        the tokens within a margin of the best logit, as many as make sure the k best are
        among them (:meth:`_candidates`), in the vocabulary's order: the top-k keeps the
        same k, so the tokens drawn and the random numbers are :meth:`sample`'s
        (``test_sampler_weighing.py`` checks it), but for the order of exactly equal logits,
        and filling a few hundred candidates costs less than the vocabulary's."""
        logits = ctx.logits(row)
        ids = self._candidates(logits)
        work = np.empty(len(ids), dtype=_TOKEN_DATA)
        work["id"] = ids
        work["logit"] = logits[ids]
        work["p"] = 0.0
        data = work.ctypes.data_as(lc.llama_token_data_p)
        candidates = lc.llama_token_data_array(data, len(work), -1, False)
        lc.llama_sampler_apply(self.ptr, ctypes.byref(candidates))
        size, selected = int(candidates.size), int(candidates.selected)
        if not 0 <= selected < size:
            raise InternalError("the sampler chain selected no token")
        if ctypes.cast(candidates.data, ctypes.c_void_p).value != work.ctypes.data:
            # llama.cpp allows it; none of its samplers does it (a newer one might)
            raise InternalError("a sampler moved the candidates out of their array")
        kept = work[:size]
        drawn = int(kept["id"][selected])
        lc.llama_sampler_accept(self.ptr, drawn)
        at = np.flatnonzero(kept["id"] == token)
        return drawn, float(kept["p"][at[0]]) if len(at) else 0.0

    def _candidates(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """The token ids :meth:`sample_weighing` gives the chain, in order: where it begins
        with a top-k, the tokens within :data:`_MARGIN` of the best logit if they are k or
        more (a story's row, mostly: tens to hundreds), else every token whose logit
        reaches the k-th best of every :data:`_STRIDE`-th token's (at least the k best:
        those k are tokens too; about k * ``_STRIDE`` in all); else, or if too few reach it
        (NaN), all of them. The margin alone, widened until k tokens reached it, took 8
        passes over a 152k vocabulary where the model was sure of its token (a copy in
        code)."""
        k, n = self._leading_top_k, len(logits)
        if k is not None and k * _STRIDE < n:
            near = np.flatnonzero(logits >= logits.max() - _MARGIN)
            if len(near) >= k:
                return near
            sample = logits[::_STRIDE]
            floor = np.partition(sample, len(sample) - k)[len(sample) - k]
            ids = np.flatnonzero(logits >= floor)
            if len(ids) >= k:
                return ids
        return np.arange(n)

    def accept(self, token: int) -> None:
        lc.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None


# Structured output ---------------------------------------------------------------------------


def guidance_tokenizer(model: Model) -> LLTokenizer:
    """llguidance's tokenizer for ``model``'s vocabulary (structured output: ``runner/grammar.py``
    builds it once per model, about 0.3 s).

    The same as ``llguidance.llamacpp.lltokenizer_from_vocab``, which would import the whole
    ``llama_cpp`` package (see ``bindings.py``): control tokens, and user-defined ones that
    look like ``<...>``, are marked special (a 0xff prefix) so that no grammar allows them
    as text. Every end-of-generation token is an end token, so a mask allows ending exactly
    where the engine ends. It keeps the vocabulary pointer: use it only while the model is
    loaded.
    """
    from llguidance import LLTokenizer

    vocab = model.vocab
    size = 1024
    buf = ctypes.create_string_buffer(size)
    pieces: list[bytes] = []
    eog: list[int] = []
    special_attr = lc.LLAMA_TOKEN_ATTR_CONTROL
    user_attr = lc.LLAMA_TOKEN_ATTR_USER_DEFINED
    for token in range(model.n_vocab):
        n = lc.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n < 0:
            raise InternalError(f"token {token} is longer than {size} bytes")
        piece = buf.raw[:n]
        attr = lc.llama_vocab_get_attr(vocab, token)
        if attr & special_attr or (
            attr & user_attr and piece.startswith(b"<") and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        pieces.append(piece)
        if lc.llama_vocab_is_eog(vocab, token):
            eog.append(token)
    tokenize = ctypes.cast(lc._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=pieces,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=eog,
        slices=LLTokenizer.json_slices(),
    )


# Embeddings ----------------------------------------------------------------------------------

_POOLING_NAMES = {
    lc.LLAMA_POOLING_TYPE_NONE: "none",
    lc.LLAMA_POOLING_TYPE_MEAN: "mean",
    lc.LLAMA_POOLING_TYPE_CLS: "cls",
    lc.LLAMA_POOLING_TYPE_LAST: "last",
    lc.LLAMA_POOLING_TYPE_RANK: "rank",
}
# Ollama's default batch for embedding models (``DefaultEmbeddingNumBatch``): a bidirectional
# model must see a whole input in one pass, so its batch bounds the input.
_EMBEDDING_BATCH = 2048
# Inputs start at multiples of this many cache cells (``runner/embedder.py`` ``plan``): the
# widest SIMD vector of ggml's CPU kernels (AVX-512: 16 floats) and so a multiple of the
# narrower ones. Measured on SmolLM2 (AMD EPYC, AVX-512): at every multiple of 16 an input's
# vector is bit-identical to the vector of the input alone; at other offsets it is not.
_CELL_ALIGN = 16
# Rounds of several inputs hold at most this many tokens: llama.cpp pads the cells that
# attention spans to 256, so an input alone already pays for 256, and packing up to 256
# costs nothing more; beyond, every token attends over more cells. Measured on SmolLM2 (2
# threads, inputs of 1 to 200 words): rounds of 256 tokens 246 tok/s, 512 200, 1024 115.
_ROUND_TOKENS = 256


class EmbeddingContext:
    """A second kind of context over a loaded :class:`Model`: embedding mode, one pooled vector
    per sequence. It shares the model's weights with any generation context (llama.cpp
    contexts are independent), and implements ``runner.embedder.EmbeddingBackend``.

    Pooling is the model's own (``<arch>.pooling_type``: mean, CLS or last). A generation
    model has none; it gets **last-token pooling**: with causal attention the last token is
    the only one that has seen the whole input, this is the pooling of decoder embedding
    models (Qwen3-Embedding, e5-mistral), and it is what Ollama's own llama.cpp runner
    returned for such models (``GetEmbeddingsIth`` of the sequence's last row when no pooled
    vector existed). Mean pooling over a causal model would weigh early tokens, which saw
    little of the text, as much as the last ones.

    Sizes: with causal attention and last-token pooling an input may span passes
    (``splittable``), so the batch stays ``n_batch`` (the context's output buffer is
    ``n_vocab`` floats per batch token: 100 MB at 512 for SmolLM2, so a batch of the whole
    context would cost gigabytes) and an input may fill the context (``n_ctx``). Otherwise
    one pass must hold a whole input: the batch is ``n_ctx``, at most
    ``max(n_batch, 2048)`` (Ollama's embedding batch), and that bounds an input.

    What must stay true:

    * for a causal model (one with a KV cache), flash attention is off and the cache is f16
      whatever the server's settings: llama.cpp's CPU flash-attention kernel accumulates in
      f16 in an order that depends on how many cache cells the batch spans, so a vector
      would change with what else was batched with it (measured on SmolLM2: up to 0.04 per
      normalized component);
    * a bidirectional encoder (BERT: no KV cache, attention over the pass itself) runs with
      flash attention **on** and unaligned inputs: its kernel skips masked keys, so an input
      sees the same keys in the same order in any company; measured on all-MiniLM (F16, 2
      threads, 64 short texts): twice the speed of the unfused attention, which materializes
      and soft-maxes the whole pass's scores, and a vector within 1.4e-4 per normalized
      component of the input's alone (7e-5 without: the matrix kernels' own share), against
      28 % more tokens spent on alignment filler that such a model does not need;
    * the cache is unified (``kv_unified``) and ``n_seq_max`` is ``min(batch, 256)``, as
      llama-cpp-python's own ``Llama.embed`` sets for embedding contexts; a causal model's
      inputs start at aligned cells (``_CELL_ALIGN``), so that an input's arithmetic, down to
      the rounding, does not depend on the inputs before it;
    * used by one thread (the embedding loop's); :meth:`tokenize` only reads the vocabulary.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_threads: int) -> None:
        arch = model.meta("general.architecture") or ""
        declared = model.meta(f"{arch}.pooling_type")
        pooling = int(declared) if declared and declared.isdigit() else None
        if pooling not in (
            lc.LLAMA_POOLING_TYPE_MEAN,
            lc.LLAMA_POOLING_TYPE_CLS,
            lc.LLAMA_POOLING_TYPE_LAST,
            lc.LLAMA_POOLING_TYPE_RANK,
        ):
            pooling = lc.LLAMA_POOLING_TYPE_LAST
        self.pooling = _POOLING_NAMES[pooling]
        last = pooling == lc.LLAMA_POOLING_TYPE_LAST
        if last:
            batch = max(1, min(n_batch, n_ctx))
            cells = n_ctx
        else:
            batch = max(1, min(n_ctx, max(n_batch, _EMBEDDING_BATCH)))
            cells = batch
        params = ContextParams(
            n_ctx=cells,
            n_seq_max=min(batch, int(lc.llama_max_parallel_sequences())),
            n_batch=batch,
            n_ubatch=batch,
            n_threads=n_threads,
            flash_attn_type=lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            type_k=lc.GGML_TYPE_F16,
            type_v=lc.GGML_TYPE_F16,
            kv_unified=True,
            embeddings=True,
            pooling_type=pooling,
        )
        self.model = model
        self.ctx = Context(model, params)
        self.causal: bool = bool(lc.llama_get_causal_attn(self.ctx.ptr))
        if not self.causal:  # an encoder: flash attention (see the class docstring)
            self.ctx.close()
            fused = replace(params, flash_attn_type=lc.LLAMA_FLASH_ATTN_TYPE_ENABLED)
            self.ctx = Context(model, fused)
        self.n_batch: int = self.ctx.n_batch
        self.n_ctx: int = self.ctx.n_ctx
        self.n_seq_max: int = self.ctx.n_seq_max
        self.splittable: bool = last and self.causal
        self.limit: int = min(n_ctx, self.n_ctx if self.splittable else self.n_batch)
        self.n_tail: int = model.n_tail_specials
        self.ranks: bool = pooling == lc.LLAMA_POOLING_TYPE_RANK
        # A cross-encoder's pooled output is its classifier's n_cls_out scores.
        self.dim: int = lc.llama_model_n_cls_out(model.ptr) if self.ranks else model.n_embd_out
        self.align = _CELL_ALIGN if self.causal else 1
        self.round_tokens = _ROUND_TOKENS
        bos = lc.llama_vocab_bos(model.vocab)
        self.pad_token: int = bos if bos >= 0 else 0
        self._batch = Batch(self.n_batch)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def tokenize_text(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False, parse_special=False)

    def pair_frame(self, query: str) -> tuple[list[int], list[int]]:
        """A cross-encoder's tokens around a document (``runner/embedder.py``).

        With the GGUF's rerank template (``tokenizer.chat_template.rerank``, as llama-server
        reads it), the template's text around ``{document}``, the query's tokens where it
        says ``{query}``. Otherwise llama-server's pair ``[BOS] query [EOS] [SEP] document
        [EOS]`` by the vocabulary's add-BOS/EOS/SEP flags, plus the closing ``[SEP]`` of a
        vocabulary that adds SEP but no EOS (BERT's WordPiece): ``[CLS] q [SEP] d [SEP]``,
        the pair a BERT cross-encoder was trained on, where llama-server leaves the last
        ``[SEP]`` off. The query and documents are user text: their special-token strings
        stay text; only the template's own are parsed.
        """
        template = self.model.meta("tokenizer.chat_template.rerank")
        if template and "{document}" in template:
            head, tail = template.split("{document}", 1)
            return self._template_tokens(head, query), self._template_tokens(tail, query)
        vocab = self.model.vocab
        eos = lc.llama_vocab_eos(vocab)
        if eos < 0:
            eos = lc.llama_vocab_sep(vocab)
        add_eos = lc.llama_vocab_get_add_eos(vocab) and eos >= 0
        sep = lc.llama_vocab_sep(vocab)
        add_sep = lc.llama_vocab_get_add_sep(vocab) and sep >= 0
        before = [lc.llama_vocab_bos(vocab)] if lc.llama_vocab_get_add_bos(vocab) else []
        before += self.tokenize_text(query)
        before += [eos] if add_eos else []
        before += [sep] if add_sep else []
        after = [eos] if add_eos else [sep] if add_sep else []
        return before, after

    def _template_tokens(self, text: str, query: str) -> list[int]:
        tokens: list[int] = []
        for i, part in enumerate(text.split("{query}")):
            if i:
                tokens += self.tokenize_text(query)
            if part:
                tokens += self.model.tokenize(part, add_special=False, parse_special=True)
        return tokens

    def clear(self) -> None:
        self.ctx.clear()  # llama_memory_clear ignores the NULL memory of cache-less encoders

    def forward(
        self, pieces: Sequence[tuple[int, Sequence[int], int]], finished: Sequence[int]
    ) -> list[bytes]:
        """One ``llama_decode`` of every piece, every row an output (llama.cpp requires it
        for pooled embeddings); the pooled vectors of ``finished`` as float32 bytes."""
        batch = self._batch
        batch.clear()
        for seq, tokens, pos0 in pieces:
            start = batch.n_tokens
            batch.add_run(tokens, pos0, seq, True)
            batch.logits[start : batch.n_tokens] = 1
        rc = self.ctx.decode(batch)
        if rc != 0:
            raise InternalError(f"llama_decode failed for an embedding batch (status {rc})")
        vectors = []
        for seq in finished:
            ptr = lc.llama_get_embeddings_seq(self.ctx.ptr, seq)
            if not ptr:
                raise InternalError(f"llama.cpp returned no embedding for sequence {seq}")
            vector = np.ctypeslib.as_array(ptr, shape=(self.dim,))
            vectors.append(vector.astype("<f4").tobytes())
        return vectors

    def warmup(self) -> None:
        """One pass of one token, so that the first request does not pay for page faults."""
        lc.llama_set_warmup(self.ctx.ptr, True)
        try:
            self.forward([(0, [self.pad_token], 0)], [])
        finally:
            lc.llama_set_warmup(self.ctx.ptr, False)
            self.clear()

    def close(self) -> None:
        self.ctx.close()
