"""A real registry and a fault-injecting proxy for the registry tests, both on loopback.

* :class:`DockerRegistry` runs Debian's ``docker-registry`` (the reference distribution
  server, ``/usr/bin/docker-registry``) on a free port with its storage in a temp folder.
* :class:`FaultProxy` is a small HTTP/1.1 reverse proxy (asyncio, in its own thread) that
  sits between pollama and the registry. It forwards requests with their ``Host`` header
  unchanged (so the registry's upload ``Location`` headers point back at the proxy), closes
  each connection after one response, counts the body bytes it sends per path, and applies
  :class:`Fault`\\ s to matching requests: drop the connection after N body bytes, flip a
  byte, stall, throttle, or answer by itself. A ``hook`` can answer requests (auth servers).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REGISTRY_BINARY = "/usr/bin/docker-registry"
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_registry_binary() -> str:
    """The binary's path; skipped when absent, except in CI, where it must be installed."""
    path = shutil.which("docker-registry") or (
        REGISTRY_BINARY if os.path.exists(REGISTRY_BINARY) else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    return path


class DockerRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage under ``root``."""

    def __init__(self, root: Path) -> None:
        self.binary = require_registry_binary()
        self.root = root
        self.port = free_port()
        self.netloc = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.netloc}"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.netloc}\n"
        )
        self._log = open(root / "registry.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [self.binary, "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError((root / "registry.log").read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Fault:
    """What to do to responses of requests matching ``method`` and the ``path`` regex.

    ``action``: ``drop`` (close after ``after`` body bytes), ``corrupt`` (flip the byte at
    body offset ``after``), ``stall`` (after ``after`` bytes, send nothing for ``seconds``,
    then close), ``throttle`` (``rate`` bytes per second), ``no-range`` (ask upstream without
    the ``Range`` header: a registry that always sends the whole blob), ``reply`` (answer
    ``reply`` without asking upstream). ``times`` responses are affected (None: all).
    """

    path: str
    action: str
    method: str | None = "GET"
    after: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    reply: Reply | None = None
    times: int | None = 1
    hits: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and request.method != self.method:
            return False
        return re.search(self.path, request.path) is not None


Hook = Callable[[Request], Awaitable[Reply | None]]


class FaultProxy:
    """Reverse proxy to ``upstream`` (an ``http://host:port`` URL) on a free loopback port."""

    def __init__(self, upstream: str | None = None, hook: Hook | None = None) -> None:
        self.upstream = upstream
        self.hook = hook
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.sent: Counter[str] = Counter()  # body bytes sent, by path
        self.bodies: Counter[str] = Counter()  # bodies being sent now, by path
        self.most_bodies: Counter[str] = Counter()  # the most sent at once, by path
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.url = f"http://{self.netloc}"

    # -- control -------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def blob_bytes(self) -> int:
        return sum(n for path, n in self.sent.items() if "/blobs/sha256:" in path)

    def most_at_once(self, digest: str) -> int:
        """The most bodies of the blob ``digest`` that were being sent at the same time."""
        return max((n for path, n in self.most_bodies.items() if digest in path), default=0)

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()
            # Handlers still running (a stall sleeping out its seconds) end here, not in a
            # closed loop.
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await self._client.aclose()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -- serving ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._client = httpx.AsyncClient(timeout=None)
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.netloc = f"127.0.0.1:{port}"

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        return Request(method, target, headers, body)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            fault = next((f for f in self.faults if f.matches(request)), None)
            if fault is not None:
                fault.hits += 1
            reply = await self.hook(request) if self.hook else None
            if reply is None and fault is not None and fault.action == "reply":
                reply = fault.reply
            if reply is not None:
                await self._write_reply(writer, request, reply)
                return
            await self._forward(writer, request, fault)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _write_reply(
        self, writer: asyncio.StreamWriter, request: Request, reply: Reply
    ) -> None:
        headers = {"content-length": str(len(reply.body)), **reply.headers}
        self._write_head(writer, reply.status, list(headers.items()))
        if request.method != "HEAD":
            writer.write(reply.body)
            self.sent[request.path] += len(reply.body)
        await writer.drain()

    @staticmethod
    def _write_head(
        writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]]
    ) -> None:
        lines = [f"HTTP/1.1 {status} X"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP]
        lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _forward(
        self, writer: asyncio.StreamWriter, request: Request, fault: Fault | None
    ) -> None:
        assert self.upstream is not None, "no upstream and no reply"
        headers = [(k, v) for k, v in request.headers.items() if k not in _HOP]
        if fault is not None and fault.action == "no-range":
            headers = [(k, v) for k, v in headers if k != "range"]
        upstream = self._client.build_request(
            request.method, self.upstream + request.target, headers=headers, content=request.body
        )
        response = await self._client.send(upstream, stream=True)
        try:
            self._write_head(writer, response.status_code, list(response.headers.multi_items()))
            await writer.drain()
            if request.method == "HEAD":
                return
            await self._relay(writer, request, fault, response)
        finally:
            await response.aclose()

    async def _relay(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        fault: Fault | None,
        response: httpx.Response,
    ) -> None:
        """The upstream body to the client, with the fault applied; counted in ``bodies``
        until its last byte is written."""
        path, length = request.path, int(response.headers.get("content-length", -1))
        self.bodies[path] += 1
        self.most_bodies[path] = max(self.most_bodies[path], self.bodies[path])
        try:
            await self._relay_chunks(writer, request, fault, response, length)
        finally:
            self.bodies[path] -= 1

    async def _relay_chunks(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        fault: Fault | None,
        response: httpx.Response,
        length: int,
    ) -> None:
        position = 0
        started = time.monotonic()
        async for chunk in response.aiter_raw(65536):
            if fault is not None and fault.action in ("drop", "stall"):
                if position + len(chunk) >= fault.after:
                    keep = chunk[: max(0, fault.after - position)]
                    writer.write(keep)
                    self.sent[request.path] += len(keep)
                    await writer.drain()
                    if fault.action == "stall":
                        await asyncio.sleep(fault.seconds)
                    writer.transport.abort()
                    return
            if fault is not None and fault.action == "corrupt":
                if position <= fault.after < position + len(chunk):
                    index = fault.after - position
                    chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]
            writer.write(chunk)
            self.sent[request.path] += len(chunk)
            position += len(chunk)
            await writer.drain()
            if position == length:  # all written: the client may ask for its next part now
                return
            if fault is not None and fault.action == "throttle" and fault.rate:
                ahead = position / fault.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
