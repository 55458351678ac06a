"""A worker process started ahead of the next load (``POLLAMA_SPARE_WORKER``).

Before llama.cpp reads the first byte of a model, a load pays for a process, Python,
pollama's worker modules and llama.cpp's libraries: about 0.17 s of one core on the machines
this project is measured on, half of loading SmolLM2. A spare worker has done all that and
waits on its socket for the ``load`` message that carries the spec (``runner/worker.py``
without ``--spec``), so the next load starts at the model. That is what makes a restored
conversation's first token (``runner/kvstate.py``) cheap: its load is most of it.

What must stay true:

* a spare is handed only to a runner whose command line and environment are the ones it
  was started with (a worker on RPC servers has its own environment; a test's stand-in
  command has no spare at all);
* at most one spare exists. It is started when the server starts and when a runner closes,
  when cores are being freed, never right after a take, so that its imports do not compete
  with the load that took the last one or with that model's first prompt;
* only an owner that will close them starts spares (:meth:`SpareWorkers.start`, the app's
  lifespan): a factory used on its own never leaves a process behind;
* a spare that exited is never handed out (it is reaped), and a spare whose server went
  away sees EOF and exits; :meth:`SpareWorkers.close` kills the one left, and no spare
  starts after it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

__all__ = ["Spare", "SpareWorkers", "spawn_worker"]

log = logging.getLogger(__name__)


async def spawn_worker(
    argv: Sequence[str], env: Mapping[str, str] | None
) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start a worker on a fresh socket pair: ``argv`` plus ``--fd`` and the child's end.
    Returns the process and the server's end. Raises ``OSError`` when it cannot start
    (both ends closed). The worker runs in its own session (``runner/process.py``)."""
    parent, child = socket.socketpair()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--fd",
            str(child.fileno()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=(child.fileno(),),
            env=_copy(env),
            start_new_session=True,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


@dataclass
class Spare:
    """A started worker waiting for its spec: the process and the server's socket end."""

    proc: asyncio.subprocess.Process
    sock: socket.socket


class SpareWorkers:
    """Holds at most one spare worker of ``argv`` (without ``--fd`` and ``--spec``) in
    ``env`` (None: the server's own)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = _copy(env)
        self._spare: Spare | None = None
        self._starting: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Keep a spare from now on, until :meth:`close`. Only an owner that will close it
        starts it (the app's lifespan): a factory used on its own (a test's scheduler)
        never leaves a process behind."""
        self._started = True
        self.refill()

    def refill(self) -> None:
        """Start a spare in the background unless one is there or on its way (or spares
        were never started, or are closed)."""
        if not self._started or self._closed or self._spare is not None:
            return
        if self._starting is not None and not self._starting.done():
            return
        self._starting = asyncio.get_running_loop().create_task(
            self._start(), name="pollama-spare-worker"
        )

    async def _start(self) -> None:
        try:
            proc, sock = await spawn_worker(self.argv, self.env)
        except OSError as exc:
            log.warning("could not start a spare model runner: %s", exc)
            return
        if self._closed:  # closed while it started
            await _discard(Spare(proc, sock))
            return
        self._spare = Spare(proc, sock)
        log.debug("started spare model runner pid %s", proc.pid)

    async def take(self, argv: Sequence[str], env: Mapping[str, str] | None) -> Spare | None:
        """The spare, for a runner of ``argv`` in ``env``, or None: none is there, it was
        started otherwise, or it exited (then it is reaped)."""
        if self._closed or list(argv) != self.argv or _copy(env) != self.env:
            return None
        if self._starting is not None and not self._starting.done():
            await asyncio.shield(self._starting)  # fork and exec only: the imports come after
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.proc.returncode is not None:
            log.warning("the spare model runner had exited (status %s)", spare.proc.returncode)
            await _discard(spare)
            return None
        return spare

    async def close(self) -> None:
        """Kill the spare (and one starting), and start no more."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with suppress(Exception):
                await asyncio.shield(self._starting)
        spare, self._spare = self._spare, None
        if spare is not None:
            await _discard(spare)


def _copy(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if env is None else dict(env)


async def _discard(spare: Spare) -> None:
    """Close the socket (a waiting spare exits on EOF), kill it, reap it and read its
    output pipe to the end (which closes the pipe's transport: nobody else reads it)."""
    spare.sock.close()
    with suppress(ProcessLookupError):
        spare.proc.kill()
    await spare.proc.wait()
    if spare.proc.stdout is not None:
        with suppress(Exception):
            await asyncio.wait_for(spare.proc.stdout.read(), 5)
