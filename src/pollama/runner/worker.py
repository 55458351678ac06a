"""The worker process: one loaded model, served over the protocol of ``runner/protocol.py``.

    python -m pollama.runner.worker --fd N --spec JSON

fd N is this process's end of a ``socketpair``; JSON is a ``LoadSpec``. The worker loads the
model and answers ``ready`` (or ``fatal`` and exits 1). Then three threads share the work:

* the main thread runs the :class:`~pollama.runner.engine.Engine` loop, which owns the
  llama.cpp context;
* a reader thread parses operations: completions and cancels go to the engine's queue,
  embeddings to the embedding loop's, tokenize/detokenize are answered at once (the
  vocabulary is read-only, so this is safe while a decode runs, and it does not wait for a
  decode step);
* all write through one lock, a whole line at a time, so messages never interleave.

Embeddings (``runner/embedder.py``) use a context of their own in embedding mode, sharing
the model's weights. A generation model's worker creates it when the first embedding request
comes and runs it on a fourth thread, so embeddings and generation do not wait for each
other (llama.cpp contexts are independent; on a small machine they share its cores). An
embedding model's worker (``LoadSpec.embedding``) has only that context: no engine, the
embedding loop on the main thread, and completions refused.

The worker exits cleanly on ``shutdown`` or when the socket closes (the server died), and
never writes anything but protocol messages to the socket; llama.cpp's log goes to stderr.
With ``--kv-cache DIR --kv-cache-max-bytes N`` (the server passes them) it keeps its prompt
cache across unloads (``runner/kvstate.py``): after ``ready`` and before the loop admits a
request it reads saved sequences back into its empty slots, and once the loop has stopped it
saves its idle ones, within a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pollama.errors import InvalidRequest
from pollama.runner.base import (
    MAX_UBATCH,
    CompletionChunk,
    EmbeddingResult,
    LoadSpec,
    RunnerInfo,
    kv_bytes_per_element,
    usable_cpus,
)
from pollama.runner.embedder import EmbeddingLoop, Naming
from pollama.runner.offload import CPU_DEVICE, OffloadReport
from pollama.runner.protocol import (
    MAX_LINE,
    chunk_to_json,
    decode,
    done_to_json,
    embedding_result_to_json,
    encode,
    request_from_json,
)

if TYPE_CHECKING:
    from pollama.runner.drafter import DraftModel
    from pollama.runner.engine import Engine, Event
    from pollama.runner.kvstate import PromptCache
    from pollama.runner.llama import Context, EmbeddingContext, LogSink, Model
    from pollama.runner.media import Projector


def _log(message: str) -> None:
    sys.stderr.write(f"pollama worker {os.getpid()}: {message}\n")
    sys.stderr.flush()


class Writer:
    """Serializes messages onto the socket; after the first failed write (the server is
    gone) every send returns False and ``on_close`` has been called once."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.closed = False
        self.on_close: list[Any] = []

    def send(self, message: dict[str, Any]) -> bool:
        data = encode(message)
        with self._lock:
            if self.closed:
                return False
            try:
                self._sock.sendall(data)
                return True
            except OSError:
                self.closed = True
        for callback in self.on_close:
            callback()
        return False


_VOCAB_SLACK = 128
"""How many tokens a draft model's vocabulary may have more or fewer than the model's (llama.cpp's
``SPEC_VOCAB_MAX_SIZE_DIFFERENCE``: added special tokens at the end)."""


def _threads(spec: LoadSpec) -> int:
    """The spec's thread count; 0 means every CPU this process may use."""
    return spec.num_thread if spec.num_thread > 0 else usable_cpus()


class Loaded:
    """The model, its context (generation, or embedding for an embedding model) and what
    ``ready`` reports."""

    def __init__(self, spec: LoadSpec, log: LogSink) -> None:
        from pollama.runner import llama

        if not os.path.isfile(spec.model_path):
            raise FileNotFoundError(f"model file not found: {spec.model_path}")
        if spec.num_ctx < 1 or spec.num_parallel < 1 or spec.num_batch < 1:
            raise ValueError("num_ctx, num_parallel and num_batch must be positive")
        start = time.perf_counter_ns()
        llama.backend_init()
        # Before the load: llama.cpp takes every registered device, RPC ones first.
        llama.add_rpc_servers(spec.rpc_servers)
        offload = llama.OffloadParams(spec.gpu_layers, spec.main_gpu, spec.tensor_split)
        self.model: Model = llama.Model(spec.model_path, use_mmap=spec.use_mmap, offload=offload)
        self.model.start_max_token_bytes()  # for ``ready``, while the context is made
        try:
            type_k, type_v, warning = llama.kv_cache_types(
                spec.kv_cache_type, spec.flash_attention, self.model.head_dims()
            )
        except Exception:
            self.model.close()
            raise
        if warning:
            _log(warning)
        self.spec = spec
        self.n_threads = _threads(spec)
        self._projector_device = CPU_DEVICE
        self.ctx: Context | None = None
        self.embedding: EmbeddingContext | None = None
        if spec.embedding:
            self._load_embedding_model()
        else:
            self._load_generation_model(type_k, type_v)
        self.projector: Projector | None = None
        if spec.projectors and not spec.embedding:
            self._load_projector(spec.projectors[0], log.report)
        self.drafter: DraftModel | None = None
        self._draft_parts: list[Context | Model] = []  # closed in order
        if spec.draft_path and not spec.embedding:
            self._load_draft_model(spec.flash_attention)
        self.info = self._info(log.report, time.perf_counter_ns() - start)

    def _info(self, report: OffloadReport, load_ns: int) -> RunnerInfo:
        """What ``ready`` says: sizes and places from llama.cpp's own log (``report``), or
        the worker's estimate, all on the CPU, if it logged no buffer at all."""
        spec, projector = self.spec, self.projector
        if not report.device_bytes:
            report.add(CPU_DEVICE, int(self.model.size_bytes + self._kv_bytes))
        if projector is not None:  # its weights are read into memory, not mapped
            report.add(self._projector_device, os.path.getsize(projector.path))
        return RunnerInfo(
            pid=os.getpid(),
            n_ctx=self.n_ctx,
            n_ctx_train=self.model.n_ctx_train,
            n_parallel=1 if spec.embedding else spec.num_parallel,
            n_vocab=self.model.n_vocab,
            memory_bytes=report.total_bytes,
            load_duration_ns=load_ns,
            max_token_bytes=self.model.max_token_bytes(),
            vision=projector is not None and projector.vision,
            audio=projector is not None and projector.audio,
            image_tokens=projector.image_tokens if projector is not None else 0,
            device_bytes=dict(report.device_bytes),
            gpu_layers=report.gpu_layers,
            layers=report.layers or self.model.n_layer + 1,
        )

    def _load_projector(self, path: str, report: OffloadReport) -> None:
        """The model's projector; one that fails to load fails the load, naming the file
        (llama.cpp's reason follows in the fatal message, from its log).

        It goes to an accelerator only when the model's layers did: mtmd then takes the
        first GPU (or integrated GPU) of the registry, the first of llama.cpp's offload
        devices; a model left on the CPU keeps its projector there too."""
        from pollama.runner.devices import offload_devices, query_devices
        from pollama.runner.media import Projector

        if len(self.spec.projectors) > 1:
            _log(f"the model has {len(self.spec.projectors)} projectors; using {path}")
        use_gpu = report.gpu_layers > 0
        if use_gpu:
            targets = offload_devices(query_devices().devices)
            self._projector_device = targets[0].name if targets else CPU_DEVICE
        try:
            self.projector = Projector(path, self.model, self.n_threads, use_gpu=use_gpu)
        except Exception:
            self.close()
            raise

    def _load_draft_model(self, flash_attention: bool | None) -> None:
        """The draft model (Modelfile ``DRAFT``, ``runner/drafter.py``) and its context: the
        target's slots, each with :data:`DRAFT_MODEL_MAX` cells more, an f16 cache, on the
        CPU. One whose vocabulary is not the target's fails the load (create refuses such a
        pair; a model pulled from elsewhere may still hold one)."""
        from pollama.runner import llama
        from pollama.runner.drafter import DRAFT_MODEL_MAX, DraftModel

        spec = self.spec
        try:
            model = llama.Model(spec.draft_path, use_mmap=spec.use_mmap)
        except Exception:
            self.close()
            raise
        self._draft_parts.append(model)
        if abs(model.n_vocab - self.model.n_vocab) > _VOCAB_SLACK:
            self.close()
            raise ValueError(
                f"the draft model's vocabulary ({model.n_vocab} tokens) is not the model's "
                f"({self.model.n_vocab} tokens)"
            )
        n_batch = max(spec.num_batch, spec.num_parallel)
        params = llama.ContextParams(
            n_ctx=(spec.num_ctx + DRAFT_MODEL_MAX) * spec.num_parallel,
            n_seq_max=spec.num_parallel,
            n_batch=n_batch,
            n_ubatch=min(n_batch, MAX_UBATCH),
            n_threads=self.n_threads,
            flash_attn_type=llama.flash_attn_type(flash_attention, "f16"),
            kv_unified=False,
        )
        try:
            ctx = llama.Context(model, params)
            self._draft_parts.insert(0, ctx)  # closed before its model
            ctx.warmup()
        except Exception:
            self.close()
            raise
        self.drafter = DraftModel(
            ctx,
            llama.Batch(n_batch),
            spec.num_parallel,
            n_vocab_target=self.model.n_vocab,
            n_ctx=ctx.n_ctx_seq,
        )
        _log(f"draft model: {os.path.basename(spec.draft_path)}, {model.n_vocab} tokens")

    def _load_generation_model(self, type_k: int, type_v: int) -> None:
        from pollama.runner import llama

        spec = self.spec
        n_batch = max(spec.num_batch, spec.num_parallel)
        params = llama.ContextParams(
            n_ctx=spec.num_ctx * spec.num_parallel,
            n_seq_max=spec.num_parallel,
            n_batch=n_batch,
            n_ubatch=min(n_batch, MAX_UBATCH),
            n_threads=self.n_threads,
            flash_attn_type=llama.flash_attn_type(spec.flash_attention, spec.kv_cache_type),
            type_k=type_k,
            type_v=type_v,
            kv_unified=False,
        )
        try:
            self.ctx = llama.Context(self.model, params)
        except Exception:
            self.model.close()
            raise
        try:
            self.ctx.set_lora(list(spec.adapters))
            self.ctx.warmup()
        except Exception:
            self.close()
            raise
        self.n_ctx = min(spec.num_ctx, self.ctx.n_ctx_seq)
        self.n_batch = n_batch
        self.kv_types = (type_k, type_v)
        self._kv_bytes = (
            2 * self.model.n_layer * self.ctx.n_ctx
            * self.model.n_head_kv * (self.model.n_embd // max(1, self.model.n_head))
            * kv_bytes_per_element(spec.kv_cache_type)
        )  # fmt: skip

    def _load_embedding_model(self) -> None:
        self.n_ctx = self.spec.num_ctx
        try:
            self.embedding = self.open_embedding()
            self.embedding.warmup()
        except Exception:
            self.close()
            raise
        self.n_ctx = self.embedding.limit
        self.n_batch = self.embedding.n_batch
        self._kv_bytes = 0.0  # the log's buffer sizes count it (llama.cpp always logs them)

    def open_embedding(self) -> EmbeddingContext:
        """The embedding context over the loaded weights (made once; the embedding loop
        calls this on its own thread, for a generation model when first asked)."""
        from pollama.runner import llama

        if self.embedding is None:
            embedding = llama.EmbeddingContext(
                self.model,
                n_ctx=self.n_ctx,
                n_batch=self.spec.num_batch,
                n_threads=self.n_threads,
            )
            try:  # the model's LoRA adapters apply to its embeddings as to its text
                embedding.ctx.set_lora(list(self.spec.adapters))
            except Exception:
                embedding.close()
                raise
            self.embedding = embedding
            _log(
                f"embedding context: {self.embedding.pooling} pooling, inputs up to "
                f"{self.embedding.limit} tokens"
            )
        return self.embedding

    def close(self) -> None:
        projector = getattr(self, "projector", None)
        if projector is not None:
            projector.close()
        for part in getattr(self, "_draft_parts", []):
            part.close()
        if self.embedding is not None:
            self.embedding.close()
        if self.ctx is not None:
            self.ctx.close()
        self.model.close()


class MediaInbox:
    """The ``media`` messages of completions not yet received, by request id (only the
    reader thread uses it). A completion takes its media; a cancel drops them."""

    def __init__(self) -> None:
        self._media: dict[Any, list[bytearray]] = {}
        self._continued: dict[Any, bool] = {}

    def add(self, req_id: Any, data: str, more: bool) -> None:
        piece = base64.b64decode(data, validate=True)
        items = self._media.setdefault(req_id, [])
        if items and self._continued.get(req_id):
            items[-1] += piece
        else:
            items.append(bytearray(piece))
        self._continued[req_id] = more

    def take(self, req_id: Any) -> tuple[bytes, ...]:
        self._continued.pop(req_id, None)
        return tuple(bytes(item) for item in self._media.pop(req_id, ()))


FRAME_INTERVAL = 0.1
"""A stream's text goes to the server at most once per this many seconds (the first token at
once, the held text with the next token after the interval, and all of it before the final
message). Every message costs CPU in the server (read, parse, frame, write) and in the client
(read, parse), and on a machine whose cores all decode, that time is taken from llama.cpp's
threads, which wait for each other at every graph node. Measured with SmolLM2 on 2 cores at
8 streams (45 ms decodes, fresh servers): with 25 ms frames every token was a message and
the worker waited 2.7 ms (median) between two decodes, with 100 ms frames 0.8 ms; in the
same 5 rounds, paired with llama-server, the client-side rate was 0.84 of its rate with
25 ms frames and 0.93 with 100 ms. Ten frames a second still reads as a stream; a chunk with
logprobs is never held (its entries stay one a token, as Ollama's)."""


class _Emitter:
    """The ``emit`` of one completion: its events as worker messages, text coalesced
    (:data:`FRAME_INTERVAL`)."""

    def __init__(self, writer: Writer, req_id: Any) -> None:
        self.writer, self.req_id = writer, req_id
        self.held: list[str] = []
        self.sent = 0.0  # when text was last sent (perf_counter)

    def __call__(self, event: Event) -> bool:
        req_id, send = self.req_id, self.writer.send
        if not isinstance(event, CompletionChunk) or event.done or event.logprobs:
            # what was held goes first: the text before an error, an end or a logprob
            if self.held and not send(self._held()):
                return False
        if not isinstance(event, CompletionChunk):
            return send({"id": req_id, "type": "error", "kind": event.kind,
                         "message": event.message})  # fmt: skip
        if event.done:
            return send({"id": req_id, "type": "done", **done_to_json(event)})
        if event.logprobs:
            return send({"id": req_id, "type": "chunk", **chunk_to_json(event)})
        self.held.append(event.text)
        now = time.perf_counter()
        if now - self.sent < FRAME_INTERVAL:
            return True
        self.sent = now
        return send(self._held())

    def _held(self) -> dict[str, Any]:
        text = "".join(self.held)
        self.held.clear()
        return {"id": self.req_id, "type": "chunk", "text": text}


def _embedding_reply(writer: Writer, req_id: Any) -> Any:
    def reply(result: EmbeddingResult | BaseException) -> bool:
        if isinstance(result, EmbeddingResult):
            return writer.send({"id": req_id, "type": "result", **embedding_result_to_json(result)})
        kind = "invalid" if isinstance(result, InvalidRequest | ValueError) else "internal"
        message = str(result) if kind == "invalid" else f"{type(result).__name__}: {result}"
        return writer.send({"id": req_id, "type": "error", "kind": kind, "message": message})

    return reply


def _submit_embed(
    message: dict[str, Any],
    embedder: EmbeddingLoop,
    reply: Callable[[EmbeddingResult | BaseException], object],
) -> None:
    """Queue an ``embed`` op (see ``runner/protocol.py``) on the embedding loop."""
    inputs = message["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise ValueError("inputs must be a list of strings")
    query = message.get("query")
    if query is not None and not isinstance(query, str):
        raise ValueError("query must be a string")
    naming = Naming(str(message.get("label", "input")), int(message.get("offset", 0)))
    truncate = bool(message.get("truncate", True))
    embedder.submit(message.get("id"), inputs, truncate, reply, query=query, naming=naming)


def _handle(
    message: dict[str, Any],
    loaded: Loaded,
    engine: Engine | None,
    embedder: EmbeddingLoop,
    writer: Writer,
    inbox: MediaInbox,
) -> bool:
    """Serve one operation; False on ``shutdown``."""
    op = message.get("op")
    req_id = message.get("id")
    model = loaded.model
    try:
        if op == "media":
            inbox.add(req_id, str(message["data"]), bool(message.get("more")))
        elif op == "completion":
            media = inbox.take(req_id)
            if engine is None:
                raise ValueError("this is an embedding model: it does not support generate")
            request = request_from_json(message["request"], media)
            engine.submit(req_id, request, _Emitter(writer, req_id))
        elif op == "embed":
            _submit_embed(message, embedder, _embedding_reply(writer, req_id))
        elif op == "cancel":
            inbox.take(req_id)
            if engine is not None:
                engine.cancel(req_id)
            embedder.cancel(req_id)
        elif op == "tokenize":
            tokens = model.tokenize(str(message["text"]), bool(message.get("add_special", True)))
            writer.send({"id": req_id, "type": "result", "tokens": tokens})
        elif op == "detokenize":
            tokens = _token_ids(message["tokens"], model.n_vocab)
            text = model.detokenize(tokens).decode("utf-8", "replace")
            writer.send({"id": req_id, "type": "result", "text": text})
        elif op == "pieces":
            tokens = _token_ids(message["tokens"], model.n_vocab)
            pieces = [base64.b64encode(model.token_to_piece(t)).decode() for t in tokens]
            writer.send({"id": req_id, "type": "result", "pieces": pieces})
        elif op == "shutdown":
            return False
        else:
            raise ValueError(f"unknown op {op!r}")
    except (KeyError, TypeError, ValueError) as exc:
        if req_id is not None:
            writer.send({"id": req_id, "type": "error", "kind": "invalid", "message": str(exc)})
        else:
            _log(f"ignored a malformed message: {exc}")
    except Exception as exc:  # never let one bad request end the worker
        if req_id is not None:
            msg = f"{type(exc).__name__}: {exc}"
            writer.send({"id": req_id, "type": "error", "kind": "internal", "message": msg})
    return True


def _token_ids(values: Any, n_vocab: int) -> list[int]:
    """The token ids of a message, each checked against the vocabulary (``ValueError``
    naming the first bad one)."""
    tokens = [int(t) for t in values]
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"invalid token id {bad[0]}")
    return tokens


def _read_loop(
    sock: socket.socket,
    loaded: Loaded,
    engine: Engine | None,
    embedder: EmbeddingLoop,
    writer: Writer,
) -> None:
    """Parse operations until ``shutdown`` or EOF, then stop the engine and the embedder."""
    inbox = MediaInbox()
    try:
        with sock.makefile("rb", buffering=1 << 16) as stream:
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    _log("a protocol line is too long; closing")
                    break
                if not line.strip():
                    continue
                try:
                    message = decode(line)
                except ValueError as exc:
                    _log(f"ignored a message that is not JSON: {exc}")
                    continue
                if not _handle(message, loaded, engine, embedder, writer, inbox):
                    break
    except OSError as exc:
        _log(f"socket error: {exc}")
    finally:
        embedder.stop()
        if engine is not None:
            engine.stop()


# Spin iterations of an OpenMP thread waiting at a barrier before it sleeps (libgomp's
# default is 300,000: milliseconds). ggml meets at a barrier after every graph node; when
# something else keeps a core busy, a long spin burns the core that the partner thread needs.
# SmolLM2-135M on 2 cores, idle machine, 8 interleaved rounds: default 96, 3,000 spins 97.5
# tok/s (noise); beside one busy process: default 0.3-11, 3,000 spins 7-12 tok/s. The thread
# tuner (``runner/tuning.py``) then moves to fewer threads; this bounds the first steps.
_GOMP_SPINCOUNT = "3000"


def _tune_threads() -> None:
    """Environment for the native thread pools, read once when llama.cpp's libraries load,
    so it must run before the first ``llama_cpp`` import. A user's own OpenMP setting wins.
    numpy's BLAS pool is never used here; its threads would only compete with ggml's."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process: load the model the spec names, say ``ready``, then serve
    operations (``_read_loop``, on a thread) while this thread runs the engine's loop, or
    the embedder's for an embedding model. 1 when the model never became ready."""
    args = _parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    writer = Writer(sock)
    # Held by this frame for the life of the process: llama.cpp calls back into it.
    log = _open_log()
    if args.spec is not None:
        spec_text: str | bytes = args.spec
    else:
        _import_ahead()
        line = _receive_load(sock)
        if line is None:  # the server let its spare go
            return 0
        spec_text = line
    try:
        spec = _parse_spec(spec_text, spare=args.spec is None)
    except (TypeError, ValueError) as exc:
        writer.send({"type": "fatal", "message": f"invalid load spec: {exc}"})
        return 1
    loaded = _load(spec, log, writer)
    if loaded is None:
        return 1

    engine = _engine(loaded, spec)
    if engine is not None:
        writer.on_close.append(engine.stop)
    # A generation model's embeddings run on a thread of their own, started by the first one.
    embedder = EmbeddingLoop(loaded.open_embedding, background=engine is not None)
    writer.on_close.append(embedder.stop)
    if not writer.send({"type": "ready", "info": asdict(loaded.info)}):
        return 1
    reader = threading.Thread(
        target=_read_loop,
        args=(sock, loaded, engine, embedder, writer),
        name="reader",
        daemon=True,
    )
    reader.start()
    if engine is not None:
        cache = _prompt_cache(args.kv_cache, args.kv_cache_max_bytes, loaded, spec)
        if cache is not None:  # before the loop admits the first request
            _guarded(lambda: cache.restore(engine))
        engine.run()
        if cache is not None:  # a graceful stop: the loop is over, its slots are idle
            _guarded(lambda: cache.save(engine))
    else:
        embedder.run()
    reader.join(timeout=2.0)
    embedder.stop()
    # Free the model only when no thread may still use it (tokenizing, embedding).
    if embedder.join(timeout=2.0) and not reader.is_alive():
        loaded.close()
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pollama.runner.worker")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    parser.add_argument(
        "--spec", help="the LoadSpec as JSON (without it: a spare, runner/spare.py, that "
        "imports llama.cpp, then waits for a load message with the spec)"
    )
    parser.add_argument("--kv-cache", default="", help="the prompt cache's directory")
    parser.add_argument(
        "--kv-cache-max-bytes", type=int, default=0, help="its bound in bytes (0: off)"
    )
    return parser.parse_args(argv)


def _import_ahead() -> None:
    """What a spare does before its load message, so that the load does not: import the
    engine's modules and the prompt cache's, and read the engine's version (a scan of the
    installed packages). About 50 ms of a load's time to ``ready`` and first token."""
    from pollama.runner import engine, kvstate, llama, tuning

    del engine, kvstate, tuning
    llama.state_format()


def _receive_load(sock: socket.socket) -> bytes | None:
    """A spare's first line, the ``load`` message; None at EOF (or a line past
    :data:`MAX_LINE`). Reads exactly up to its newline (peeking first), so that whatever
    follows stays on the socket for the read loop."""
    line = bytearray()
    while len(line) <= MAX_LINE:
        ahead = sock.recv(1 << 16, socket.MSG_PEEK)
        if not ahead:
            return None
        end = ahead.find(b"\n")
        part = sock.recv(len(ahead) if end < 0 else end + 1)
        line += part
        if part.endswith(b"\n"):
            return bytes(line)
    return None


def _parse_spec(text: str | bytes, *, spare: bool) -> LoadSpec:
    """The spec from ``--spec``, or from a spare's ``{"type": "load", "spec": ...}``."""
    value = json.loads(text)
    if spare:
        if not isinstance(value, dict) or value.get("type") != "load":
            raise ValueError("a spare worker's first message must be a load message")
        value = value.get("spec")
    return LoadSpec.from_json(value)


def _open_log() -> LogSink:
    """llama.cpp's log, set up after the thread tuning its libraries read when they load.

    The sink's ctypes callback must outlive every llama.cpp call: the caller keeps it for
    the life of the process (a sink freed early makes llama.cpp's next log line a crash)."""
    _tune_threads()
    from pollama.runner import llama

    return llama.LogSink(verbose=os.environ.get("OLLAMA_DEBUG", "") not in ("", "0", "false"))


def _load(spec: LoadSpec, log: LogSink, writer: Writer) -> Loaded | None:
    """The model loaded as ``spec`` says, or None once a ``fatal`` message said why not
    (with llama.cpp's last logged error when the exception does not already carry it)."""
    try:
        return Loaded(spec, log)
    except Exception as exc:
        detail = f" ({log.last_error})" if log.last_error and log.last_error not in str(exc) else ""
        writer.send({"type": "fatal", "message": f"{exc}{detail}"})
        return None


def _prompt_cache(root: str, max_bytes: int, loaded: Loaded, spec: LoadSpec) -> PromptCache | None:
    """The prompt cache across unloads (``runner/kvstate.py``), None when it is off."""
    from pollama.runner.kvstate import PromptCache, cache_material

    if not root or max_bytes <= 0 or loaded.ctx is None:
        return None
    try:
        type_k, type_v = loaded.kv_types
        material = cache_material(spec, n_ctx=loaded.n_ctx, type_k=type_k, type_v=type_v)
    except OSError as exc:
        _log(f"prompt cache off: {exc}")
        return None
    return PromptCache.open(root, max_bytes, material, _log)


def _guarded(action: Callable[[], object]) -> None:
    """Run a prompt-cache step; a failure costs the cache, never the worker."""
    try:
        action()
    except Exception as exc:
        _log(f"prompt cache: {type(exc).__name__}: {exc}")


def _engine(loaded: Loaded, spec: LoadSpec) -> Engine | None:
    """The decode loop of a generation model (None for an embedding model: no context)."""
    from pollama.runner.engine import Engine
    from pollama.runner.tuning import ThreadTuner

    if loaded.ctx is None:
        return None
    tuner = None
    if spec.num_thread <= 0:  # threads left to us: adapt them to what else runs (tuning.py)
        ctx = loaded.ctx
        tuner = ThreadTuner(loaded.n_threads, lambda n: ctx.set_threads(n, n))
    return Engine(
        loaded.model,
        loaded.ctx,
        n_ctx=loaded.n_ctx,
        n_batch=loaded.n_batch,
        n_parallel=spec.num_parallel,
        tuner=tuner,
        projector=loaded.projector,
        n_threads=loaded.n_threads,
        log=_log,
        drafter=loaded.drafter,
    )


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: llama.cpp may still log through our callback
