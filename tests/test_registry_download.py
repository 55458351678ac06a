"""The fast download path: bodies read straight from the connection, the partial file's
in-order hash, a registry without ``Range``, corrupted and abandoned downloads, progress
throttling, and the byte pipe under httpx (plain and TLS).

Pulls run against a real registry (Debian's docker-registry) through a :class:`FaultProxy`;
the byte pipe is tested against small servers written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pollama.names import ModelName
from pollama.registry import (
    BlobDigestMismatch,
    HostPolicy,
    InsufficientDiskSpace,
    RegistryError,
    TransferOptions,
    download,
    netstream,
    partial,
)
from pollama.registry.hosts import guarded_transport
from pollama.registry.partial import PartialFile
from pollama.store import Store
from pollama.store.manifests import MANIFEST_MEDIA_TYPE, Manifest
from registry_helpers import DockerRegistry, Fault, FaultProxy, Reply, free_port
from test_registry import (
    FAST,
    collect,
    make_model,
    model_layer,
    run,
    service,
    strays,
    strays_besides_resumable,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure()
    return s


@pytest.fixture(scope="module")
def model(registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """A ~1.5 MB model pushed once as ``library/dl:latest``."""
    tmp = tmp_path_factory.mktemp("dl")
    scratch = Store(tmp / "models")
    scratch.ensure()
    name = ModelName.parse(f"{registry.netloc}/library/dl:latest")
    manifest = make_model(scratch, name, tmp, seed=7, n_embd=128)
    run(service(scratch, tmp).push(name, insecure=True))
    return manifest


def through(proxy: FaultProxy) -> ModelName:
    return ModelName.parse(f"{proxy.netloc}/library/dl:latest")


ONE_PART = TransferOptions(
    backoff_base=0.02, backoff_max=0.1, stall_timeout=0.5, checkpoint_interval=0.05
)


# -- pulls ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [FAST, ONE_PART], ids=["parts", "one-part"])
def test_a_registry_without_range_support_still_works(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, opts: TransferOptions
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="no-range", times=None))
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()
    assert strays(store) == []
    gets = [r for r in proxy.requests if r.method == "GET" and layer.digest in r.path]
    assert gets and all(r.headers["range"].startswith("bytes=") for r in gets)
    if opts is FAST:  # each part got the whole blob and kept only its own range
        assert len(gets) > 1 and proxy.blob_bytes() > layer.size


def test_a_corrupted_download_is_detected_and_fetched_again(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="corrupt", after=layer.size // 2, times=1))
    for other in model.digests() - {layer.digest}:  # fetched ahead, still coming at the failure
        proxy.add(Fault(path=other, action="throttle", rate=5, times=1))
    with pytest.raises(BlobDigestMismatch):
        run(service(store, tmp_path, ONE_PART).pull(through(proxy), insecure=True))
    assert not store.blobs.exists(layer.digest)
    assert strays_besides_resumable(store, model, layer.digest) == []
    fetched = proxy.blob_bytes()
    items = run(service(store, tmp_path, ONE_PART).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()
    assert proxy.blob_bytes() - fetched >= layer.size  # all of it again, nothing reused
    data = store.blobs.path(layer.digest).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest


@pytest.mark.parametrize("opts", [FAST, ONE_PART], ids=["parts", "one-part"])
def test_bodies_read_through_httpx_are_verified_and_resume_after_a_cut(
    proxy: FaultProxy,
    store: Store,
    tmp_path: Path,
    model: Manifest,
    opts: TransferOptions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path for bodies the byte pipe cannot hand over (chunked, a proxy's connection):
    the same buffers, the same in-order hash, the bytes before a cut kept."""
    monkeypatch.setattr(download, "raw_body", lambda _response: None)
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="drop", after=layer.size // 3, times=1))
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()
    assert strays(store) == []
    assert proxy.blob_bytes() < layer.size * 1.5  # what arrived before the cut was kept
    data = store.blobs.path(layer.digest).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest


def test_a_corrupted_part_among_many_is_refused(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    """Parts land in any order; a flipped byte in a later one (read back, not hashed from
    memory) still fails the digest, and nothing is installed or left behind."""
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="corrupt", after=100, times=None))
    opts = TransferOptions(**{**FAST.__dict__, "max_retries": 0})
    with pytest.raises(BlobDigestMismatch):
        run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    assert not store.blobs.exists(layer.digest)
    assert strays_besides_resumable(store, model, layer.digest) == []


def test_a_disk_that_cannot_hold_the_blob_is_refused_before_any_byte_is_fetched(
    proxy: FaultProxy,
    store: Store,
    tmp_path: Path,
    model: Manifest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The partial file's blocks are reserved up front: no room is an error at once."""

    def full(_fd: int, _size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "preallocate", full)
    with pytest.raises(InsufficientDiskSpace):
        run(service(store, tmp_path, ONE_PART).pull(through(proxy), insecure=True))
    assert proxy.blob_bytes() == 0 and not store.blobs.exists(model_layer(model).digest)


def test_preallocate_reserves_the_blocks_and_keeps_what_is_written(tmp_path: Path) -> None:
    path = tmp_path / "p-partial"
    path.write_bytes(b"kept")
    fd = os.open(path, os.O_RDWR)
    try:
        partial.preallocate(fd, 8 << 20)
        info = os.fstat(fd)
    finally:
        os.close(fd)
    assert path.read_bytes()[:4] == b"kept"
    if partial._fallocate() is not None:  # Linux (ext4, xfs, btrfs, tmpfs all can)
        assert info.st_size == 8 << 20 and info.st_blocks * 512 >= 8 << 20


def test_progress_is_throttled_and_the_last_reports_the_whole_blob(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=1_500_000, times=None))
    opts = TransferOptions(progress_interval=0.1, stall_timeout=5)  # one part
    started = time.monotonic()
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    elapsed = time.monotonic() - started
    ours = [item for item in items if item.get("digest") == layer.digest]
    # One object per interval at most (plus the first and the last), not one per piece read.
    assert elapsed > 0.5 and 3 <= len(ours) <= elapsed / 0.1 + 3
    done = [item.get("completed", 0) for item in ours]
    assert done == sorted(done)
    assert ours[-1]["completed"] == ours[-1]["total"] == layer.size


def test_a_link_that_keeps_up_fetches_the_parts_over_one_connection_in_order(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    """One connection takes the parts one after another while the link is fast enough, so
    the hash reads each as it lands (``fast_link`` of 1 byte/s: any link is)."""
    layer = model_layer(model)
    opts = TransferOptions(min_part_size=256 << 10, ramp_interval=0.05, fast_link=1)
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()
    gets = [r for r in proxy.requests if r.method == "GET" and layer.digest in r.path]
    starts = [int(r.headers["range"].split("=")[1].split("-")[0]) for r in gets]
    assert len(gets) == len(opts.plan(layer.size)) > 1 and starts == sorted(starts)
    assert proxy.most_at_once(layer.digest) <= 2  # one receiving, the next one asked for


@pytest.mark.parametrize(
    ("ramp", "connections"), [(0.02, 4), (0, 4), (60, 2)], ids=["ramped", "all-at-once", "later"]
)
def test_a_slow_link_gets_more_connections(
    proxy: FaultProxy,
    store: Store,
    tmp_path: Path,
    model: Manifest,
    ramp: float,
    connections: int,
) -> None:
    """Slower than ``fast_link``: the connections double every ``ramp_interval`` up to
    ``max_parts`` (0: all of them at once, Ollama's way); before the first interval ends
    one receives and the next part's request is on its way (the server sends two bodies,
    one of them held back by the client)."""
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=2_000_000, times=None))
    opts = TransferOptions(min_part_size=128 << 10, max_parts=4, ramp_interval=ramp)
    started = time.monotonic()
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    elapsed = time.monotonic() - started
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()
    assert len(opts.plan(layer.size)) == 4 and proxy.most_at_once(layer.digest) == connections
    if connections == 4:  # each connection is throttled on its own: together they go faster
        assert elapsed < layer.size / 2_000_000


def test_a_pull_nobody_follows_stops_fetching(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=300_000, times=None))
    svc = service(store, tmp_path, ONE_PART)

    async def leave_early() -> None:
        events = svc.pull(through(proxy), insecure=True)
        async for item in events:
            if item.digest == layer.digest and item.completed > 0:
                break
        await events.aclose()  # the client goes away
        await asyncio.sleep(0.3)
        assert svc.downloads.active() == []

    asyncio.run(leave_early())
    time.sleep(0.5)  # the proxy's write in flight when the connection closed fails now
    sent = proxy.blob_bytes()
    time.sleep(0.5)
    assert proxy.blob_bytes() == sent < layer.size  # nothing more was asked for
    assert not store.blobs.exists(layer.digest)
    assert any(name.endswith("-partial") for name in strays(store))  # kept to resume


def test_a_manifest_size_the_registry_contradicts_fails_without_retrying(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, registry: DockerRegistry
) -> None:
    layer = model_layer(model)
    accept = {"Accept": MANIFEST_MEDIA_TYPE}
    raw = httpx.get(f"{registry.url}/v2/library/dl/manifests/latest", headers=accept).content
    wrong = raw.replace(f'"size":{layer.size}'.encode(), f'"size":{layer.size + 1}'.encode())
    wrong = wrong.replace(f'"size": {layer.size}'.encode(), f'"size": {layer.size + 1}'.encode())
    assert wrong != raw
    reply = Reply(200, {"content-type": MANIFEST_MEDIA_TYPE}, wrong)
    proxy.add(Fault(path="/manifests/", action="reply", reply=reply))
    slow = TransferOptions(backoff_base=5, backoff_max=5)  # a retry would take seconds
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"registry reports {layer.size} bytes for"):
        run(service(store, tmp_path, slow).pull(through(proxy), insecure=True))
    assert time.monotonic() - started < 4
    assert not store.blobs.exists(layer.digest)


def test_concurrent_followers_each_see_the_end(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest
) -> None:
    svc = service(store, tmp_path, ONE_PART)

    async def both() -> list[list[dict[str, Any]]]:
        pulls = [collect(svc.pull(through(proxy), insecure=True)) for _ in range(2)]
        return list(await asyncio.gather(*pulls))

    for items in asyncio.run(both()):
        assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests()


# -- the partial file -------------------------------------------------------------------------


def test_the_partial_file_hashes_in_order_whatever_order_parts_land_in(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    a, b, c = data[: 1 << 20], data[1 << 20 : 2 << 20], data[2 << 20 :]
    fd = os.open(tmp_path / "x-partial", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    file = PartialFile(fd)
    file.call(file.write, [c[:100], c[100:]], 2 << 20)  # a later part first: not hashed yet
    assert file.claimed == 0
    file.call(file.write, [a], 0)  # continues the hash: given to it from memory
    assert file.claimed == 1 << 20
    file.call(file.write, [b], 1 << 20)
    assert file.claimed == 2 << 20
    file.call(file.wait_hashed, 2 << 20)
    file.claim(len(data))  # the rest is read back
    file.call(file.wait_hashed, len(data))
    assert file.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert os.pread(fd, len(data), 0) == data
    file.close()
    assert file.closed
    with pytest.raises(OSError):
        file.call(file.write, [b"late"], 0)


def test_a_write_of_many_small_pieces_and_a_large_one_lands_whole(tmp_path: Path) -> None:
    small = [os.urandom(n) for n in range(1, 1500)]  # a slow link: more pieces than an iovec
    data = b"".join(small) + os.urandom(5 << 20)  # and one piece larger than a write call
    fd = os.open(tmp_path / "y-partial", os.O_RDWR | os.O_CREAT, 0o644)
    file = PartialFile(fd)
    assert file.call(file.write, [*small, data[len(b"".join(small)) :]], 0) == len(data)
    file.call(file.wait_hashed, len(data))
    assert file.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert os.pread(fd, len(data) + 1, 0) == data
    file.close()


def test_a_buffer_is_reused_only_once_the_write_and_the_hash_are_done_with_it(
    tmp_path: Path,
) -> None:
    """Buffers go back to the pool from the hash thread; one handed out again while the
    hash still read it would change the digest. Every buffer taken is scribbled over at
    once, so an early reuse shows."""
    data = os.urandom(24 << 20)
    fd = os.open(tmp_path / "z-partial", os.O_RDWR | os.O_CREAT, 0o644)
    file = PartialFile(fd)
    step = partial.BUFFER_SIZE // 2 + 1  # not a multiple of anything
    for offset in range(0, len(data), step):
        buffer = partial.take_buffer()
        piece = data[offset : offset + step]
        buffer[: len(piece)] = piece
        file.call(file.write, [buffer[: len(piece)]], offset, buffer)
        spare = partial.take_buffer()  # maybe the buffer the hash just finished with
        spare[:] = b"\xff" * len(spare)
        partial.recycle_buffer(spare)
    file.call(file.wait_hashed, len(data))
    assert file.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert os.pread(fd, len(data), 0) == data
    file.close()


def test_a_failed_read_back_fails_the_hash_and_close_stops_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "w-partial", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 100)
    file = PartialFile(fd)
    file.claim(4096)  # the file holds less than that
    with pytest.raises(OSError, match="shorter than its progress"):
        file.call(file.wait_hashed, 4096)
    file.claim(8192)  # taken by nobody now: no thread is left waiting on it
    file.close()
    again = PartialFile(os.open(tmp_path / "w-partial", os.O_RDWR))
    again.call(again.write, [b"y" * 10], 0)
    again.close()  # drops what the hash was given and not hashed yet; nothing is left running
    assert again.closed
    assert again._thread is not None and not again._thread.is_alive()


# -- the byte pipe ----------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A server on a free loopback port (yielded) whose connections all end with it."""
    writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the transports finish closing (TLS ones too)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=guarded_transport(HostPolicy(["127.0.0.1"])))


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def read_all(raw: netstream.RawBody, size: int) -> bytes:
    """The body, filled into buffers of ``size`` bytes (each filled completely but the last)."""
    got = b""
    buffer = memoryview(bytearray(size))
    while count := await raw.fill(buffer, size, 5):
        got += buffer[:count]
    return got


def test_bodies_are_read_straight_from_the_connection_when_that_is_safe() -> None:
    body = os.urandom(3 << 20)
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await read_head(reader)
            if b"/small" in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            elif b"/chunked" in head:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write(b"5\r\nhello\r\n0\r\n\r\n")
            else:  # a 100 Continue first, and the head split over several writes
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(f"content-length: {len(body)}\r\n\r".encode())
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(b"\n" + body)
            await writer.drain()

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            url = f"http://127.0.0.1:{port}"
            for _ in range(2):  # kept alive: bodies read through httpx leave it reusable
                assert (await http.get(f"{url}/small")).content == b"hello"
            async with http.stream("GET", f"{url}/chunked") as response:
                assert netstream.raw_body(response) is None
                assert await response.aread() == b"hello"
            assert connections == 1
            async with http.stream("GET", f"{url}/big") as response:
                raw = netstream.raw_body(response)
                assert raw is not None and netstream.raw_body(response) is None
                assert await read_all(raw, 1 << 20) == body
            assert (await http.get(f"{url}/small")).content == b"hello"
            assert connections == 2  # a body read directly closes its connection

    asyncio.run(main())


def test_a_connection_that_closes_early_is_a_short_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)
        await writer.drain()

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            url = f"http://127.0.0.1:{port}"
            async with http.stream("GET", url) as response:
                raw = netstream.raw_body(response)
                assert raw is not None
                assert await read_all(raw, 64) == b"x" * 40

    asyncio.run(main())


def test_a_fill_returns_what_arrived_before_a_stall_and_wakes_when_lowered() -> None:
    go, last = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1300\r\n\r\n" + b"a" * 100)
        await writer.drain()
        await go.wait()
        writer.write(b"b" * 200)
        await writer.drain()
        await last.wait()
        writer.write(b"c" * 1000)
        await writer.drain()

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            async with http.stream("GET", f"http://127.0.0.1:{port}") as response:
                raw = netstream.raw_body(response)
                assert raw is not None
                buffer = memoryview(bytearray(1000))
                # 100 bytes, then nothing: they come back when the link goes quiet...
                assert await raw.fill(buffer, 1000, 0.3) == 100
                with pytest.raises(TimeoutError):  # ...and the next fill finds the stall
                    await raw.fill(buffer, 1000, 0.2)
                go.set()
                filling = asyncio.create_task(raw.fill(buffer, 1000, 5))
                await asyncio.sleep(0.2)
                assert not filling.done()  # 200 bytes are not enough...
                raw.lower(150)  # ...until they are
                assert await asyncio.wait_for(filling, 2) == 200
                assert bytes(buffer[:200]) == b"b" * 200
                last.set()
                assert await raw.fill(buffer, 1000, 5) == 1000
                assert await raw.fill(buffer, 1000, 5) == 0  # the end of the body

    asyncio.run(main())


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    trusting = ssl.create_default_context(cafile=tmp / "cert.pem")
    return server, trusting


def answering(body: bytes) -> Handler:
    """A handler that answers one request with ``body``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    return handler


def test_tls_is_asyncio_s_with_its_checks(tmp_path: Path) -> None:
    server_context, trusting = _self_signed(tmp_path)
    body = os.urandom(1 << 20)
    handler = answering(body)

    async def fetch(port: int, hostname: str, context: ssl.SSLContext) -> bytes:
        stream = await netstream.connect("127.0.0.1", port, timeout=5)
        tls = await stream.start_tls(context, server_hostname=hostname, timeout=5)
        assert tls.get_extra_info("ssl_object") is not None
        await tls.write(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n", timeout=5)
        data = b""
        while chunk := await tls.read(65536, timeout=5):
            data += chunk
        await tls.aclose()
        return data

    async def main() -> None:
        async with serving(handler, server_context) as port:
            assert (await fetch(port, "localhost", trusting)).endswith(body)
            with pytest.raises(httpcore.ConnectError):  # the name is not the certificate's
                await fetch(port, "another.example", trusting)
            with pytest.raises(httpcore.ConnectError):  # nobody vouches for the certificate
                await fetch(port, "localhost", ssl.create_default_context())

    asyncio.run(main())


def test_connection_errors_are_httpcore_s() -> None:
    async def main() -> None:
        with pytest.raises(httpcore.ConnectError):  # nothing listens there
            await netstream.connect("127.0.0.1", free_port(), timeout=2)

    asyncio.run(main())
