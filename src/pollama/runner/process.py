"""``SubprocessRunner``: a loaded model in its own worker process (``runner/worker.py``).

The server end of the protocol in ``runner/protocol.py``. The worker gets one end of a
``socket.socketpair()`` as an inherited fd; its stdout and stderr (llama.cpp's log, Python
tracebacks) come back on one pipe, are written to the server's log line by line, and the
last lines are kept so that a crash can say why.

What must stay true:

* one reader task owns the socket's read side and routes each message by ``id`` to the
  queue of the request that sent it; messages for requests that are gone are dropped;
* a completion whose consumer stops early (client gone, ``aclose()``, cancellation) sends
  ``cancel``, so the worker frees the slot within one decode step; so does an embedding
  request (the worker stops it at its next pass);
* when the worker dies (EOF on the socket: exit, segfault, abort, ``kill -9``), every open
  request raises :class:`RunnerCrashed` carrying the worker's last error line (or its exit
  status), every later call raises it at once, and :attr:`alive` is False;
* :meth:`close` always reaps the process: ``shutdown``, a short wait, then SIGKILL.

The worker runs in its own session so that a terminal's Ctrl-C reaches only the server,
which then closes its workers in order; a worker whose server vanished sees EOF and exits.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from pollama.config import Settings
from pollama.errors import InternalError, InvalidRequest, RunnerCrashed
from pollama.runner.base import (
    CompletionChunk,
    CompletionRequest,
    EmbeddingResult,
    LoadSpec,
    RunnerInfo,
)
from pollama.runner.protocol import (
    MAX_LINE,
    chunk_from_json,
    decode,
    done_from_json,
    embedding_result_from_json,
    encode,
    info_from_json,
    media_messages,
    request_to_json,
)
from pollama.runner.rpc import unreachable
from pollama.runner.spare import SpareWorkers, spawn_worker

__all__ = ["SubprocessRunner", "WorkerFactory", "subprocess_factory"]

_default_log = logging.getLogger("pollama.runner.worker")
_ERROR_LINE = re.compile(
    r"error|exception|fatal|abort|assert|panic|failed|terminate|out of memory|killed",
    re.IGNORECASE,
)
_EXIT_GRACE = 2.0  # after EOF, how long a worker may take to exit before it is killed
# An embed op carries at most this many inputs and characters, so that neither it nor its
# reply (a base64 vector per input) comes near MAX_LINE; bigger requests take several ops.
_EMBED_OP_INPUTS = 256
_EMBED_OP_CHARS = 1 << 20  # the worker holds ~100 bytes a token while it tokenizes
_OUTPUT_GRACE = 1.0  # after exit, how long to wait for the rest of its output


@dataclass(frozen=True)
class _Gone:
    """Queued to every open request when the worker dies."""

    detail: str


Message = dict[str, Any] | _Gone


class SubprocessRunner:
    """A :class:`~pollama.runner.base.Runner` backed by ``python -m pollama.runner.worker``.

    ``command`` replaces ``[python, "-m", "pollama.runner.worker"]`` (tests run a fake
    worker); ``--fd N --spec JSON`` are appended to it. ``load_timeout`` bounds
    :meth:`start` (``OLLAMA_LOAD_TIMEOUT``; ``inf`` waits forever); ``close_timeout`` is how
    long :meth:`close` lets the worker exit on its own before killing it (a worker saves
    its prompt cache in that time: ``runner/kvstate.py``, ``SAVE_SECONDS``). ``kv_cache``
    is the prompt cache's directory and bound in bytes, for the real worker (None: off).
    ``spares`` hands :meth:`start` a worker already started (``runner/spare.py``) when one
    of this command and environment waits; closing a runner starts the next one.
    """

    def __init__(
        self,
        spec: LoadSpec,
        *,
        python: str = sys.executable,
        command: Sequence[str] | None = None,
        load_timeout: float = 300.0,
        close_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
        log: logging.Logger = _default_log,
        output_lines: int = 50,
        kv_cache: tuple[str, int] | None = None,
        spares: SpareWorkers | None = None,
    ) -> None:
        self.spec = spec
        self._spares = spares
        self._argv = worker_argv(command, kv_cache, python)
        self._load_timeout = load_timeout
        self._close_timeout = close_timeout
        self._env = dict(env) if env is not None else None
        self._log = log
        self._tail: deque[str] = deque(maxlen=max(output_lines, 1))
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._router: asyncio.Task[None] | None = None
        self._requests: dict[int, asyncio.Queue[Message]] = {}
        self._ids = itertools.count(1)
        self._ready = False
        self._eof = False  # the socket closed: the worker is gone or going
        self._gone: asyncio.Future[str] | None = None  # the crash detail, once known
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self.info: RunnerInfo | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        proc = self._proc
        return (
            self._ready
            and not self._eof
            and not self._closing
            and proc is not None
            and proc.returncode is None
        )

    @property
    def output_tail(self) -> list[str]:
        """The worker's last output lines (stdout and stderr), oldest first."""
        return list(self._tail)

    async def start(self) -> RunnerInfo:
        """Spawn the worker and wait for ``ready``. Raises :class:`InternalError` with the
        worker's message on ``fatal``, with its last error line when it exits first, and
        after ``load_timeout``; the process is reaped in every failure case."""
        if self._proc is not None:
            raise RuntimeError("runner already started")
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        spec = self.spec.to_json()
        env = self._worker_env()
        spare = None if self._spares is None else await self._spares.take(self._argv, env)
        if spare is not None:  # imports done: it waits for the spec (runner/spare.py)
            self._proc, parent = spare.proc, spare.sock
        else:
            argv = [*self._argv, "--spec", json.dumps(spec, separators=(",", ":"))]
            try:
                self._proc, parent = await spawn_worker(argv, env)
            except OSError as exc:
                raise InternalError(f"failed to start the model runner: {exc}") from exc
        self._pump = loop.create_task(self._pump_output())
        self._log.debug(
            "started model runner pid %s for %s%s",
            self._proc.pid, self.spec.model_path, " (spare)" if spare is not None else "",
        )
        try:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    sock=parent, limit=MAX_LINE
                )
            except BaseException:
                parent.close()
                raise
            if spare is not None:
                self._writer.write(encode({"type": "load", "spec": spec}))
            timeout = None if self._load_timeout == float("inf") else self._load_timeout
            try:
                message = await asyncio.wait_for(self._read_message(), timeout)
            except TimeoutError:
                raise InternalError("timed out waiting for llama runner to start") from None
            self.info = await self._handshake(message)
        except BaseException:
            await asyncio.shield(self._teardown(kill=True))
            raise
        self._ready = True
        self._router = loop.create_task(self._route())
        return self.info

    def _worker_env(self) -> Mapping[str, str] | None:
        """The worker's environment: the given one, and for a worker on RPC servers no
        backtrace on ``GGML_ABORT`` (a lost server aborts it by design, ``runner/rpc.py``;
        ggml would attach gdb and bury the one line that says why under a hundred)."""
        if not self.spec.rpc_servers:
            return self._env
        env = dict(os.environ if self._env is None else self._env)
        env.setdefault("GGML_NO_BACKTRACE", "1")
        return env

    async def _handshake(self, message: dict[str, Any] | None) -> RunnerInfo:
        if message is None:
            await self._wait_exit()
            raise InternalError(f"llama runner process has terminated: {self._crash_detail()}")
        kind = message.get("type")
        if kind == "fatal":
            await self._wait_exit()
            raise InternalError(str(message.get("message") or "the model failed to load"))
        if kind != "ready":
            raise InternalError(f"unexpected message from the model runner: {kind!r}")
        try:
            return info_from_json(message["info"])
        except (KeyError, TypeError) as exc:
            raise InternalError(f"malformed ready message from the model runner: {exc}") from exc

    async def close(self) -> None:
        """Ask the worker to shut down, kill it if it does not exit in ``close_timeout``,
        and reap it. Open requests fail with :class:`RunnerCrashed`. Idempotent."""
        self._closing = True
        if self._proc is None:
            return
        if self._close_task is None:
            if self._spares is not None:  # cores are being freed: the next load's worker
                self._spares.refill()
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        proc = self._proc
        assert proc is not None
        if proc.returncode is None and not self._eof:
            self._send_nowait({"op": "shutdown"})
            with suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self._close_timeout)
        await self._teardown(kill=True)

    async def _teardown(self, *, kill: bool) -> None:
        """Kill (if asked and still running) and reap the worker, let the router fail open
        requests, drain the output pump and close the socket."""
        proc = self._proc
        if proc is not None:
            if kill and proc.returncode is None:
                with suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        if self._writer is not None:
            self._writer.close()
            with suppress(OSError):
                await self._writer.wait_closed()
        if self._router is not None:
            await self._router
        else:
            self._fail_all(self._crash_detail())
        if self._pump is not None:
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), _OUTPUT_GRACE)
            self._pump.cancel()
            with suppress(asyncio.CancelledError):
                await self._pump

    # -- requests ----------------------------------------------------------------------------

    async def completion(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """Text chunks, then the done chunk. Stopping early sends ``cancel`` (use
        ``contextlib.aclosing`` so that happens at once rather than at garbage collection)."""
        rid, queue = await self._open()
        finished = False
        try:
            for media in media_messages(rid, request):
                await self._send(media)  # drained one by one: a few MiB in flight at most
            await self._send({"op": "completion", "id": rid, "request": request_to_json(request)})
            while True:
                message = await self._next(queue)
                kind = message.get("type")
                if kind == "chunk":
                    yield _text_chunk(message)
                elif kind == "done":
                    finished = True
                    yield done_from_json(message)
                    return
                else:
                    finished = True
                    raise self._unexpected(message)
        finally:
            self._requests.pop(rid, None)
            if not finished and self.alive:
                self._send_nowait({"op": "cancel", "id": rid})

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        result = await self._call({"op": "tokenize", "text": text, "add_special": add_special})
        tokens = result.get("tokens")
        if not isinstance(tokens, list):
            raise InternalError("malformed tokenize result from the model runner")
        return [int(t) for t in tokens]

    async def detokenize(self, tokens: list[int]) -> str:
        result = await self._call({"op": "detokenize", "tokens": list(tokens)})
        return str(result.get("text") or "")

    async def pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's bytes, from the worker's ``pieces`` op (base64 on the wire)."""
        result = await self._call({"op": "pieces", "tokens": list(tokens)})
        pieces = result.get("pieces")
        if not isinstance(pieces, list) or len(pieces) != len(tokens):
            raise InternalError("malformed pieces result from the model runner")
        return [base64.b64decode(str(p)) for p in pieces]

    async def embed(
        self,
        inputs: Sequence[str],
        truncate: bool = True,
        *,
        query: str | None = None,
        label: str = "input",
    ) -> EmbeddingResult:
        """The pooled vector of each input, or with a ``query`` a cross-encoder's scores of
        each pair (see :class:`~pollama.runner.base.Runner`)."""
        result = EmbeddingResult(vectors=[], token_counts=[])
        op: dict[str, Any] = {"op": "embed", "truncate": truncate, "label": label}
        if query is not None:
            op["query"] = query
        for group in _embed_groups(list(inputs)):
            op.update(inputs=group, offset=len(result.vectors))
            part = await self._embed_op(op)
            result.vectors.extend(part.vectors)
            result.token_counts.extend(part.token_counts)
        return result

    async def _embed_op(self, op: dict[str, Any]) -> EmbeddingResult:
        rid, queue = await self._open()
        finished = False
        inputs = op["inputs"]
        try:
            await self._send({**op, "id": rid})
            reply = await self._next(queue)
            finished = True
            if reply.get("type") != "result":
                raise self._unexpected(reply)
            try:
                result = embedding_result_from_json(reply)
            except (KeyError, TypeError, ValueError) as exc:
                msg = f"malformed embedding result from the model runner: {exc}"
                raise InternalError(msg) from None
            if len(result.vectors) != len(inputs):
                raise InternalError("the model runner returned the wrong number of embeddings")
            return result
        finally:
            self._requests.pop(rid, None)
            if not finished and self.alive:
                self._send_nowait({"op": "cancel", "id": rid})

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        rid, queue = await self._open()
        try:
            await self._send({**message, "id": rid})
            reply = await self._next(queue)
            if reply.get("type") != "result":
                raise self._unexpected(reply)
            return reply
        finally:
            self._requests.pop(rid, None)

    async def _open(self) -> tuple[int, asyncio.Queue[Message]]:
        if not self._ready:
            raise RuntimeError("runner not started")
        if not self.alive:
            raise RunnerCrashed(await self._detail())
        rid = next(self._ids)
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._requests[rid] = queue
        return rid, queue

    async def _next(self, queue: asyncio.Queue[Message]) -> dict[str, Any]:
        message = await queue.get()
        if isinstance(message, _Gone):
            raise RunnerCrashed(message.detail)
        return message

    async def _detail(self) -> str:
        if self._gone is None:
            return ""
        return await asyncio.shield(self._gone)

    @staticmethod
    def _unexpected(message: dict[str, Any]) -> Exception:
        if message.get("type") == "error":
            text = str(message.get("message") or "the model runner reported an error")
            return InvalidRequest(text) if message.get("kind") == "invalid" else InternalError(text)
        return InternalError(f"unexpected message from the model runner: {message.get('type')!r}")

    async def _send(self, message: dict[str, Any]) -> None:
        """Write and wait for the buffer to drain. A broken socket is not reported here:
        the router sees EOF and fails the request through its queue."""
        if self._send_nowait(message) and self._writer is not None:
            with suppress(ConnectionError):
                await self._writer.drain()

    def _send_nowait(self, message: dict[str, Any]) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing() or self._eof:
            return False
        try:
            writer.write(encode(message))
        except (ConnectionError, RuntimeError):
            return False
        return True

    # -- background tasks --------------------------------------------------------------------

    async def _read_message(self) -> dict[str, Any] | None:
        """The next protocol message, or None at EOF. A malformed or oversized line is a
        protocol violation: :class:`InternalError`."""
        assert self._reader is not None
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise InternalError("the model runner sent a truncated message") from None
            return None
        except asyncio.LimitOverrunError:
            raise InternalError("the model runner sent an oversized message") from None
        except ConnectionError:
            return None
        try:
            return decode(line)
        except ValueError as exc:
            raise InternalError(f"the model runner sent an invalid message: {exc}") from None

    async def _route(self) -> None:
        """Deliver messages to their requests until EOF, then fail whatever is still open."""
        violation = ""
        try:
            while (message := await self._read_message()) is not None:
                rid = message.get("id")
                queue = self._requests.get(rid) if isinstance(rid, int) else None
                if queue is not None:
                    queue.put_nowait(message)
                elif rid is None:
                    self._log.warning(
                        "unexpected message from the model runner: %r", message.get("type")
                    )
        except InternalError as exc:
            violation = exc.message
            self._log.error("model runner pid %s: %s", self.pid, violation)
        self._eof = True
        await self._wait_exit()
        detail = violation or self._crash_detail()
        if not self._closing and self.spec.rpc_servers:
            detail = await _name_lost_servers(detail, self.spec.rpc_servers)
        if not self._closing:
            self._log.error("model runner pid %s stopped: %s", self.pid, detail or "no output")
        self._fail_all(detail)

    def _fail_all(self, detail: str) -> None:
        self._eof = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(detail)
        for queue in list(self._requests.values()):
            queue.put_nowait(_Gone(detail))

    async def _wait_exit(self) -> None:
        """Give a worker whose socket closed a moment to exit, then kill it; collect its last
        output either way so that the crash detail is complete."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), _EXIT_GRACE)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._pump is not None and not self._pump.done():
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), _OUTPUT_GRACE)

    async def _pump_output(self) -> None:
        """Copy the worker's output to the log, keeping the last lines for crash reports."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the pipe's limit: skip it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                self._log.info("[runner %s] %s", proc.pid, line)

    def _crash_detail(self) -> str:
        """The worker's last error-looking output line, else how it exited (Go's wording:
        ``exit status 1``, ``signal: killed``)."""
        for line in reversed(self._tail):
            if _ERROR_LINE.search(line):
                return line
        proc = self._proc
        code = proc.returncode if proc is not None else None
        if code is None:
            return ""
        if code < 0:
            try:
                name = signal.strsignal(-code) or f"signal {-code}"
            except ValueError:
                name = f"signal {-code}"
            return f"signal: {name.lower()}"
        return f"exit status {code}"

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        name = os.path.basename(self.spec.model_path)
        return f"<SubprocessRunner {name} pid={self.pid} {state}>"


async def _name_lost_servers(detail: str, endpoints: Sequence[str]) -> str:
    """A crash detail that names the RPC servers the worker used that no longer take a
    connection: llama.cpp aborts with "Remote RPC server crashed or returned malformed
    response" and never says which (``runner/rpc.py``). Checked once the worker is gone,
    so no live connection of ours holds the single-client servers."""
    down = await asyncio.to_thread(unreachable, endpoints)
    if not down:
        return detail
    lost = f"RPC server {', '.join(down)} is unreachable"
    return f"{lost} ({detail})" if detail else lost


def _text_chunk(message: dict[str, Any]) -> CompletionChunk:
    try:
        return chunk_from_json(message)
    except (KeyError, TypeError, ValueError) as exc:
        raise InternalError(f"malformed chunk from the model runner: {exc}") from None


def _embed_groups(inputs: list[str]) -> list[list[str]]:
    """``inputs`` in order, cut into groups within the per-op limits (one input per group
    at least, however long: the request body limit bounds it)."""
    groups: list[list[str]] = []
    chars = 0
    for text in inputs:
        if not groups or len(groups[-1]) >= _EMBED_OP_INPUTS or chars + len(text) > _EMBED_OP_CHARS:
            groups.append([])
            chars = 0
        groups[-1].append(text)
        chars += len(text)
    return groups


def worker_argv(
    command: Sequence[str] | None,
    kv_cache: tuple[str, int] | None,
    python: str = sys.executable,
) -> list[str]:
    """A worker's command line before ``--fd`` and ``--spec``: ``command`` (a test's
    stand-in) or the real worker, with the prompt cache's directory and bound."""
    argv = list(command) if command is not None else [python, "-m", "pollama.runner.worker"]
    if kv_cache is not None and kv_cache[1] > 0:  # the prompt cache (runner/kvstate.py)
        argv += ["--kv-cache", kv_cache[0], "--kv-cache-max-bytes", str(kv_cache[1])]
    return argv


def subprocess_factory(settings: Settings, **options: Any) -> WorkerFactory:
    """The production ``runner_factory`` for the scheduler: one worker per load, with
    ``OLLAMA_LOAD_TIMEOUT``, the prompt cache across unloads (``POLLAMA_KV_CACHE_MAX_BYTES``)
    and a spare worker (``POLLAMA_SPARE_WORKER``); ``options`` go to
    :class:`SubprocessRunner` (``command``, ``env``, ``close_timeout``...). A ``command``
    that replaces the worker (a test's stand-in) takes only the protocol's own arguments:
    no prompt cache, no spare."""
    spares = None
    if "command" not in options:
        options.setdefault("kv_cache", (str(settings.kv_cache_path), settings.kv_cache_max_bytes))
        if settings.spare_worker:  # the command line every runner of this factory gets
            argv = worker_argv(None, options["kv_cache"], options.get("python", sys.executable))
            spares = SpareWorkers(argv, options.get("env"))
    return WorkerFactory(settings, spares, options)


class WorkerFactory:
    """Makes a :class:`SubprocessRunner` for a spec; holds the spare worker, which the app
    starts with :meth:`start` and ends with :meth:`aclose` (before its runners close)."""

    def __init__(
        self, settings: Settings, spares: SpareWorkers | None, options: dict[str, Any]
    ) -> None:
        self._settings, self.spares, self._options = settings, spares, options

    def __call__(self, spec: LoadSpec) -> SubprocessRunner:
        return SubprocessRunner(
            spec, load_timeout=self._settings.load_timeout, spares=self.spares, **self._options
        )

    def start(self) -> None:
        if self.spares is not None:
            self.spares.start()

    async def aclose(self) -> None:
        if self.spares is not None:
            await self.spares.close()
