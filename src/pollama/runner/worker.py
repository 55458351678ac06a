"""The worker process: one loaded model, served over the protocol of ``runner/protocol.py``.

    python -m pollama.runner.worker --fd N --spec JSON

fd N is this process's end of a ``socketpair``; JSON is a ``LoadSpec``. The worker loads the
model and answers ``ready`` (or ``fatal`` and exits 1). Then three threads share the work:

* the main thread runs the :class:`~pollama.runner.engine.Engine` loop, which owns the
  llama.cpp context;
* a reader thread parses operations: completions and cancels go to the engine's queue,
  tokenize/detokenize are answered at once (the vocabulary is read-only, so this is safe
  while a decode runs, and it does not wait for a decode step);
* both write through one lock, a whole line at a time, so messages never interleave.

The worker exits cleanly on ``shutdown`` or when the socket closes (the server died), and
never writes anything but protocol messages to the socket; llama.cpp's log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pollama.runner.base import CompletionChunk, LoadSpec, RunnerInfo
from pollama.runner.protocol import MAX_LINE, decode, done_to_json, encode, request_from_json

if TYPE_CHECKING:
    from pollama.runner.engine import Engine, Event
    from pollama.runner.llama import Context, LogSink, Model

_KV_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


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


def _threads(spec: LoadSpec) -> int:
    if spec.num_thread > 0:
        return spec.num_thread
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Loaded:
    """The model, its context and what ``ready`` reports."""

    def __init__(self, spec: LoadSpec, log: LogSink) -> None:
        from pollama.runner import llama

        if not os.path.isfile(spec.model_path):
            raise FileNotFoundError(f"model file not found: {spec.model_path}")
        if spec.num_ctx < 1 or spec.num_parallel < 1 or spec.num_batch < 1:
            raise ValueError("num_ctx, num_parallel and num_batch must be positive")
        start = time.perf_counter_ns()
        llama.backend_init()
        self.model: Model = llama.Model(spec.model_path, use_mmap=spec.use_mmap)
        try:
            type_k, type_v, warning = llama.kv_cache_types(
                spec.kv_cache_type, spec.flash_attention, self.model.head_dims()
            )
        except Exception:
            self.model.close()
            raise
        if warning:
            _log(warning)
        n_batch = max(spec.num_batch, spec.num_parallel)
        self.n_threads = _threads(spec)
        params = llama.ContextParams(
            n_ctx=spec.num_ctx * spec.num_parallel,
            n_seq_max=spec.num_parallel,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=self.n_threads,
            flash_attn_type=llama.flash_attn_type(spec.flash_attention, spec.kv_cache_type),
            type_k=type_k,
            type_v=type_v,
            kv_unified=False,
        )
        try:
            self.ctx: Context = llama.Context(self.model, params)
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
        kv_bytes = (
            2 * self.model.n_layer * self.ctx.n_ctx
            * self.model.n_head_kv * (self.model.n_embd // max(1, self.model.n_head))
            * _KV_BYTES.get(spec.kv_cache_type.lower(), 2.0)
        )  # fmt: skip
        memory = log.buffer_bytes or int(self.model.size_bytes + kv_bytes)
        self.info = RunnerInfo(
            pid=os.getpid(),
            n_ctx=self.n_ctx,
            n_ctx_train=self.model.n_ctx_train,
            n_parallel=spec.num_parallel,
            n_vocab=self.model.n_vocab,
            memory_bytes=memory,
            load_duration_ns=time.perf_counter_ns() - start,
        )

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def _emitter(writer: Writer, req_id: Any) -> Any:
    def emit(event: Event) -> bool:
        if isinstance(event, CompletionChunk):
            if event.done:
                return writer.send({"id": req_id, "type": "done", **done_to_json(event)})
            return writer.send({"id": req_id, "type": "chunk", "text": event.text})
        return writer.send(
            {"id": req_id, "type": "error", "kind": event.kind, "message": event.message}
        )

    return emit


def _handle(message: dict[str, Any], loaded: Loaded, engine: Engine, writer: Writer) -> bool:
    """Serve one operation; False on ``shutdown``."""
    op = message.get("op")
    req_id = message.get("id")
    model = loaded.model
    try:
        if op == "completion":
            engine.submit(req_id, request_from_json(message["request"]), _emitter(writer, req_id))
        elif op == "cancel":
            engine.cancel(req_id)
        elif op == "tokenize":
            tokens = model.tokenize(str(message["text"]), bool(message.get("add_special", True)))
            writer.send({"id": req_id, "type": "result", "tokens": tokens})
        elif op == "detokenize":
            tokens = [int(t) for t in message["tokens"]]
            bad = [t for t in tokens if not 0 <= t < model.n_vocab]
            if bad:
                raise ValueError(f"invalid token id {bad[0]}")
            text = model.detokenize(tokens).decode("utf-8", "replace")
            writer.send({"id": req_id, "type": "result", "text": text})
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


def _read_loop(sock: socket.socket, loaded: Loaded, engine: Engine, writer: Writer) -> None:
    """Parse operations until ``shutdown`` or EOF, then stop the engine."""
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
                if not _handle(message, loaded, engine, writer):
                    break
    except OSError as exc:
        _log(f"socket error: {exc}")
    finally:
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
    parser = argparse.ArgumentParser(prog="pollama.runner.worker")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    parser.add_argument("--spec", required=True, help="the LoadSpec as JSON")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    writer = Writer(sock)
    try:
        spec = LoadSpec.from_json(json.loads(args.spec))
    except (TypeError, ValueError) as exc:
        writer.send({"type": "fatal", "message": f"invalid load spec: {exc}"})
        return 1

    _tune_threads()
    from pollama.runner import llama
    from pollama.runner.engine import Engine
    from pollama.runner.tuning import ThreadTuner

    log = llama.LogSink(verbose=os.environ.get("OLLAMA_DEBUG", "") not in ("", "0", "false"))
    try:
        loaded = Loaded(spec, log)
    except Exception as exc:
        detail = f" ({log.last_error})" if log.last_error and log.last_error not in str(exc) else ""
        writer.send({"type": "fatal", "message": f"{exc}{detail}"})
        return 1
    tuner = None
    if spec.num_thread <= 0:  # threads left to us: adapt them to what else runs (tuning.py)
        ctx = loaded.ctx
        tuner = ThreadTuner(loaded.n_threads, lambda n: ctx.set_threads(n, n))
    engine = Engine(
        loaded.model,
        loaded.ctx,
        n_ctx=loaded.n_ctx,
        n_batch=loaded.n_batch,
        n_parallel=spec.num_parallel,
        tuner=tuner,
    )
    writer.on_close.append(engine.stop)
    if not writer.send({"type": "ready", "info": asdict(loaded.info)}):
        return 1
    reader = threading.Thread(
        target=_read_loop, args=(sock, loaded, engine, writer), name="reader", daemon=True
    )
    reader.start()
    engine.run()
    reader.join(timeout=2.0)
    if not reader.is_alive():  # it may still be tokenizing with the model we would free
        loaded.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: llama.cpp may still log through our callback
